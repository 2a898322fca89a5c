import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dkm_param.errors import DKMError, SpecError, SurgeryError
from dkm_param.filters.csgd import CSGDSpec, cluster_filters, collapse_
from dkm_param.filters.routes import out_channels, routes
from dkm_param.filters.thinning import count_macs, count_params, thin

pytestmark = pytest.mark.usefixtures("one_thread")


def vgg(widths=(8, 8, 16), classes=10):
    """Conv-BN-ReLU stacks with max pooling, then flatten and a linear classifier (8x8 inputs)."""
    layers, c_in = [], 3
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if i % 2 == 0:
            layers.append(nn.MaxPool2d(2))
        c_in = width
    side = 8 // 2 ** len(range(0, len(widths), 2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, classes))


class Functional(nn.Module):
    """conv -> relu -> pool -> view(batch, -1) -> linear, written with functional calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.fc = nn.Linear(12 * 3 * 3, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x))) + x))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def randomize_norms(model, seed=0):
    """Batch norms with non-trivial scale, shift and statistics, so merging them is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def relative_error(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def check_thin(model, spec, x):
    """Cluster, collapse, thin; the thin model must compute the same outputs with fewer params and MACs."""
    model = randomize_norms(model).eval()
    plan = cluster_filters(model, spec)
    assert plan.clustered(), str(plan)
    collapse_(model, plan)
    with torch.no_grad():
        expected = model(x)
    before = copy.deepcopy(model.state_dict())
    thinner, report = thin(model, plan, x)
    with torch.no_grad():
        got = thinner(x)
    assert relative_error(expected, got) <= 1e-5
    assert report.max_diff == pytest.approx((expected - got).abs().max().item(), abs=1e-6)
    assert report.params_after < report.params_before == count_params(model)
    assert report.macs_after < report.macs_before
    assert report.params_after == count_params(thinner)
    for name, _, after, _ in report.layers:
        assert out_channels(thinner.get_submodule(name)) == after == plan.row(name).target
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    return plan, thinner, report


def test_vgg_stack_with_batch_norm_relu_and_pooling_keeps_its_outputs():
    torch.manual_seed(0)
    plan, _, report = check_thin(vgg(), CSGDSpec(ratio=5 / 8), torch.randn(2, 3, 8, 8))
    assert [r.name for r in plan.clustered()] == ["0", "4", "7"]
    assert plan.row("0").norms == ("1",) and plan.row("7").norms == ("8",)
    assert plan.row("12").reason == "linear layers are thinned only with linear=True"
    assert report.layers[-1][3] == ("12",)  # the classifier's input features are folded
    assert "params:" in str(report) and "MACs:" in str(report)


def test_conv_flatten_linear_through_functional_calls_keeps_its_outputs():
    torch.manual_seed(1)
    plan, thinner, _ = check_thin(Functional(), CSGDSpec(ratio=0.5), torch.randn(2, 3, 8, 8))
    assert thinner.fc.in_features == 6 * 9
    assert plan.row("fc").clustered is False


def test_linear_layers_thin_when_asked():
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    plan, thinner, _ = check_thin(mlp, CSGDSpec(ratio=0.5, linear=True), torch.randn(4, 10))
    assert [r.name for r in plan.clustered()] == ["0", "3"]
    assert plan.row("5").reason == "its output is the model's output"
    assert thinner[5].in_features == 6


def test_resnet18_inner_convolutions_keep_the_outputs():
    torch.manual_seed(3)
    plan, _, report = check_thin(
        torchvision.models.resnet18(num_classes=10), CSGDSpec(ratio=5 / 8), torch.randn(2, 3, 32, 32)
    )
    assert {r.name for r in plan.clustered()} == {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}
    assert "residual sum" in plan.row("layer1.0.conv2").reason
    assert "residual sum" in plan.row("layer2.0.downsample.0").reason
    assert report.param_ratio < 0.7 and report.mac_ratio < 0.7


@pytest.mark.slow
def test_resnet50_inner_convolutions_keep_the_outputs():
    torch.manual_seed(4)
    plan, _, report = check_thin(
        torchvision.models.resnet50(num_classes=10), CSGDSpec(ratio=5 / 8), torch.randn(2, 3, 32, 32)
    )
    names = {r.name for r in plan.clustered()}
    assert "layer1.0.conv1" in names and "layer1.0.conv2" in names and "layer1.0.conv3" not in names
    assert len(names) == 2 * 16 + 1  # the stem feeds two convolutions (layer1.0.conv1 and its downsample), no sum
    assert "conv1" in names
    assert report.param_ratio < 0.9 and report.mac_ratio < 0.8


@settings(max_examples=10)
@given(
    widths=st.lists(st.integers(2, 12), min_size=1, max_size=3),
    ratio=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_thin_model_computes_the_same_function(widths, ratio, seed):
    torch.manual_seed(seed)
    model = randomize_norms(vgg(tuple(widths)), seed).eval()
    plan = cluster_filters(model, CSGDSpec(ratio=ratio, seed=seed, strict=False))
    collapse_(model, plan)
    x = torch.randn(2, 3, 8, 8)
    thinner, report = thin(model, plan, x)
    with torch.no_grad():
        assert relative_error(model(x), thinner(x)) <= 1e-5
    assert report.params_after <= report.params_before


def test_layer_feeding_a_residual_sum_is_refused_when_named():
    with pytest.raises(
        SpecError, match=r"layer 'b' \(Conv2d, 4 channels\).*residual sum \(add\).*skip it with channels=\{'b': None\}"
    ):
        cluster_filters(Residual(), CSGDSpec(ratio=None, channels={"b": 2}))
    plan = cluster_filters(Residual(), CSGDSpec(ratio=0.5))
    assert [r.name for r in plan.clustered()] == ["a"]
    assert "residual sum" in plan.row("b").reason and "model's output" in plan.row("head").reason


def test_layer_feeding_a_concatenation_is_refused_when_named():
    with pytest.raises(SpecError, match=r"layer 'a'.*concatenation \(cat\)"):
        cluster_filters(Concat(), CSGDSpec(ratio=None, channels={"a": 3}))
    assert "concatenation" in cluster_filters(Concat(), CSGDSpec(ratio=0.5)).row("b").reason


def test_grouped_and_depthwise_convolutions_are_refused():
    depthwise = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1), nn.Flatten()
    )
    found = routes(depthwise)
    assert "groups=8 (grouped or depthwise)" in found["0"].reason
    assert "groups=8; removing output channels" in found["2"].reason
    assert found["3"].reason == "its output is the model's output"  # through the flatten
    assert issubclass(SurgeryError, DKMError) and issubclass(SurgeryError, ValueError)


def test_unsupported_wiring_is_explained():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Linear(5, 5)

        def forward(self, x):
            y = self.a(x)
            return self.b(y.transpose(1, 2)), self.c(self.b(y).mean(1))

    found = routes(Odd())
    assert "transpose" in found["a"].reason
    assert "called 2 times" in found["b"].reason
    with pytest.raises(SurgeryError, match="cannot trace"):
        routes(nn.Sequential(_Untraceable()))


class _Untraceable(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_thin_refuses_clusters_that_are_not_equal():
    torch.manual_seed(5)
    model = vgg().eval()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5))
    with pytest.raises(SurgeryError, match=r"layer '0': filters within one cluster differ.*collapse_"):
        thin(model, plan)
    collapse_(model, plan)
    with torch.no_grad():
        pair = next(c for c in plan.row("0").clusters if len(c) > 1)
        model[1].running_var[pair[0]] += 0.5  # merged channels with different statistics
    with pytest.raises(SurgeryError, match=r"batch norm '1' running_var"):
        thin(model, plan)
    thinner, _ = thin(model, plan, tol=float("inf"))  # merges anyway: each cluster becomes its mean
    assert thinner[0].out_channels == 4


def test_a_bias_read_only_by_batch_norm_needs_to_agree_only_after_its_mean():
    torch.manual_seed(7)
    model = randomize_norms(vgg()).eval()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5))
    collapse_(model, plan)
    shift = torch.randn(8)  # the norm subtracts its running mean: the same function
    with torch.no_grad():
        model[0].bias += shift
        model[1].running_mean += shift
    x = torch.randn(2, 3, 8, 8)
    thinner, report = thin(model, plan, x)
    assert report.max_diff <= 1e-5 * model(x).abs().max().item()
    assert routes(model)["0"].bias_norm == "1"
    relu_first = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.Flatten())
    assert routes(relu_first)["0"].bias_norm is None and routes(relu_first)["0"].norms == ("2",)


def test_thin_refuses_a_plan_for_another_model():
    torch.manual_seed(6)
    model = vgg()
    plan = cluster_filters(model, CSGDSpec(ratio=0.5))
    collapse_(model, plan)
    thinner, _ = thin(model, plan)
    with pytest.raises(SurgeryError, match=r"layer '0' has 4 output channels but the plan clusters 8"):
        thin(thinner, plan)


def test_count_macs_matches_a_hand_count():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    )
    model.train()
    expected = 6 * 6 * 8 * 3 * 9 + 4 * 4 * 8 * 4 * 9 + 128 * 10
    assert count_macs(model, torch.randn(1, 3, 6, 6)) == expected
    assert count_macs(model, torch.randn(3, 3, 6, 6)) == 3 * expected
    assert model.training  # the mode is restored
