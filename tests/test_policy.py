import re

import pytest
import torch
import torchvision
from torch import nn

import dkm_param as dp


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),  # 0: 864 weights
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),  # 3: 18432
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 200),  # 6: 12800
        nn.Linear(200, 10),  # 7: 2000
    )


def test_notation_builds_one_spec_per_kind():
    policy = dp.Policy.from_notation("cv:6/8, fc:6/4")
    assert policy.kinds["cv"] == dp.LayerSpec(bits=6, dim=8)
    assert policy.kinds["fc"] == dp.LayerSpec(bits=6, dim=4)
    assert policy.default is None
    base = dp.LayerSpec(tau=5e-5, max_iter=3)
    assert dp.Policy.from_notation("cv:2/1", spec=base).kinds["cv"] == base.replace(bits=2, dim=1)


@pytest.mark.parametrize(
    "notation, words",
    [
        ("cv:4", "write kind:bits/dim"),
        ("xx:4/1", "unknown kind 'xx'"),
        ("cv:4/1, cv:2/1", "appears twice"),
        ("", "names no layer kind"),
        ("cv:9/1", "bits must be in 1..8"),
    ],
)
def test_bad_notation_is_rejected(notation, words):
    with pytest.raises(dp.SpecError, match=words):
        dp.Policy.from_notation(notation)


def test_resolution_order_name_then_pattern_then_kind_then_default():
    policy = dp.Policy(
        default=dp.LayerSpec(bits=3),
        kinds={"fc": dp.LayerSpec(bits=2)},
        overrides={"3": dp.LayerSpec(bits=5), r"[67]": dp.LayerSpec(bits=6), "7": None},
        small_layer_bits=None,
    )
    plan = policy.plan(small_net())
    assert plan.row("0").spec.bits == 3 and plan.row("0").reason == "default"
    assert plan.row("3").spec.bits == 5 and plan.row("3").reason == "named in the policy"
    assert plan.row("6").spec.bits == 6 and "matches" in plan.row("6").reason
    assert plan.row("7").spec is None  # exact name beats pattern
    assert plan.row("1").spec is None and "BatchNorm2d weights are not clustered" in plan.row("1").reason


def test_small_layer_rule_and_skip_first_last():
    policy = dp.Policy.from_notation("cv:2/1, fc:2/1", skip_first_last=True)
    plan = policy.plan(small_net())
    assert plan.row("0").spec is None and "first or last" in plan.row("0").reason
    assert plan.row("7").spec is None
    assert plan.row("3").spec.bits == 2
    plan = dp.Policy.from_notation("cv:2/1, fc:2/1").plan(small_net())
    assert plan.row("0").spec.bits == 8 and "small layer" in plan.row("0").reason
    assert plan.row("7").spec.bits == 8
    off = dp.Policy.from_notation("cv:2/1, fc:2/1", small_layer_bits=None).plan(small_net())
    assert off.row("0").spec.bits == 2


def test_skip_list_and_kinds_not_in_notation():
    plan = dp.Policy.from_notation("cv:4/1", skip=("3",)).plan(small_net())
    assert plan.row("3").spec is None and "skip list" in plan.row("3").reason
    assert plan.row("6").spec is None and "kind fc" in plan.row("6").reason
    assert [r.name for r in plan.clustered()] == ["0"]


def test_plan_does_not_touch_the_model():
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp.Policy().plan(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_misfit_is_skipped_with_reason_or_raises_when_named_or_strict():
    policy = dp.Policy(default=dp.LayerSpec(dim=3), small_layer_bits=None)
    plan = policy.plan(small_net())
    assert plan.row("3").spec.dim == 3  # 18432 = 3 * 6144
    assert plan.row("7").spec is None and "dim=3 does not divide the weight" in plan.row("7").reason
    with pytest.raises(dp.SpecError, match=r"layer '6' \(Linear, 12800 weights\): dim=3 does not divide"):
        dp.Policy(default=dp.LayerSpec(dim=3), small_layer_bits=None, strict=True).plan(small_net())
    with pytest.raises(dp.SpecError, match=r"layer '7' .* skip the layer in the policy"):
        dp.Policy(overrides={"7": dp.LayerSpec(dim=3)}).plan(small_net())
    with pytest.raises(dp.SpecError, match="125 vectors are fewer than the 256 clusters"):
        dp.Policy(overrides={"7": dp.LayerSpec(bits=8, dim=16)}).plan(small_net())


def test_all_conv_and_linear_kinds_are_targets():
    model = nn.ModuleDict({
        "c1": nn.Conv1d(2, 4, 3), "c3": nn.Conv3d(2, 4, 3), "t2": nn.ConvTranspose2d(4, 2, 3),
        "lin": nn.Linear(4, 4), "emb": nn.Embedding(100, 8),
    })
    plan = dp.Policy(default=dp.LayerSpec(bits=1), small_layer_bits=None).plan(model)
    assert {r.name: r.kind for r in plan} == {"c1": "cv", "c3": "cv", "t2": "cv", "lin": "fc", "emb": "emb"}
    assert plan.row("emb").spec is None and "embeddings are clustered only" in plan.row("emb").reason
    with_emb = dp.Policy(default=dp.LayerSpec(bits=1), kinds={"emb": dp.LayerSpec(bits=2)}).plan(model)
    assert with_emb.row("emb").spec.bits == 8  # small-layer rule: 800 weights


def test_tied_weight_is_clustered_once_by_the_first_selected_user():
    model = nn.ModuleDict({"wte": nn.Embedding(300, 64), "head": nn.Linear(64, 300, bias=False)})
    model.head.weight = model.wte.weight
    plan = dp.Policy.from_notation("fc:4/1").plan(model)
    assert plan.row("head").clustered and plan.row("head").followers == ("wte",)
    assert plan.row("wte").tied_to == "head" and not plan.row("wte").clustered


def test_policy_dict_round_trip_rejects_unknown_keys():
    policy = dp.Policy.from_notation("cv:4/2, fc:3/1", skip=("fc",), overrides={"x.*": None}, strict=True)
    assert dp.Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(dp.SpecError, match="unknown Policy field"):
        dp.Policy.from_dict({"defaults": None})
    with pytest.raises(dp.SpecError, match="not a valid regular expression"):
        dp.Policy(overrides={"(": None})


def test_resnet18_plan_under_cv4_4_fc4_2():
    model = torchvision.models.resnet18()
    plan = dp.Policy.from_notation("cv:4/4, fc:4/2").plan(model)
    clustered = {r.name: (r.spec.bits, r.spec.dim) for r in plan.clustered()}
    assert len(clustered) == 21  # 20 convolutions and the classifier
    assert clustered["conv1"] == (8, 4)  # 9,408 weights: small-layer rule
    assert clustered["layer2.0.downsample.0"] == (8, 4)  # 8,192 weights
    assert clustered["layer3.0.downsample.0"] == (4, 4)
    assert clustered["layer4.1.conv2"] == (4, 4)
    assert clustered["fc"] == (4, 2)
    skipped = plan.skipped()
    assert len(skipped) == 20 and all(r.module_type == "BatchNorm2d" for r in skipped)
    text = str(plan)
    assert "layer4.1.conv2" in text and "21 clustered, 20 skipped" in text


def test_integer_and_complex_weights_are_skipped_or_rejected():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1].weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.complex64))
    plan = dp.Policy(small_layer_bits=None).plan(model)
    assert plan.row("1").spec is None and "dtype torch.complex64 is not floating point" in plan.row("1").reason
    with pytest.raises(dp.SpecError, match=r"layer '1' \(Linear\): weight dtype torch.complex64 is not floating point"):
        dp.Policy(strict=True).plan(model)
    with pytest.raises(dp.SpecError, match=r"layer '1'"):
        dp.Policy(overrides={"1": dp.LayerSpec()}).plan(model)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(skip_first_last="False"), r"policy skip_first_last must be True or False, got 'False' \(str\)"),
        (dict(skip_first_last=1), r"policy skip_first_last must be True or False, got 1 \(int\)"),
        (dict(strict="no"), r"policy strict must be True or False, got 'no'.*any non-empty string would read as True"),
        (dict(strict=None), r"policy strict must be True or False, got None"),
        (dict(small_layer_params=None), r"policy small_layer_params must be an int >= 0, got None"),
        (dict(small_layer_params=True), r"small_layer_params must be an int >= 0, got True"),
        (dict(small_layer_params=-1), r"small_layer_params must be an int >= 0, got -1.*small_layer_bits=None"),
        (dict(small_layer_params=1e4), r"small_layer_params must be an int >= 0, got 10000.0"),
        (dict(small_layer_bits=0), r"policy small_layer_bits must be an int in 1..8 or None, got 0"),
        (dict(small_layer_bits=9), r"small_layer_bits must be an int in 1..8 or None, got 9"),
        (dict(small_layer_bits=True), r"small_layer_bits must be an int in 1..8 or None, got True"),
        (dict(small_layer_bits="8"), r"small_layer_bits must be an int in 1..8 or None, got '8'"),
        (dict(skip=5), r"policy skip must be a module name or pattern \(str\) or a tuple or list of them, got 5"),
        (dict(skip=["fc", 1]), r"policy skip must be .*, got \['fc', 1\]"),
        (dict(skip={"fc"}), r"policy skip must be .*, got \{'fc'\}"),
        (dict(kinds=[("fc", None)]), r"policy kinds must be a dict from a kind .* got list"),
        (dict(kinds={1: None}), r"policy kinds keys must be str, got 1 \(int\)"),
        (dict(overrides="0"), r"policy overrides must be a dict from a module name or pattern .* got str '0'"),
        (dict(overrides={("0",): None}), r"policy overrides keys must be str, got \('0',\) \(tuple\)"),
    ],
)
def test_policy_fields_are_checked_where_the_policy_is_built(kwargs, words):
    with pytest.raises(dp.SpecError, match=words):
        dp.Policy(**kwargs)


def test_skip_as_text_is_not_read_as_true():
    # 'False' once turned skip_first_last on; now it is refused before any plan
    with pytest.raises(dp.SpecError, match="skip_first_last must be True or False"):
        dp.Policy.from_notation("cv:2/1, fc:2/1", skip_first_last="False")
    with pytest.raises(dp.SpecError, match="skip_first_last must be True or False"):
        dp.Policy.from_dict({"skip_first_last": "False"})


def test_skip_is_kept_as_a_tuple_from_a_str_a_list_or_a_dict():
    assert dp.Policy(skip="3").skip == ("3",)
    assert dp.Policy(skip=["3", "6"]).skip == ("3", "6")
    assert dp.Policy(skip=["3"]) == dp.Policy(skip=("3",))
    assert dp.Policy.from_dict({"skip": "fc"}).skip == ("fc",)  # once split into ('f', 'c')
    assert dp.Policy.from_dict({"skip": ["3", "6"]}).skip == ("3", "6")
    plan = dp.Policy(skip=["3"], small_layer_bits=None).plan(small_net())
    assert plan.row("3").spec is None and "skip list" in plan.row("3").reason


def test_a_dict_with_tables_of_the_wrong_type_raises_spec_error():
    with pytest.raises(dp.SpecError, match="policy kinds must be a dict"):
        dp.Policy.from_dict({"kinds": ["fc"]})
    with pytest.raises(dp.SpecError, match="policy overrides must be a dict"):
        dp.Policy.from_dict({"overrides": "0"})
    with pytest.raises(dp.SpecError, match="small_layer_params must be an int >= 0, got None"):
        dp.Policy.from_dict({"small_layer_params": None})


def test_small_layer_rule_bounds_are_accepted():
    assert dp.Policy(small_layer_params=0, small_layer_bits=1).small_layer_bits == 1
    assert dp.Policy(small_layer_bits=None).small_layer_bits is None
    plan = dp.Policy(default=dp.LayerSpec(bits=2), small_layer_params=0).plan(small_net())
    assert plan.row("0").spec.bits == 2  # no layer is smaller than 0 weights


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", FLOAT8 + [torch.int8, torch.complex64], ids=str)
def test_weights_the_file_cannot_hold_are_skipped_like_non_floats(dtype):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    weight = torch.zeros(64, 64).to(dtype)
    model[1].weight = nn.Parameter(weight, requires_grad=weight.is_floating_point() or weight.is_complex())
    plan = dp.Policy(small_layer_bits=None).plan(model)
    what = "supported" if dtype.is_floating_point else "floating point"
    reason = f"weight dtype {dtype} is not {what} (supported: float64, float32, float16, bfloat16)"
    assert plan.row("1").spec is None and plan.row("1").reason == reason
    assert plan.row("0").clustered
    with pytest.raises(dp.SpecError, match=rf"layer '1' \(Linear\): weight dtype {dtype} is not .*cast the weight"):
        dp.Policy(strict=True).plan(model)
    with pytest.raises(dp.SpecError, match=r"layer '1' .*supported: float64, float32, float16, bfloat16"):
        dp.Policy(overrides={"1": dp.LayerSpec()}).plan(model)


def test_a_weight_with_a_parametrization_of_its_own_is_left_alone_and_said_so():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    parametrize.register_parametrization(model[0], "weight", Double())
    plan = dp.Policy(small_layer_bits=None).plan(model)
    assert plan.row("0").spec is None and "already has a parametrization (Double)" in plan.row("0").reason
    with pytest.raises(dp.SpecError, match=r"layer '0' \(ParametrizedLinear\): its weight already has"):
        dp.Policy(overrides={"0": dp.LayerSpec()}).plan(model)
    compressed = dp.palettize(model, dp.Policy(small_layer_bits=None))
    assert list(compressed.layers) == ["1.weight"] and parametrize.is_parametrized(model[0], "weight")


def test_names_and_patterns_that_match_no_layer_are_an_error_naming_the_closest():
    model = torchvision.models.mobilenet_v2()  # its layers: features.0.0, ..., classifier.1
    policy = dp.Policy(skip=("features.0",), overrides={"classifier": None})
    with pytest.raises(dp.SpecError) as raised:
        policy.plan(model)
    text = str(raised.value)
    assert "policy skip 'features.0' (a Conv2dNormActivation, not a module that owns a weight" in text
    assert "closest: 'features.0.0'" in text  # a module's own layers come first
    assert "policy overrides 'classifier' (a Sequential" in text and "'classifier.1'" in text
    assert "in MobileNetV2" in text and "correct or remove it" in text
    with pytest.raises(dp.SpecError, match=r"policy overrides 'layer4\\\\\.\.\*' \(no module that owns a weight"):
        dp.Policy(overrides={r"layer4\..*": None}).plan(small_net())
    with pytest.raises(dp.SpecError, match=r"policy skip 'feature.1.conv.0.0' .*closest: 'features.1.conv.0.0'"):
        dp.Policy(skip=("features.0.0", "feature.1.conv.0.0")).plan(model)  # only the misspelt one is named
    # names match exactly, patterns in full, as before: these match and plan
    plan = dp.Policy(skip=("features.0.0",), overrides={"classifier.1": None, r"features\.1\..*": None}).plan(model)
    assert plan.row("features.0.0").spec is None and plan.row("features.1.conv.0.0").spec is None
    assert dp.Policy(skip=("1",)).plan(small_net()).row("1").spec is None  # a BatchNorm's weight is a name too


def test_a_policy_naming_nothing_leaves_the_model_as_it_was():
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = dp.Policy(default=dp.LayerSpec(bits=2), overrides={"fc": None}, small_layer_bits=None)
    with pytest.raises(dp.SpecError, match="policy overrides 'fc'"):
        dp.register_dkm(model, policy)
    with pytest.raises(dp.SpecError, match="policy overrides 'fc'"):
        dp.palettize(model, policy)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def dense_bytes(row, dtype=torch.float32):
    return row.numel * dtype.itemsize


@pytest.mark.parametrize("build", [torchvision.models.mobilenet_v3_small, torchvision.models.efficientnet_b0])
def test_default_policy_stores_no_layer_larger_than_it_was(build):
    model = build(weights=None)
    plan = dp.Policy().plan(model)
    for row in plan.clustered():
        spec = row.spec
        codebook = spec.clusters * spec.dim * 4  # float32 entries, one codebook (no groups, no scales)
        indices = -(-row.numel // spec.dim * spec.bits // 8)
        assert codebook + indices < dense_bytes(row), (row.name, row.numel, spec.bits)
    small = [r for r in plan if r.kind and r.spec is None]
    assert small, "these models have layers the small-layer rule would make larger"
    for row in small:
        assert row.numel * 4 < 1024 + row.numel  # an 8-bit float32 codebook alone is 1 KiB
        assert row.reason.startswith("small layer (< 10,000 weights, small_layer_bits=8): kept as it is")
        assert f"not less than its own {dense_bytes(row):,} B" in row.reason and "small_layer_bits=None" in row.reason
    raised = [r for r in plan.clustered() if r.spec.bits == 8]
    assert raised and all(r.reason == "small layer (< 10,000 weights, small_layer_bits=8): 8 bits" for r in raised)


def test_a_small_bert_classifier_is_kept_for_the_rule_and_every_stored_layer_is_smaller():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=96, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=32, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    row = dp.Policy().plan(model).row("classifier")  # 2 x 96 = 192 weights
    assert row.spec is None and "small layer" in row.reason and "small_layer_bits=None clusters it" in row.reason
    assert "bits <=" not in row.reason  # once: a hint to lower bits, that never named the rule
    compressed = dp.palettize(model, dp.Policy(), inplace=False)
    assert "classifier.weight" not in compressed.layers and len(compressed.layers) == 7
    for name, layer in compressed.layers.items():
        assert layer.nbytes < layer.numel * layer.dtype.itemsize, name
    off = dp.Policy(small_layer_bits=None).plan(model).row("classifier")
    assert off.spec.bits == 4  # 64 B of codebook and 96 B of indices: smaller than 768 B


def test_a_layer_clustering_would_make_larger_is_kept_or_refused_when_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(64, 64))  # 16 weights: 64 B in float32
    plan = dp.Policy(small_layer_bits=None).plan(model)
    reason = "kept as it is: bits=4, dim=1 would take 72 B with the codebook, not less than its own 64 B in float32"
    assert plan.row("0").spec is None and plan.row("0").reason == reason
    assert plan.row("1").clustered
    assert dp.Policy(default=dp.LayerSpec(bits=2), small_layer_bits=None).plan(model).row("0").clustered  # 16 + 4 B
    with pytest.raises(dp.SpecError, match=r"layer '0' \(Linear, 16 weights\): bits=4, dim=1 would take 72 B.*skip"):
        dp.Policy(overrides={"0": dp.LayerSpec()}).plan(model)
    half = dp.Policy(small_layer_bits=None).plan(nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16))
    assert half.row("0").spec is None  # a bfloat16 codebook: 32 B and 8 B of indices
    assert half.row("0").reason.endswith("would take 40 B with the codebook, not less than its own 32 B in bfloat16")


def test_an_override_giving_a_spec_must_reach_a_layer_that_is_clustered():
    model = small_net()  # '1' is a BatchNorm: it owns a weight, which is never clustered
    with pytest.raises(dp.SpecError, match=r"policy overrides '1' \(a BatchNorm2d, not a conv, linear or embedding"):
        dp.Policy(overrides={"1": dp.LayerSpec(bits=2)}).plan(model)
    with pytest.raises(dp.SpecError, match=r"policy overrides '1\|2' \(no conv, linear or embedding layer matches"):
        dp.Policy(overrides={"1|2": dp.LayerSpec(bits=2)}).plan(model)  # a pattern reaching only the BatchNorm
    # skipping it, or naming it None, says what happens anyway: allowed, as is a pattern reaching a conv too
    assert dp.Policy(overrides={"1": None}, skip=("1",)).plan(model).row("1").spec is None
    plan = dp.Policy(overrides={"[01]": dp.LayerSpec(bits=8)}, small_layer_bits=None).plan(model)
    assert plan.row("0").spec.bits == 8 and plan.row("1").spec is None


@pytest.mark.parametrize(
    "given, closest", [("fc.weight", "'fc'"), ("FC", "'fc'"), ("Layer1.0.Conv1", "'layer1.0.conv1'")]
)
def test_a_state_dict_key_or_another_case_is_pointed_at_its_module(given, closest):
    with pytest.raises(dp.SpecError, match=rf"policy skip {re.escape(repr(given))} \(no module that owns a weight "
                       rf"matches it; closest: {closest}"):
        dp.Policy(skip=(given,)).plan(torchvision.models.resnet18())


def test_a_policy_that_clusters_nothing_is_an_error_saying_why_and_changes_nothing():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for apply in (dp.register_dkm, dp.palettize):
        with pytest.raises(dp.SpecError, match=r"the policy clusters no layer of Sequential \(2 layers: kind fc has no "
                           r"spec and the policy's default is None\); give the kinds it has a spec"):
            apply(model, dp.Policy.from_notation("cv:4/1"))
    with pytest.raises(dp.SpecError, match=r"clusters no layer of Identity \(it has no module that owns a weight\)"):
        dp.palettize(nn.Identity(), dp.Policy())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


@pytest.mark.parametrize("dtype, codebook_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_a_wider_codebook_dtype_never_stores_a_layer_larger(dtype, codebook_dtype):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 400)).to(dtype)  # 600 and 12,000 weights
    plan = dp.Policy().plan(model, codebook_dtype)
    small = plan.row("0")  # 8 bits: 256 entries of codebook outweigh 600 weights
    assert small.spec is None and f"with the codebook in {str(codebook_dtype)[6:]}" in small.reason
    assert dp.Policy().plan(model).row("0").spec.bits == 8  # with the codebook in the weight's own dtype
    compressed = dp.palettize(model, dp.Policy(), codebook_dtype=codebook_dtype, inplace=False)
    assert list(compressed.layers) == ["2.weight"]
    for layer in compressed.layers.values():
        assert layer.codebook.dtype == codebook_dtype and layer.nbytes < layer.numel * dtype.itemsize
    summary = compressed.summary()
    assert summary.bytes_after < summary.bytes_before
    with pytest.raises(dp.SpecError, match=r"layer '0' .*would take .* with the codebook in .*store the codebooks in "
                       r"the weight dtype"):
        dp.Policy(overrides={"0": dp.LayerSpec(bits=8)}).plan(model, codebook_dtype)
