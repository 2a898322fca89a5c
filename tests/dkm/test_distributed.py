"""DKM under torch.distributed: DDP and FSDP2 (``fully_shard``), two gloo processes on the CPU.

Each rank trains on its half of every batch; the codebooks must be the same
on both ranks and match one process training on the whole batches.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dkm_param as dp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

RANKS, STEPS = 2, 3


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).to(dtype)


def _train(model: nn.Module, rank: int, ranks: int, dtype: torch.dtype) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 16, generator=gen).to(dtype), torch.randn(8, 8, generator=gen).to(dtype)
        optimizer.zero_grad()
        ((model(x[rank::ranks]) - y[rank::ranks]).float() ** 2).mean().backward()
        optimizer.step()


def _codebooks(model: nn.Module) -> list[torch.Tensor]:
    return [m.parametrizations.weight[0].codebook.clone() for m in model.modules() if isinstance(m, nn.Linear)]


def _worker(rank, port, mode, dtype, share_counts, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)
    try:
        model = _net(dtype)
        group = dist.group.WORLD if share_counts else None
        dp.register_dkm(model, dp.Policy.from_notation("fc:3/1", small_layer_bits=None), process_group=group)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (RANKS,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        _train(wrapped, rank, RANKS, dtype)
        books = _codebooks(model)
        compressed = dp.finalize(model)
        indices = {name: layer.indices for name, layer in compressed.layers.items()}
        torch.save({"books": books, "indices": indices}, os.path.join(folder, f"{rank}.pt"))
        if rank == 0:
            compressed.save(os.path.join(folder, "model.safetensors"))
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts on a closed peer)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, dtype, share_counts",
    [("ddp", torch.float32, False), ("ddp", torch.bfloat16, True), ("fsdp2", torch.float32, False),
     ("fsdp2", torch.bfloat16, True)],
)
def test_ranks_hold_the_codebooks_one_process_would(tmp_path, mode, dtype, share_counts):
    mp.spawn(_worker, args=(_free_port(), mode, dtype, share_counts, str(tmp_path)), nprocs=RANKS)
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in range(RANKS))
    for a, b in zip(first["books"], second["books"]):
        assert torch.equal(a, b)
    assert first["indices"].keys() == second["indices"].keys()
    for name in first["indices"]:
        assert torch.equal(first["indices"][name], second["indices"][name])

    fresh = _net(dtype)
    dp.load_compressed(tmp_path / "model.safetensors", fresh)
    for layer in (fresh[0], fresh[2]):
        assert layer.weight.dtype == dtype and torch.unique(layer.weight).numel() <= 8

    alone = _net(dtype)
    dp.register_dkm(alone, dp.Policy.from_notation("fc:3/1", small_layer_bits=None))
    _train(alone, 0, 1, dtype)
    # the gradient averaged over ranks is the whole batch's, up to the rounding of the parameters' dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(first["books"], _codebooks(alone)):
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance * float(want.abs().max()))
