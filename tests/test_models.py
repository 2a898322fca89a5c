"""End to end on torchvision architectures (random init): register, train, finalize, save, load."""

import pytest
import torch
import torchvision
from torch import nn

import dkm_param as dp

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_train_finalize_save_load_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    plan = dp.register_dkm(model, dp.Policy.from_notation("cv:4/1, fc:4/1"))
    assert len(plan.clustered()) > 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # random-init nets have gradients in the thousands
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

    model.eval()
    compressed = dp.finalize(model)
    assert len(compressed.layers) == len(plan.clustered())
    path = compressed.save(tmp_path / f"{arch}.safetensors")
    fresh = getattr(torchvision.models, arch)(num_classes=10).eval()
    dp.load_compressed(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for name, layer in compressed.layers.items():
        assert torch.unique(fresh.state_dict()[name]).numel() <= layer.spec.clusters
