"""The README's demo figures: ``dkm-param demo`` at its defaults, once per seed.

    python benchmarks/demo_seeds.py [--seeds 0 1 2]

Runs the demo's own function (``dkm_param.cli.demo.run_demo``) with its
defaults for each seed (the seed sets the data split, the initial weights
and the batches), and prints what the README shows: the demo's table for
the first seed, as ``dkm-param demo`` prints it, then a markdown table of
the held-out test accuracies of every seed.
"""

import argparse
import tempfile
import time

import torch

from dkm_param.cli.demo import run_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            start = time.perf_counter()
            result = run_demo(out, seed=seed, plot=False, log=None)
            results.append((seed, result, time.perf_counter() - start))
    first = results[0][1]
    print(f"dkm-param demo --seed {args.seeds[0]}:")
    print()
    print(first)
    print()
    float_row, dkm_row, palettized_row = first.rows
    print(
        f"dkm-param demo at its defaults, seeds {', '.join(map(str, args.seeds))}: held-out test accuracy on "
        f"{first.test_images} images; {dkm_row.ratio:.1f}x smaller than float32; "
        f"torch {torch.__version__}, 1 thread"
    )
    print()
    print(f"| seed | {float_row.model} | {dkm_row.model} | {palettized_row.model} | DKM - palettize | demo time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, result, seconds in results:
        float_accuracy, dkm_accuracy, palettized_accuracy = (row.accuracy for row in result.rows)
        print(
            f"| {seed} | {float_accuracy:.2f}% | {dkm_accuracy:.2f}% | {palettized_accuracy:.2f}% "
            f"| {dkm_accuracy - palettized_accuracy:+.2f} points | {seconds:.1f} s |"
        )


if __name__ == "__main__":
    main()
