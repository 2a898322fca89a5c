"""A training step of a Llama-style language model with and without DKM on its linear layers.

Decoder models built from ``transformers.LlamaConfig`` with a random init
(nothing is downloaded), in float32 or bfloat16:

    134m: hidden 768,  12 layers, mlp 2048, 12 heads, vocab 32,000
    551m: hidden 1536, 16 layers, mlp 4096, 12 heads, vocab 32,000
    1.2b: hidden 2048, 16 layers, mlp 8192, 32 heads (8 key-value heads), vocab 128,256,
          the head tied to the embedding (Llama 3.2 1B's shape: 1.24B parameters)

(the first two untied, with as many key-value heads as heads; ``tiny``, not run
by default, is for trying the script out).
Input: 2 x 128 random token ids (fixed seed), the causal LM loss with the input
as labels, SGD with momentum 0.9 (lr 1e-4). DKM: every ``nn.Linear`` but
``lm_head`` at ``fc:b/1`` (``Policy.from_notation(f"fc:{b}/1",
small_layer_bits=None, skip=("lm_head",))``); the embedding is not clustered.

Each case (configuration x dtype x bits) runs in its own subprocess, so that
its peak memory is clean: it builds the model, times the plain step (a
warm-up step, then the least of ``--repeats`` steps), times ``register_dkm``,
then times the DKM step the same way, with a fresh optimizer. Reported: both
steps and their ratio; the extra peak memory of the DKM steps over the plain
steps', also as a multiple of the clustered weights' own bytes (the peak
during registration is printed below the table); the registration time, also
in plain steps; and the mean number of centroid iterations per layer in a
timed DKM step. Beside them, the targets: a DKM step within 2x the plain one,
extra peak memory within 1.25x the clustered weights' bytes, registration
within 3 plain steps.

Peak memory on the CPU is the process's peak RSS (VmHWM, what ``ru_maxrss``
reports, read from /proc/self/status so that a parent's footprint inherited at
exec does not set a floor): restarted from the current RSS through
/proc/self/clear_refs (after freed memory is handed back to the system) once
the model is built, before registration and before the DKM steps, so that
each phase's peak is its own. The worker runs under an address-space limit of
the memory then available, so that running out of memory is an error it
reports rather than the kernel's OOM killer. With ``--device cuda`` times are
wall time after a ``torch.cuda.synchronize``, and peak memory is
``torch.cuda.max_memory_allocated``, its peak statistics reset at the same
three points. With ``--threads 1 --cpu-time`` times are the worker's CPU time,
which another busy process on the machine disturbs far less (wall time with
two threads can be many times longer when the cores are shared). A case that
runs out of memory or past ``--timeout`` is reported as such, with what it
measured before.

Usage: python benchmarks/bench_llm.py [--configs 134m 551m 1.2b] [--dtypes fp32 bf16] [--bits 4 3]
       [--repeats 3] [--threads 2] [--cpu-time] [--device cpu|cuda] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _rss import peak_rss, reset_peak

# name: (hidden, layers, mlp, heads, key-value heads, vocab, head tied to the embedding)
CONFIGS = {
    "134m": (768, 12, 2048, 12, 12, 32_000, False),
    "551m": (1536, 16, 4096, 12, 12, 32_000, False),
    "1.2b": (2048, 16, 8192, 32, 8, 128_256, True),
}
TRY_OUT = {"tiny": (256, 2, 512, 4, 4, 1000, False)}  # not run by default
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCH, TOKENS, SEED = 2, 128, 0
LR, MOMENTUM = 1e-4, 0.9
# the targets
STEP_TARGET, MEMORY_TARGET, REGISTRATION_TARGET = 2.0, 1.25, 3.0
MIB = 1 << 20


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def build(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, mlp, heads, kv_heads, vocab, tied = {**CONFIGS, **TRY_OUT}[name]
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied, use_cache=False,
    )
    torch.manual_seed(SEED)
    with torch.device(device):  # built in place and in its dtype: no float32 copy on the host first
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, vocab, (BATCH, TOKENS), generator=gen).to(device)
    return model, tokens


def worker(case: dict) -> None:
    """Runs in the subprocess; prints one JSON line per phase measured, so that a case
    stopped by the timeout or out of memory still reports what it measured before."""
    import dkm_param as dp
    from dkm_param.ops import soft as ops_soft
    from dkm_param.ops import table as ops_table
    from dkm_param.policy import weight_of

    device = torch.device(case["device"])
    gpu = device.type == "cuda"
    torch.set_num_threads(case["threads"])

    def report(**figures) -> None:
        print(json.dumps(figures), flush=True)

    clock = time.process_time if case["cpu_time"] else time.perf_counter

    def finished() -> float:
        if gpu:  # a GPU runs asynchronously: time what it has finished
            torch.cuda.synchronize(device)
        return clock()

    def restart_peak() -> None:
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak()

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if gpu else peak_rss()

    iterations: list[int] = []

    def count(module, name):  # DKMParametrization.forward calls both engines through their modules
        engine = getattr(module, name)

        def counted(*args, **kwargs):
            out = engine(*args, **kwargs)
            iterations.append(out[2])
            return out

        setattr(module, name, counted)

    count(ops_soft, "soft_cluster")
    count(ops_table, "table_cluster")

    def steps(model, tokens) -> tuple[float, float, list[float]]:
        """(warm-up step, least of the timed steps, mean iterations per layer in each timed step)."""
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        times, per_layer = [], []
        for _ in range(1 + case["repeats"]):
            iterations.clear()
            began = finished()
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            times.append(finished() - began)
            per_layer.append(statistics.mean(iterations) if iterations else 0.0)
        return times[0], min(times[1:]), per_layer[1:]

    phase = "build"
    try:
        model, tokens = build(case["config"], DTYPES[case["dtype"]], device)
        model.train()
        report(parameters=sum(p.numel() for p in model.parameters()))
        phase = "plain"
        restart_peak()
        warmup, step, _ = steps(model, tokens)
        report(plain_warmup=warmup, plain=step, plain_peak=peak())
        phase = "registration"
        gc.collect()
        restart_peak()
        began = finished()
        plan = dp.register_dkm(model, dp.Policy.from_notation(f"fc:{case['bits']}/1", small_layer_bits=None,
                                                              skip=("lm_head",)))
        registration = finished() - began
        rows = plan.clustered()
        clustered = [weight_of(model.get_submodule(row.name)) for row in rows]
        report(registration=registration, registration_peak=peak(), layers=len(rows),
               clustered_weights=sum(w.numel() for w in clustered),
               clustered_bytes=sum(w.numel() * w.element_size() for w in clustered))
        phase = "DKM"
        restart_peak()
        warmup, step, per_layer = steps(model, tokens)
        report(dkm_warmup=warmup, dkm=step, dkm_peak=peak(), iterations=statistics.mean(per_layer))
    except Exception as exc:  # reported in the table: the other cases still run
        if is_out_of_memory(exc):
            report(failed=f"out of memory ({phase})")
        else:
            report(failed=f"{type(exc).__name__} ({phase}): {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        sys.exit(1)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def run_case(case: dict, timeout: float) -> dict:
    """One case in a fresh subprocess; its figures, with ``failed`` set if it did not finish."""
    gpu = case["device"].startswith("cuda")
    limit = available_bytes()

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # (CUDA reserves far more address space than it uses: a GPU run is not capped)
    cmd = [sys.executable, __file__, "--worker", json.dumps(case)]
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=None if gpu else cap)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr, code = "", None
    row = {"wall": time.perf_counter() - began}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row.update(json.loads(line))
    if code is None:
        row["failed"] = f"timed out after {timeout:.0f} s"
    elif code != 0 and "failed" not in row:
        if code == -9:
            row["failed"] = "killed (out of memory?)"
        else:
            tail = stderr.strip().splitlines()[-1:] or [f"exit status {code}"]
            row["failed"] = tail[0][:200]
    return row


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mark(value: float, target: float) -> str:
    return f"{value:.2f}x ({'ok' if value <= target else 'over'})"


def table_row(case: dict, r: dict) -> str:
    label = f"{case['config']} {case['dtype']} {case['bits']}-bit"
    if "parameters" in r:
        label += f" ({r['parameters'] / 1e6:,.0f}M params"
        label += f", {r['layers']} layers / {r['clustered_weights'] / 1e6:,.0f}M weights clustered)" \
            if "layers" in r else ")"
    cells = [label]
    cells.append(f"{r['plain']:.3f} s" if "plain" in r else "-")
    if "dkm" in r:
        cells += [f"{r['dkm']:.3f} s", mark(r["dkm"] / r["plain"], STEP_TARGET)]
        extra = r["dkm_peak"] - r["plain_peak"]
        cells += [f"{extra / MIB:,.0f} MiB", mark(extra / r["clustered_bytes"], MEMORY_TARGET)]
    else:
        cells += ["-"] * 4
    if "registration" in r:
        cells += [f"{r['registration']:.2f} s", mark(r["registration"] / r["plain"], REGISTRATION_TARGET)]
    else:
        cells += ["-"] * 2
    cells.append(f"{r['iterations']:.2f}" if "iterations" in r else "-")
    cells.append(r.get("failed", "done") + f" ({r['wall']:.0f} s)")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *TRY_OUT])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up one (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the workers (default: 2)")
    parser.add_argument("--cpu-time", action="store_true", help="time by the worker's CPU time (use with --threads 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a case may take (default: 1800)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available to torch")
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time measures the CPU: use it with --device cpu")
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)} (torch CUDA {torch.version.cuda})"
    memory = "peak allocated GPU memory" if device.type == "cuda" else "peak RSS"
    clock = "CPU" if args.cpu_time else "wall"
    print(f"{machine}; torch {torch.__version__}, {args.threads} threads, {clock} time, memory: {memory}")
    print(f"input {BATCH}x{TOKENS} tokens, SGD (lr {LR}, momentum {MOMENTUM}), least of {args.repeats} steps "
          f"after a warm-up one; load average {os.getloadavg()}", flush=True)
    cases = [
        {"config": config, "dtype": dtype, "bits": bits, "repeats": args.repeats, "threads": args.threads,
         "cpu_time": args.cpu_time, "device": str(device)}
        for config in args.configs for dtype in args.dtypes for bits in args.bits
    ]
    results = []
    try:
        for case in cases:
            print(f"measuring {case['config']} {case['dtype']} {case['bits']}-bit ...", flush=True)
            results.append(run_case(case, args.timeout))
            print(f"  {table_row(case, results[-1])}", flush=True)  # kept if a later case is interrupted
    except KeyboardInterrupt:  # the table of the cases measured so far
        print(f"interrupted: {len(cases) - len(results)} of {len(cases)} cases not measured", flush=True)
        cases = cases[:len(results)]
    print(f"load average after: {os.getloadavg()}\n")
    header = (
        f"| case | plain step | DKM step | DKM / plain (<= {STEP_TARGET:g}x) | extra peak memory "
        f"| extra / clustered weights' bytes (<= {MEMORY_TARGET:g}x) | registration "
        f"| registration / plain step (<= {REGISTRATION_TARGET:g}x) | DKM iterations per layer | outcome (wall) |"
    )
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for case, r in zip(cases, results):
        print(table_row(case, r))
    print("\nwarm-up step, plain / DKM: " + ", ".join(
        f"{c['config']} {c['dtype']} {c['bits']}-bit: {r['plain_warmup']:.2f} s / {r['dkm_warmup']:.2f} s"
        for c, r in zip(cases, results) if "dkm_warmup" in r))
    print("peak memory, plain steps / registration / DKM steps: " + ", ".join(
        f"{c['config']} {c['dtype']} {c['bits']}-bit: {r['plain_peak'] / MIB:,.0f} / "
        f"{r['registration_peak'] / MIB:,.0f} / {r['dkm_peak'] / MIB:,.0f} MiB"
        for c, r in zip(cases, results) if "dkm_peak" in r))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
