"""DKM under FSDP2: a Llama-style model trained by two ranks (gloo, CPU), against one process.

The ``bench_llm.py`` configuration (default ``134m``, bfloat16, every
``nn.Linear`` but ``lm_head`` at ``fc:4/1``) is built on each rank, DKM is
registered with ``process_group`` (each rank counts the values of its slice of
every weight; the counts are summed), then each decoder layer and the root are
wrapped with ``fully_shard``. Each rank trains on its half of every batch of
2 x 128 tokens, for ``--steps`` steps (SGD, lr 1e-4, momentum 0.9). One process
then trains the same model on the whole batches.

Reported: step time per rank (the least of the steps after the first), peak
memory per rank (peak RSS, restarted after the model is built), the largest
difference between the two ranks' codebooks (must be 0) and between the ranks'
and the single process's (relative to the codebooks' largest magnitude: the
gradient averaged over ranks equals the whole batch's up to the rounding of
bfloat16 parameters), and that ``finalize`` returns the same indices on both ranks.

Usage: python benchmarks/bench_fsdp.py [--config 134m] [--dtype bf16] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _rss import peak_rss, reset_peak
from bench_llm import BATCH, DTYPES, LR, MOMENTUM, build

RANKS = 2
MIB = 1 << 20


def codebooks(model) -> list[torch.Tensor]:
    from dkm_param.dkm.exportable import exportable_parametrizations

    return [param.codebook.detach().clone() for _, _, param in exportable_parametrizations(model)]


def train(model, tokens, rank: int, ranks: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        part = tokens[rank * BATCH // ranks : (rank + 1) * BATCH // ranks]
        model(input_ids=part, labels=part).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times


def policy():
    import dkm_param as dp

    return dp.Policy.from_notation("fc:4/1", small_layer_bits=None, skip=("lm_head",))


def rank_worker(rank: int, port: int, args, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dkm_param as dp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(args.threads)
    model, tokens = build(args.config, DTYPES[args.dtype], torch.device("cpu"))
    model.train()
    reset_peak()
    dp.register_dkm(model, policy(), process_group=dist.group.WORLD)
    mesh = init_device_mesh("cpu", (RANKS,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    times = train(model, tokens, rank, RANKS, args.steps)
    books = codebooks(model)
    compressed = dp.finalize(model)
    indices = {name: layer.indices for name, layer in compressed.layers.items()}
    torch.save({"times": times, "peak": peak_rss(), "books": books, "indices": indices},
               os.path.join(folder, f"{rank}.pt"))
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborts on a closed peer)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="134m")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (two ranks share the cores)")
    args = parser.parse_args()
    import dkm_param as dp

    with tempfile.TemporaryDirectory() as folder:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(rank_worker, args=(port, args, folder), nprocs=RANKS)
        ranks = [torch.load(os.path.join(folder, f"{rank}.pt")) for rank in range(RANKS)]

    torch.set_num_threads(args.threads)
    model, tokens = build(args.config, DTYPES[args.dtype], torch.device("cpu"))
    model.train()
    reset_peak()
    dp.register_dkm(model, policy())
    alone_times = train(model, tokens, 0, 1, args.steps)
    alone_peak = peak_rss()
    alone = codebooks(model)

    def largest(pairs) -> float:
        return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)

    scale = max(float(b.abs().max()) for b in alone)
    across = largest(zip(ranks[0]["books"], ranks[1]["books"]))
    versus = largest(zip(ranks[0]["books"], alone)) / scale
    same_indices = all(torch.equal(ranks[0]["indices"][k], ranks[1]["indices"][k]) for k in ranks[0]["indices"])
    print(f"{args.config} {args.dtype}, fc:4/1, {args.steps} steps of {BATCH} x {tokens.shape[1]} tokens, "
          f"{args.threads} thread(s) per process, torch {torch.__version__}")
    print()
    print("| run | step (least after the first) | peak memory (RSS) |")
    print("|---|---|---|")
    for rank, figures in enumerate(ranks):
        print(f"| FSDP2 rank {rank} of {RANKS} (half the batch) | {min(figures['times'][1:]):.2f} s "
              f"| {figures['peak'] / MIB:,.0f} MiB |")
    print(f"| one process (whole batch) | {min(alone_times[1:]):.2f} s | {alone_peak / MIB:,.0f} MiB |")
    print()
    print(f"codebooks, rank 0 against rank 1: largest difference {across:g} (identical: {across == 0})")
    print(f"codebooks, ranks against one process: largest difference {versus:.2e} of their largest magnitude")
    print(f"finalize: same indices on both ranks: {same_indices}")
    sys.exit(0 if across == 0 and same_indices else 1)


if __name__ == "__main__":
    main()
