"""Per-tensor post-training palettization against coreai-opt, in the same run, on the same layers.

    python benchmarks/bench_peers.py [--config 134m] [--bits 4] [--layers 0] [--repeats 3]

The layers: every ``nn.Linear`` but ``lm_head`` of a ``bench_llm.py``
configuration (random init, float32; ``--layers N`` keeps the first N), each
called once by a small module so that both libraries see ordinary linear
layers. Each library palettizes a copy per tensor at ``--bits`` (dkm_param:
``palettize`` with ``fc:b/1``; coreai-opt: ``KMeansPalettizer`` with its
default per-tensor spec, ``prepare`` then ``finalize`` to dense torch
weights), each ``--repeats`` times on a fresh copy. Reported: the quickest
wall time of each and their ratio, and each one's squared
error against the float weights relative to the weights' own energy (lower
is better). coreai-opt is an optional peer (``pip install coreai-opt``),
never a dependency of dkm_param; without it only dkm_param is measured.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from bench_llm import build
from torch import nn

import dkm_param as dp


class Layers(nn.Module):
    """Calls each linear layer once on a row of ones, so a tracer sees every weight used."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return sum(layer(x.new_ones(1, layer.in_features)).sum() for layer in self.layers) * x.sum()


@torch.no_grad()
def relative_error(model: Layers, reference: Layers) -> float:
    error = sum(float((a.weight - b.weight).double().pow(2).sum()) for a, b in zip(model.layers, reference.layers))
    return error / sum(float(b.weight.double().pow(2).sum()) for b in reference.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="134m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each library, the quickest reported (the first pays one-time costs)")
    args = parser.parse_args()
    model, _ = build(args.config, torch.float32, torch.device("cpu"))
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    linears = linears[: args.layers] if args.layers else linears
    reference = Layers(linears).eval()
    weights = sum(layer.weight.numel() for layer in linears)
    print(f"{args.config}: {len(linears)} linear layers, {weights:,} weights, float32, {args.bits} bits per tensor; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    our_time = float("inf")
    for _ in range(args.repeats):
        ours = copy.deepcopy(reference)
        began = time.perf_counter()
        dp.palettize(ours, dp.Policy.from_notation(f"fc:{args.bits}/1", small_layer_bits=None))
        our_time = min(our_time, time.perf_counter() - began)
    rows = [("dkm_param", our_time, relative_error(ours, reference))]

    try:
        from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
        from coreai_opt.palettization.spec import PalettizationSpec
    except ImportError:
        print("coreai-opt is not installed: pip install coreai-opt to compare\n")
    else:
        from coreai_opt.common import ExportBackend

        spec = PalettizationSpec(n_bits=args.bits)
        config = KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig(op_state_spec={"weight": spec}))
        peer_time = float("inf")
        for _ in range(args.repeats):
            peer = copy.deepcopy(reference)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                began = time.perf_counter()
                palettizer = KMeansPalettizer(peer, config)
                palettizer.prepare(example_inputs=(torch.ones(1),))
                done = palettizer.finalize(backend=ExportBackend.Torch)
                peer_time = min(peer_time, time.perf_counter() - began)
        rows.append(("coreai-opt", peer_time, relative_error(done, reference)))

    print("| library | time | time vs dkm_param | relative squared error |")
    print("|---|---|---|---|")
    for name, took, error in rows:
        print(f"| {name} | {took:.2f} s | {took / our_time:.2f}x | {error:.5f} |")


if __name__ == "__main__":
    main()
