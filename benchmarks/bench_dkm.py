"""One DKM training step (forward and backward of the soft clustering): the
engine ``dkm_param.ops.soft.soft_cluster`` against the plain unrolled ``soft_cluster_reference``.

Each case runs each engine in its own subprocess, so that peak memory is clean:
"extra memory" is the growth of ``ru_maxrss`` over one forward+backward step
(on the CPU; the inputs are created, and the engine run once on 4096 vectors to set up
its libraries, before the first reading; freed memory is then handed back to
the system and the peak restarted from the current RSS through
/proc/self/clear_refs; the gradient buffer is part of the step). Time per step is
the least of ``--repeats`` steps run after that first one (``--ref-repeats`` for the reference, whose steps can take a
minute): the least disturbed by anything else on the machine.

The codebook and temperature are set up as the parametrization does:
k-means++ (``kmeans.init_codebook``), ``tau = 2 * mean squared distance to the
nearest centroid``, ``epsilon = 1e-3 * std``, at most 5 iterations; from such a
fresh codebook the iterations rarely stop early. The weights are normal with
std 0.05. Besides the engine-reference difference, each float32 result is
compared with the same step in float64.

With ``--threads 1 --cpu-time`` the times are the worker's CPU time, which
another busy process on the machine disturbs far less (wall time with two
threads can be many times longer when the cores are shared).

With ``--device cuda`` both run on the GPU: times are wall time after a
``torch.cuda.synchronize``, and "extra memory" is the growth of the GPU's
peak allocated memory over the step; a reference that runs out of GPU memory
is retried with fewer iterations, as on the CPU.

Usage: python benchmarks/bench_dkm.py [--cases NAME ...] [--repeats 5] [--ref-repeats 1]
       [--threads N] [--cpu-time] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from _rss import peak_rss, reset_peak

# name: (weights, bits, dim)
CASES = {
    "1M w, 4-bit, dim 1": (1_000_000, 4, 1),
    "1M w, 8-bit, dim 1": (1_000_000, 8, 1),
    "4M w, 4-bit, dim 1": (4_000_000, 4, 1),
    "1M w, 4-bit, dim 4": (1_000_000, 4, 4),
}
MAX_ITER = 5
SEED = 0


def make_inputs(weights: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights like a trained layer's (normal, std 0.05) and an upstream gradient, both (n, d)."""
    gen = torch.Generator().manual_seed(SEED)
    vectors = torch.randn(weights // dim, dim, generator=gen) * 0.05
    grad = torch.randn(weights // dim, dim, generator=gen)
    return vectors, grad


def setup(weights: int, bits: int, dim: int) -> dict:
    """The codebook, tau and epsilon that ``DKMParametrization`` would start from."""
    from dkm_param.ops import kmeans

    vectors, _ = make_inputs(weights, dim)
    codebook = kmeans.init_codebook(vectors, 1 << bits, "kmeans++", seed=0)
    tau = 2.0 * float(kmeans.squared_distance_to_nearest(vectors, codebook).mean())
    return {"codebook": codebook, "tau": tau, "epsilon": 1e-3 * float(vectors.std())}


def worker(case: str, engine: str, max_iter: int, repeats: int, setup_path: str, out_path: str) -> None:
    """Runs in the subprocess: one measured step, then ``repeats`` timed ones."""
    from dkm_param.ops import soft as ops_soft

    threads, cpu_time = int(os.environ.get("BENCH_THREADS", "0")), os.environ.get("BENCH_CPU_TIME") == "1"
    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    gpu = device.type == "cuda"
    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if cpu_time else time.perf_counter

    def finished() -> float:
        if gpu:  # a GPU runs asynchronously: time what it has finished
            torch.cuda.synchronize(device)
        return clock()

    weights, _, dim = CASES[case]
    vectors, grad = (t.to(device) for t in make_inputs(weights, dim))
    start = torch.load(setup_path)
    codebook = start["codebook"].to(device)
    fn = ops_soft.soft_cluster if engine == "engine" else ops_soft.soft_cluster_reference
    vectors.requires_grad_(True)

    def step():
        vectors.grad = None
        began = finished()
        soft, _, iterations = fn(vectors, codebook.clone(), start["tau"], max_iter, start["epsilon"])
        soft.backward(grad)
        return finished() - began, soft, iterations

    # a small call first, so that one-time library set-up is not counted as the step's memory
    small = vectors[:4096].detach().clone().requires_grad_(True)
    fn(small, codebook.clone(), start["tau"], max_iter, start["epsilon"])[0].sum().backward()
    del small
    if gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        first, soft, iterations = step()
        extra_kib = (torch.cuda.max_memory_allocated(device) - before) / 1024
    else:
        reset_peak()
        before = peak_rss()
        first, soft, iterations = step()
        extra_kib = (peak_rss() - before) // 1024
    torch.save({"soft": soft.detach().cpu(), "grad": vectors.grad.cpu()}, out_path)
    del soft
    times = [step()[0] for _ in range(repeats)]
    print(json.dumps({"first": first, "times": times, "extra_mib": extra_kib / 1024, "iterations": iterations}))


def float64_truth(case: str, max_iter: int, start: dict) -> dict:
    """The step in float64, by the engine (in the tests it matches the float64 reference
    to 1e-12; the float64 reference itself would not fit in memory at 8 bits)."""
    from dkm_param.ops import soft as ops_soft

    weights, _, dim = CASES[case]
    vectors, grad = (t.double() for t in make_inputs(weights, dim))
    vectors.requires_grad_(True)
    soft, _, _ = ops_soft.soft_cluster(vectors, start["codebook"].double(), start["tau"], max_iter, start["epsilon"])
    soft.backward(grad)
    return {"soft": soft.detach(), "grad": vectors.grad}


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def run_worker(case: str, engine: str, max_iter: int, repeats: int, setup_path: str, out_path: str) -> dict | None:
    """Runs one subprocess under an address-space limit, so that running out of memory
    is an error in that process rather than the kernel's OOM killer; None if it failed."""
    limit = available_bytes()

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # (CUDA reserves far more address space than it uses: a GPU run is not capped)
    gpu = os.environ.get("BENCH_DEVICE", "cpu").startswith("cuda")
    cmd = [sys.executable, __file__, "--worker", case, engine, str(max_iter), str(repeats), setup_path, out_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=None if gpu else cap)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"  {engine} failed at max_iter={max_iter}: {tail[0][:200]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(case: str, repeats: int, ref_repeats: int, tmp: str) -> dict:
    weights, bits, dim = CASES[case]
    setup_path = os.path.join(tmp, "setup.pt")
    torch.save(setup(weights, bits, dim), setup_path)
    row = {"case": case}
    # the reference at full depth first; if it does not fit, fewer iterations for both
    for max_iter in range(MAX_ITER, 0, -1):
        ref = run_worker(case, "reference", max_iter, ref_repeats, setup_path, os.path.join(tmp, "ref.pt"))
        if ref is not None:
            break
    eng = run_worker(case, "engine", max_iter, repeats, setup_path, os.path.join(tmp, "eng.pt"))
    a, b = torch.load(os.path.join(tmp, "ref.pt")), torch.load(os.path.join(tmp, "eng.pt"))
    truth = float64_truth(case, max_iter, torch.load(setup_path))
    for key in ("soft", "grad"):
        diff = (a[key] - b[key]).abs().max().item()
        row[f"d_{key}"] = diff
        row[f"r_{key}"] = diff / a[key].abs().max().item()
        scale = truth[key].abs().max().item()
        row[f"e_ref_{key}"] = (a[key].double() - truth[key]).abs().max().item() / scale
        row[f"e_eng_{key}"] = (b[key].double() - truth[key]).abs().max().item() / scale
    row.update(max_iter=max_iter, iterations=(ref["iterations"], eng["iterations"]))
    for name, res in (("ref", ref), ("eng", eng)):
        row[f"t_{name}"] = min(res["times"]) if res["times"] else res["first"]
        row[f"first_{name}"] = res["first"]
        row[f"m_{name}"] = res["extra_mib"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed engine steps after the measured one")
    parser.add_argument("--ref-repeats", type=int, default=1, help="timed reference steps after the measured one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by the worker's CPU time (use with --threads 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time measures the CPU: use it with --device cpu")
    os.environ["BENCH_THREADS"] = str(args.threads)
    os.environ["BENCH_CPU_TIME"] = "1" if args.cpu_time else "0"
    os.environ["BENCH_DEVICE"] = str(device)
    threads = args.threads or torch.get_num_threads()
    clock = "CPU" if args.cpu_time else "wall"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} threads"
    print(f"torch {torch.__version__}, {where}, {clock} time, load average {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            print(f"measuring {case} ...", flush=True)
            rows.append(measure(case, args.repeats, args.ref_repeats, tmp))
    print(f"load average after: {os.getloadavg()}\n")
    header = (
        "| case | iters ref/eng | time/step ref | engine | speedup | extra mem ref | engine | ratio "
        "| max abs diff out (rel) | max abs diff grad (rel) | float64 error out ref / eng | grad ref / eng |"
    )
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for r in rows:
        note = "" if r["max_iter"] == MAX_ITER else f" (max_iter={r['max_iter']}: the reference did not fit)"
        print(
            f"| {r['case']}{note} | {r['iterations'][0]}/{r['iterations'][1]} "
            f"| {r['t_ref']:.3f} s | {r['t_eng']:.3f} s | {r['t_ref'] / r['t_eng']:.1f}x "
            f"| {r['m_ref']:.0f} MiB | {r['m_eng']:.1f} MiB | {r['m_ref'] / max(r['m_eng'], 1e-9):.0f}x "
            f"| {r['d_soft']:.2e} ({r['r_soft']:.1e}) | {r['d_grad']:.2e} ({r['r_grad']:.1e}) "
            f"| {r['e_ref_soft']:.1e} / {r['e_eng_soft']:.1e} | {r['e_ref_grad']:.1e} / {r['e_eng_grad']:.1e} |"
        )
    print(
        "\n(rel): relative to the reference's largest magnitude. float64 error: the float32 result's\n"
        "largest difference from the same step in float64, relative to its largest magnitude."
    )
    print("\nfirst (memory-measured) step, ref / engine: " + ", ".join(
        f"{r['case']}: {r['first_ref']:.2f} s / {r['first_eng']:.2f} s" for r in rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        case, engine, max_iter, repeats, setup_path, out_path = sys.argv[2:8]
        worker(case, engine, int(max_iter), int(repeats), setup_path, out_path)
    else:
        main()
