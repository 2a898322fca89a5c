import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dkm_param as dp
from strategies import seeds


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


POLICY = dp.Policy(default=dp.LayerSpec(bits=3), small_layer_bits=None)


def weighted_error(weight, layer, mass):
    return float((mass * (weight - layer.weight()).pow(2)).sum())


def test_palettize_writes_snapped_weights_in_the_finalize_format(tmp_path):
    model = mlp()
    compressed = dp.palettize(model, POLICY)
    assert set(compressed.layers) == {"0.weight", "2.weight", "4.weight"}
    for name, layer in compressed.layers.items():
        assert torch.equal(model.state_dict()[name], layer.weight())
        assert torch.unique(layer.weight()).numel() <= 8
    path = compressed.save(tmp_path / "p.safetensors")
    fresh = dp.load_compressed(path, mlp(seed=1))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_not_inplace_leaves_the_model_alone():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = dp.palettize(model, POLICY, inplace=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(compressed.layers["2.weight"].weight(), before["2.weight"])
    assert torch.equal(compressed.tensors["2.bias"], before["2.bias"])


def test_1d_inertia_is_no_worse_than_scikit_learn():
    from sklearn.cluster import KMeans

    weight = torch.randn(300, 100, generator=torch.Generator().manual_seed(0)) * 0.03
    for bits in (2, 4, 6):
        spec = dp.LayerSpec(bits=bits)
        from dkm_param.posttrain.palettize import cluster_weight

        ours = cluster_weight(weight, spec)
        ref = KMeans(n_clusters=spec.clusters, n_init=1, random_state=0).fit(weight.reshape(-1, 1).double().numpy())
        assert weighted_error(weight.double(), ours, 1.0) <= ref.inertia_ * 1.001


@given(seed=seeds, bits=st.integers(1, 4))
def test_sensitivity_weighting_lowers_the_weighted_error(seed, bits):
    from dkm_param.posttrain.palettize import cluster_weight

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(40, 25, generator=gen, dtype=torch.float64)
    importance = torch.rand(40, 25, generator=gen, dtype=torch.float64) ** 4 * 100
    spec = dp.LayerSpec(bits=bits)
    plain = cluster_weight(weight, spec, optimal=True)
    weighted = cluster_weight(weight, spec, importance=importance, optimal=True)
    assert weighted_error(weight, weighted, importance) <= weighted_error(weight, plain, importance) * (1 + 1e-9)


@given(seed=seeds, bits=st.integers(1, 5))
def test_optimal_option_is_at_least_as_good_as_lloyd(seed, bits):
    from dkm_param.posttrain.palettize import cluster_weight

    weight = torch.randn(30, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spec = dp.LayerSpec(bits=bits)
    best = weighted_error(weight, cluster_weight(weight, spec, optimal=True), 1.0)
    assert best <= weighted_error(weight, cluster_weight(weight, spec), 1.0) * (1 + 1e-9)


def test_vector_layers_use_em_and_fill_the_codebook():
    model = mlp()
    compressed = dp.palettize(model, dp.Policy(default=dp.LayerSpec(bits=4, dim=4), small_layer_bits=None))
    layer = compressed.layers["2.weight"]
    assert layer.codebook.shape == (16, 4)
    assert torch.bincount(layer.indices.long(), minlength=16).min() > 0


def test_palettized_codebooks_seed_dkm():
    model = mlp()
    compressed = dp.palettize(model, POLICY, inplace=False)
    kept = dp.Policy(default=dp.LayerSpec(bits=3, settle_iter=0), small_layer_bits=None)
    dp.register_dkm(model, kept, init=compressed)
    for name, layer in compressed.layers.items():
        param = model.get_submodule(name.removesuffix(".weight")).parametrizations.weight[0]
        assert torch.equal(param.codebook, layer.codebook)
        assert param.tau > 0
    model.eval()
    assert torch.equal(model[2].weight, compressed.layers["2.weight"].weight())


def test_snapped_weights_still_get_a_usable_temperature():
    model = mlp()
    compressed = dp.palettize(model, POLICY)  # in place: the weights sit on the centroids
    dp.register_dkm(model, POLICY, init=compressed)
    x = torch.randn(8, 64)
    loss = model(x).pow(2).mean()
    loss.backward()
    grad = model[2].parametrizations.weight.original.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_errors_name_the_problem():
    model = mlp()
    with pytest.raises(dp.RegistrationError, match="seeding codebook has shape"):
        dp.register_dkm(
            mlp(),
            dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None),
            init=dp.palettize(model, POLICY, inplace=False),
        )
    with pytest.raises(dp.DKMError, match=r"layer '2': sensitivity has shape \(3,\)"):
        dp.palettize(model, POLICY, sensitivity={"2": torch.ones(3)})
    dp.register_dkm(model, POLICY)
    with pytest.raises(dp.RegistrationError, match="model has DKM registered"):
        dp.palettize(model, POLICY)


@given(seed=seeds, bits=st.integers(1, 3), group_size=st.sampled_from([1, 2, 5]))
def test_per_group_codebooks_never_fit_worse_than_one_per_tensor(seed, bits, group_size):
    from dkm_param.posttrain.palettize import cluster_weight

    weight = torch.randn(10, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    whole = cluster_weight(weight, dp.LayerSpec(bits=bits), optimal=True)
    grouped = cluster_weight(weight, dp.LayerSpec(bits=bits, group_size=group_size), optimal=True)
    assert grouped.codebook.shape == (10 // group_size, 2**bits, 1)
    assert weighted_error(weight, grouped, 1.0) <= weighted_error(weight, whole, 1.0) * (1 + 1e-9) + 1e-12
    for g in range(10 // group_size):
        rows = grouped.weight()[g * group_size : (g + 1) * group_size]
        assert set(rows.flatten().tolist()) <= set(grouped.codebook[g, :, 0].tolist())


def test_channel_scale_decodes_as_scale_times_codebook():
    from dkm_param.posttrain.palettize import cluster_weight

    weight = (
        torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
        * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 100.0, 0.0])[:, None]
    )
    layer = cluster_weight(weight, dp.LayerSpec(bits=3, channel_scale=True))
    assert layer.scale.shape == (6,) and layer.scale[5] == 1.0  # an all-zero channel keeps scale 1
    decoded = layer.weight()
    nearest_to_zero = layer.codebook[layer.codebook.abs().argmin(), 0]
    assert torch.equal(decoded[5], nearest_to_zero.expand(40))
    relative = ((decoded - weight).norm(dim=1) / weight.norm(dim=1).clamp_min(1e-30))[:5]
    assert (relative < 0.3).all()  # every channel fits, whatever its scale
    unscaled = cluster_weight(weight, dp.LayerSpec(bits=3)).weight()
    assert ((unscaled - weight)[0].norm() / weight[0].norm()) > 0.9  # one codebook cannot serve 1e-3 and 100


@pytest.mark.parametrize(
    "spec",
    [
        dp.LayerSpec(bits=2, group_size=4),
        dp.LayerSpec(bits=2, dim=2, channel_scale=True),
        dp.LayerSpec(bits=3, group_size=8, channel_scale=True),
    ],
)
def test_dkm_with_groups_and_scales_trains_finalizes_and_round_trips(spec, tmp_path):
    model = mlp()
    dp.register_dkm(model, dp.Policy(default=spec, small_layer_bits=None))
    x, y = torch.randn(16, 64), torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.isfinite(model[2].parametrizations.weight.original.grad).all()
    model.eval()
    compressed = dp.finalize(model, codebook_dtype=torch.float16)
    layer = compressed.layers["2.weight"]
    groups = 128 // spec.group_size if spec.group_size else 1
    assert layer.codebook.shape == ((groups,) if groups > 1 else ()) + (spec.clusters, spec.dim)
    assert (layer.scale is not None) == spec.channel_scale
    path = compressed.save(tmp_path / "g.safetensors")
    fresh = dp.load_compressed(path, mlp(seed=3))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    read = dp.read_compressed(path).layers["2.weight"]
    assert read.spec.group_size == spec.group_size and read.spec.channel_scale == spec.channel_scale
    summary_row = next(r for r in compressed.summary().rows if r.name == "2.weight")
    assert summary_row.bytes_after == layer.nbytes


def pruned(shape, fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    return weight * (torch.rand(shape, generator=gen) > fraction)


@given(seed=seeds, dim=st.sampled_from([1, 2]), bits=st.integers(2, 4), group=st.sampled_from([None, 8]))
def test_post_training_keeps_pruned_weights_exactly_zero(seed, dim, bits, group):
    from dkm_param.posttrain.palettize import cluster_weight

    weight = pruned((16, 24), 0.6, seed)
    if dim == 2:
        weight = weight.reshape(16, 12, 2) * (weight.reshape(16, 12, 2) != 0).all(-1, keepdim=True)
        weight = weight.reshape(16, 24)
    layer = cluster_weight(weight, dp.LayerSpec(bits=bits, dim=dim, group_size=group, preserve_zeros=True))
    decoded = layer.weight()
    assert torch.equal(decoded[weight == 0], torch.zeros(int((weight == 0).sum())))
    assert (layer.codebook[..., 0, :] == 0).all()
    zero_vectors = (weight.reshape(-1, dim) == 0).all(1)
    assert torch.equal(layer.indices.long() == 0, zero_vectors)  # zeros take entry 0, nothing else does


def test_dkm_keeps_pruned_weights_exactly_zero_through_training(tmp_path):
    model = mlp()
    with torch.no_grad():
        for name in ("0", "2"):
            layer = model.get_submodule(name)
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    masks = {name: model.get_submodule(name).weight == 0 for name in ("0", "2")}
    spec = dp.LayerSpec(bits=2, preserve_zeros=True)
    dp.register_dkm(model, dp.Policy(default=spec, small_layer_bits=None))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 64), torch.arange(16) % 10
    for _ in range(3):
        for name, mask in masks.items():
            assert (model.get_submodule(name).weight[mask] == 0).all()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    compressed = dp.finalize(model)
    for name, mask in masks.items():
        layer = compressed.layers[f"{name}.weight"]
        assert (layer.codebook[0] == 0).all()
        assert (layer.indices.reshape(mask.shape)[mask] == 0).all()
        assert (model.get_submodule(name).weight[mask] == 0).all()
    fresh = dp.load_compressed(compressed.save(tmp_path / "z.safetensors"), mlp(seed=2))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_meta_model_is_refused_naming_the_layer():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with pytest.raises(dp.RegistrationError, match=r"layer '0' \(Linear\) and 1 more selected layer: .*meta device"):
        dp.palettize(model, dp.Policy(small_layer_bits=None))


def test_a_codebook_dtype_the_file_cannot_hold_is_refused_before_the_model_changes():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    before = model[0].weight.detach().clone()
    for dtype in (torch.int8, torch.float8_e4m3fn):
        with pytest.raises(dp.FormatError, match="codebook dtype .* is not supported"):
            dp.palettize(model, dp.Policy(small_layer_bits=None), codebook_dtype=dtype)
    assert torch.equal(model[0].weight, before)


def test_a_codebook_that_overflows_its_stored_dtype_is_refused_before_the_model_changes():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.mul_(1e6)  # fine in float32, beyond float16
    before = model[0].weight.detach().clone()
    with pytest.raises(dp.DKMError, match="layer '0': (.*overflow float16|codebook holds NaN or Inf)"):
        dp.palettize(model, dp.Policy(small_layer_bits=None), codebook_dtype=torch.float16)
    assert torch.equal(model[0].weight, before)


def test_layers_clustered_together_are_what_each_gets_alone():
    from dkm_param.posttrain.palettize import cluster_weight, cluster_weights

    torch.manual_seed(0)
    pruned = torch.randn(24, 40)
    pruned[pruned.abs() < 0.5] = 0
    items = [
        (torch.randn(64, 48), dp.LayerSpec(bits=4), "plain", None, None),
        (torch.randn(32, 48), dp.LayerSpec(bits=3, group_size=8, seed=5), "grouped", None, None),
        (torch.randn(16, 8, 3, 3), dp.LayerSpec(bits=2, channel_scale=True), "scaled", torch.rand(16, 8, 3, 3), None),
        (pruned, dp.LayerSpec(bits=3, preserve_zeros=True), "pruned", None, None),
        (torch.randn(40, 40), dp.LayerSpec(bits=4), "outliers", None, torch.rand(40, 40) > 0.98),
        (torch.randn(32, 32), dp.LayerSpec(bits=2, dim=2), "vectors", None, None),
        (torch.randn(48, 32).bfloat16(), dp.LayerSpec(bits=4, group_size=16), "bf16", None, None),
    ]
    together = cluster_weights(items)
    for item, layer in zip(items, together):
        weight, spec, name, importance, outliers = item
        alone = cluster_weight(weight, spec, name, importance, outliers=outliers)
        assert torch.equal(layer.codebook, alone.codebook), item[2]
        assert torch.equal(layer.indices, alone.indices), item[2]
        assert (layer.scale is None) == (alone.scale is None)
        assert layer.scale is None or torch.equal(layer.scale, alone.scale)
