import torch
from hypothesis import given
from hypothesis import strategies as st

import dkm_param as dp
from dkm_param.ops import layout
from dkm_param.posttrain.palettize import cluster_weight
from strategies import seeds

shapes = st.sampled_from([(12, 8), (6, 4, 3, 3), (8, 8, 1, 1), (4, 8, 2), (16,)])


@given(shape=shapes, which=st.sampled_from(["flat", "input"]), seed=seeds)
def test_layout_round_trip_is_identity(shape, which, seed):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    moved = layout.to_layout(weight, which)
    assert torch.equal(layout.from_layout(moved.reshape(-1), tuple(shape), which), weight)


@given(shape=shapes, which=st.sampled_from(["flat", "input"]), group=st.sampled_from([None, 2]), seed=seeds)
def test_a_weight_with_at_most_k_distinct_vectors_per_group_is_stored_losslessly(shape, which, group, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = 2 if shape[-1] % 2 == 0 or (which == "input" and len(shape) > 2) else 1
    if which == "input" and len(shape) > 2 and shape[1] % dim:
        dim = 1
    if group and (len(shape) < 2 or shape[0] % group):
        group = None
    spec = dp.LayerSpec(bits=3, dim=dim, group_size=group, layout=which)
    if spec.misfit(shape):
        return
    palette = torch.randn(8, dim, generator=gen)
    groups = layout.groups(tuple(shape), group)
    picks = torch.randint(0, 8, (groups, torch.Size(shape).numel() // dim // groups), generator=gen)
    vectors = palette[picks].reshape(layout.rows(tuple(shape)), -1)
    weight = layout.from_layout(vectors, tuple(shape), which)
    stored = cluster_weight(weight, spec)
    assert torch.equal(stored.weight(), weight)


def test_input_layout_reads_vectors_across_input_channels():
    weight = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    vectors = layout.grouped_vectors(weight, 4, None, layout="input")[0]
    assert torch.equal(vectors[0], weight[0, :, 0, 0])  # the 4 input channels at kernel position (0, 0)
    assert torch.equal(layout.grouped_vectors(weight[:, :, 0, 0], 4, None, layout="input")[0],
                       layout.grouped_vectors(weight[:, :, 0, 0], 4, None, layout="flat")[0])
