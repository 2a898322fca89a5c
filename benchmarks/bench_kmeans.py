"""1-D k-means: dkm_param's sorted/prefix-sum engine against scikit-learn's KMeans, same data, same run.

    python benchmarks/bench_kmeans.py [--n 4000000] [--clusters 16 256] [--optimal-n 200000]

Prints time and inertia of each and the ratios (speed-up, inertia / scikit-learn's).
The exact dynamic-programming engine is timed on --optimal-n values (it is O(k n log n)).
"""

import argparse
import time

import torch
from sklearn.cluster import KMeans

from dkm_param.ops import kmeans


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000_000)
    parser.add_argument("--clusters", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--optimal-n", type=int, default=200_000)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(args.n, generator=gen) * 0.02  # float32, a layer's worth of weights
    print(f"torch threads: {torch.get_num_threads()}, n = {args.n:,} float32 values\n")
    print("| clusters | dkm_param | scikit-learn KMeans(n_init=1) | speed-up | inertia ratio (dkm_param / sklearn) |")
    print("| --- | --- | --- | --- | --- |")
    for k in args.clusters:
        (_, ours), t_ours = timed(lambda: kmeans.kmeans_1d(weights, k))
        model, t_sk = timed(lambda: KMeans(n_clusters=k, n_init=1, random_state=0).fit(weights.numpy().reshape(-1, 1)))
        print(
            f"| {k} | {t_ours:.2f} s | {t_sk:.2f} s | {t_sk / t_ours:.1f}x | {ours / model.inertia_:.5f} |", flush=True
        )
    small = weights[: args.optimal_n]
    print(f"\nExact optimal 1-D k-means on {args.optimal_n:,} values:\n")
    print("| clusters | optimal (DP) | dkm_param Lloyd | inertia Lloyd / optimal |")
    print("| --- | --- | --- | --- |")
    for k in args.clusters:
        (_, best), t_opt = timed(lambda: kmeans.kmeans_1d_optimal(small, k))
        (_, lloyd), t_lloyd = timed(lambda: kmeans.kmeans_1d(small, k))
        print(f"| {k} | {t_opt:.2f} s | {t_lloyd:.2f} s | {lloyd / best:.6f} |", flush=True)


if __name__ == "__main__":
    main()
