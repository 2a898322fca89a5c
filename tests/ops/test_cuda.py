"""DKM on a CUDA device: the engine against the reference there and against the
CPU, and a training step with the parametrization (float32 and bfloat16 weights,
autocast). Skipped where torch sees no GPU (CI has none)."""

import pytest
import torch
from test_device_sizing import assert_same_run
from test_soft import GRADIENT_32, OUTPUT_32, assert_near, realistic_start, run
from test_table import run as run_table
from torch import nn

import dkm_param as dp
from dkm_param.ops import soft, table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("n, d, bits, settled", [(40_000, 1, 4, True), (40_000, 1, 4, False), (20_000, 1, 8, True),
                                                 (30_000, 1, 2, False), (10_000, 2, 4, False), (8_000, 4, 4, True)])
def test_engine_on_cuda_matches_reference_and_cpu(n, d, bits, settled):
    gen = torch.Generator().manual_seed(11)
    vectors = torch.randn(n, d, generator=gen) * 0.05
    codebook, tau, epsilon = realistic_start(vectors, 1 << bits)
    if settled:
        codebook, _ = soft.settle(vectors, codebook, tau, 300, epsilon / 4)
    cuda = (vectors.cuda(), codebook.cuda(), tau, 4, epsilon)
    ref = run(soft.soft_cluster_reference, *cuda)
    got = run(soft.soft_cluster, *cuda)
    cpu = run(soft.soft_cluster, vectors, codebook, tau, 4, epsilon)
    assert got[0].is_cuda and got[3].is_cuda and got[1].is_cuda
    assert got[2] == ref[2] == cpu[2]
    for want in (ref, tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in cpu)):
        assert_near(got[0], want[0], OUTPUT_32)
        assert_near(got[1], want[1], OUTPUT_32)
        assert_near(got[3], want[3], GRADIENT_32)


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_training_on_cuda(dtype, autocast):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).cuda().to(dtype)
    dp.register_dkm(model, dp.Policy(dp.LayerSpec(bits=4), small_layer_bits=None))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(8, 3, 16, 16, device="cuda", dtype=dtype)
    labels = torch.randint(0, 10, (8,), device="cuda")
    for _ in range(5):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    for module in model.modules():
        if hasattr(module, "parametrizations"):
            param = module.parametrizations.weight[0]
            assert param.codebook.is_cuda and torch.isfinite(param.codebook).all()
            assert module.parametrizations.weight.original.grad is not None
    compressed = dp.finalize(model)
    for module in (model[0], model[2], model[6]):
        assert module.weight.is_cuda and module.weight.unique().numel() <= 16
    assert compressed.summary() is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_table_on_cuda_matches_cpu(dtype):
    values = (torch.randn(300_000, generator=torch.Generator().manual_seed(4)) * 0.02).to(dtype)
    codebook, tau, epsilon = realistic_start(values.float()[:, None], 16)

    def cluster(v, c, t, m, e):
        grid = None if dtype != torch.float32 else table.value_grid(*torch.aminmax(v.detach()))
        return table.table_cluster(v, c, t, m, e, grid=grid)

    cpu = run_table(cluster, values, codebook, tau, 3, epsilon)
    got = run_table(cluster, values.cuda(), codebook.cuda(), tau, 3, epsilon)
    assert got[0].is_cuda and got[3].is_cuda
    assert_same_run([t.cpu() if isinstance(t, torch.Tensor) else t for t in got], cpu,
                    rounding=2 * torch.finfo(dtype).eps)
