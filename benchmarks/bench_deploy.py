"""From the file to a runtime: Core ML package and torch.export program sizes, and a model kept compressed in memory.

    python benchmarks/bench_deploy.py [--models resnet18 mobilenetv2 llama551m] [--repeats 3] [--threads 2]
        [--cpu-time] [--skip coreml pt2] [--out benchmarks/out/deploy] [--timeout 3600]

Models, random init (nothing is downloaded), palettized at 4 bits with
``dp.palettize`` (``cv:4/1, fc:4/1``, torch's float32):

    resnet18, mobilenetv2: torchvision, 1 x 3 x 224 x 224 input (the paper's
        small-layer rule: layers under 10,000 weights at 8 bits);
    llama551m: ``transformers.LlamaConfig`` hidden 1536, 16 layers, mlp 4096,
        12 heads, vocab 32,000 (benchmarks/bench_llm.py's 551m), every linear
        layer clustered (the head too), the embedding kept float; input
        2 x 128 token ids and an attention mask;
    tiny (not run by default): a 2-layer llama, to try the script out.

The palettized files are cached in ``--out`` (palettizing the 551M model
takes minutes). Each measurement runs in its own subprocess, so that its
memory is its own:

- ``.mlpackage``: ``dp.to_coreml`` (iOS 18, float32), its size on disk, and how
  many clustered layers are lookup tables in it;
- ``.pt2``: ``dp.export_program`` then ``dp.save_program`` (``torch.export.save``
  with the graph's JSON deflated; the size ``torch.export.save`` itself gives
  is printed under the table); under the table,
  the part of it that is graph and metadata rather than tensors, and the
  same for a plain ``torch.export`` of the float model (the architecture's
  own graph, which no weight compression makes smaller);
- resident memory: the process's RSS once the model is loaded (decoded with
  ``load_compressed``, or with ``keep_compressed=True``), over its RSS before
  the model was built, after freed memory is handed back to the system; and
  the peak RSS over the same base while forward runs. The model is built
  with its own random weights first and then loaded, as a user would. This
  is measured the second time the model is built, loaded and run in the
  process (the first is deleted and its memory handed back): the first
  time also pages in the code that building, loading and running use (a
  few MiB, the same for both ways of loading), which is not the model's;
  that first figure is printed under the table;
- forward time: both models loaded in one process, their forwards
  alternated (a warm-up each, then ``--repeats``), the least time of each.
  On a machine whose cores other processes share, use ``--threads 1
  --cpu-time``: two threads contending for busy cores can make a forward
  a hundred times slower (MobileNetV2: 4 s instead of 40 ms), at random.

Targets (the issue's): ``.mlpackage`` and ``.pt2`` within 10% of the file; the
model kept compressed resident in at most 1.3x the file plus its largest
decoded layer; its forward within 1.5x the decoded model's on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _rss import peak_rss, reset_peak
from bench_llm import cpu_model

MODELS = ("resnet18", "mobilenetv2", "llama551m")
TRY_OUT = ("tiny",)
LLAMAS = {"llama551m": (1536, 16, 4096, 12, 32_000), "tiny": (256, 2, 512, 4, 1000)}
SEED = 0
SIZE_TARGET, MEMORY_TARGET, TIME_TARGET = 1.10, 1.3, 1.5
MIB = 1 << 20


def build(name: str):
    """The model (random init, eval mode) and its example inputs (a tuple or a dict of keyword arguments)."""
    torch.manual_seed(SEED)
    if name in LLAMAS:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, layers, mlp, heads, vocab = LLAMAS[name]
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
                             num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                             tie_word_embeddings=False, use_cache=False)
        model = LlamaForCausalLM(config).eval()
        tokens = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(SEED))
        return model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    import torchvision

    factory = {"resnet18": torchvision.models.resnet18, "mobilenetv2": torchvision.models.mobilenet_v2}[name]
    return factory(weights=None).eval(), (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED)),)


def policy(name: str):
    import dkm_param as dp

    if name in LLAMAS:
        return dp.Policy.from_notation("fc:4/1", small_layer_bits=None)
    return dp.Policy.from_notation("cv:4/1, fc:4/1")


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def split(inputs) -> tuple[tuple, dict]:
    return ((), inputs) if isinstance(inputs, dict) else (inputs, {})


def tensor_bytes(program) -> int:
    """Bytes of the tensors an ExportedProgram holds (its parameters, buffers and constants)."""
    tensors = {id(t): t for t in [*program.state_dict.values(), *program.constants.values()] if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def worker(case: dict) -> None:
    """Runs in the subprocess; prints one JSON line per figure measured."""
    import dkm_param as dp
    from dkm_param.deploy import export_program, to_coreml

    torch.set_num_threads(case["threads"])
    clock = time.process_time if case["cpu_time"] else time.perf_counter
    name, phase, out = case["model"], case["phase"], Path(case["out"])
    file = out / f"{name}.safetensors"

    def report(**figures) -> None:
        print(json.dumps(figures), flush=True)

    if phase == "prepare":
        if not file.exists():
            model, _ = build(name)
            began = clock()
            dp.palettize(model, policy(name)).save(file)
            report(palettize=clock() - began)
        compressed = dp.read_compressed(file)
        largest = max(layer.numel * layer.dtype.itemsize for layer in compressed.layers.values())
        model, _ = build(name)
        report(file=file.stat().st_size, layers=len(compressed.layers), largest=largest,
               parameters=sum(p.numel() for p in model.parameters()))
    elif phase == "coreml":
        import warnings

        model, inputs = build(name)
        path = out / f"{name}.mlpackage"
        shutil.rmtree(path, ignore_errors=True)
        began = clock()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = to_coreml(model, dp.read_compressed(file), inputs, path=path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        report(mlpackage=size, coreml_time=clock() - began, lut_layers=len(result.palettized),
               dense_layers=len(result.unrepresented))
    elif phase == "pt2":
        model, inputs = build(name)
        path = out / f"{name}.pt2"
        began = clock()
        program = export_program(model, dp.read_compressed(file), inputs)
        dp.save_program(program, path)
        report(pt2=path.stat().st_size, pt2_time=clock() - began, pt2_graph=path.stat().st_size - tensor_bytes(program))
        torch.export.save(program, path)  # the same program as torch.export.save writes it: its graph uncompressed
        report(pt2_torch=path.stat().st_size)
        # the same architecture exported plainly, float weights and all: what its graph alone takes in a .pt2
        dp.load_compressed(file, model)
        plain = torch.export.export(model, *split(inputs))
        torch.export.save(plain, out / f"{name}.plain.pt2")
        report(plain_graph=(out / f"{name}.plain.pt2").stat().st_size - tensor_bytes(plain))
        (out / f"{name}.plain.pt2").unlink()
        del plain
        try:
            from executorch.exir import to_edge
        except ImportError:
            return
        pte = to_edge(program).to_executorch()
        (out / f"{name}.pte").write_bytes(pte.buffer)
        report(pte=len(pte.buffer))
    elif phase in ("decoded", "compressed"):
        with torch.device("meta"):  # imports what building needs, and allocates nothing
            build(name)
        keep = phase == "compressed"
        for attempt in ("cold", "warm"):
            reset_peak()
            base = current_rss()
            model, inputs = build(name)
            dp.load_compressed(file, model, keep_compressed=keep)
            reset_peak()  # hands freed memory back first: the random weights the load replaced
            resident = current_rss() - base
            forward(model, inputs)
            peak = peak_rss() - base
            del model, inputs
            if attempt == "cold":  # counts the code the first build, load and forward page in
                report(**{f"{phase}_cold_rss": resident})
        report(**{f"{phase}_rss": resident, f"{phase}_peak": peak})
    elif phase == "timing":
        decoded, inputs = build(name)
        dp.load_compressed(file, decoded)
        kept, _ = build(name)
        dp.load_compressed(file, kept, keep_compressed=True)
        times = {"decoded_time": [], "compressed_time": []}
        for _ in range(1 + case["repeats"]):
            for key, model in (("decoded_time", decoded), ("compressed_time", kept)):
                began = clock()
                forward(model, inputs)
                times[key].append(clock() - began)
        report(**{key: min(values[1:]) for key, values in times.items()})


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def run_case(case: dict, timeout: float) -> dict:
    """One measurement in a fresh subprocess; its figures, with ``failed`` set if it did not finish."""
    limit = available_bytes()

    def cap():  # running out of memory is an error the worker reports, not the OOM killer's
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, __file__, "--worker", json.dumps(case)]
    row: dict = {}
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr, code = "", None
    for line in stdout.splitlines():
        if line.startswith("{"):
            row.update(json.loads(line))
    wall = time.perf_counter() - began
    if code is None:
        row["failed"] = f"{case['phase']}: timed out after {timeout:.0f} s"
    elif code != 0:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [f"exit status {code}"]
        row["failed"] = f"{case['phase']}: " + ("killed (out of memory?)" if code == -9 else tail[0][:200])
    row[f"{case['phase']}_wall"] = wall
    return row


def ratio(value: float, reference: float, target: float) -> str:
    return f"{value / reference:.2f}x ({'ok' if value / reference <= target else 'over'})"


def mib(value: float) -> str:
    return f"{value / MIB:,.1f} MiB"


def table_row(name: str, r: dict) -> str:
    cells = [f"{name} ({r['parameters'] / 1e6:,.1f}M params, {r['layers']} layers)" if "parameters" in r else name]
    file = r.get("file")
    cells.append(mib(file) if file else "-")
    for key in ("mlpackage", "pt2"):
        cells.append(f"{mib(r[key])}, {ratio(r[key], file, SIZE_TARGET)}" if key in r and file else "-")
    budget = MEMORY_TARGET * file + r["largest"] if file else None
    cells.append(mib(r["decoded_rss"]) if "decoded_rss" in r else "-")
    if "compressed_rss" in r and budget:
        cells.append(f"{mib(r['compressed_rss'])} ({'ok' if r['compressed_rss'] <= budget else 'over'})")
    else:
        cells.append("-")
    cells.append(mib(budget) if budget else "-")
    peaks = [mib(r[k]) if k in r else "-" for k in ("decoded_peak", "compressed_peak")]
    cells.append(" / ".join(peaks))
    if "decoded_time" in r:
        cells += [f"{r['decoded_time']:.3f} s", f"{r['compressed_time']:.3f} s",
                  ratio(r["compressed_time"], r["decoded_time"], TIME_TARGET)]
    else:
        cells += ["-"] * 3
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *TRY_OUT])
    parser.add_argument("--skip", nargs="*", default=[], choices=["coreml", "pt2", "memory", "timing"],
                        help="measurements to leave out")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after a warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the workers (default: 2)")
    parser.add_argument("--cpu-time", action="store_true", help="time by the worker's CPU time")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "deploy",
                        help="where the files, packages and programs are written (the files are reused)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one measurement may take")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        from importlib.metadata import version

        coreml = f"coremltools {version('coremltools')}"
    except ImportError:
        coreml = "no coremltools"
    clock = "CPU" if args.cpu_time else "wall"
    print(f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {coreml}, {args.threads} threads, "
          f"{clock} time; load average {os.getloadavg()}", flush=True)
    phases = ["prepare", "coreml", "pt2", "decoded", "compressed", "timing"]
    skipped = set(args.skip) | ({"decoded", "compressed"} if "memory" in args.skip else set())
    results = {}
    for name in args.models:
        row: dict = {}
        for phase in phases:
            if phase in skipped:
                continue
            print(f"{name}: {phase} ...", flush=True)
            case = {"model": name, "phase": phase, "out": str(args.out), "threads": args.threads,
                    "cpu_time": args.cpu_time, "repeats": args.repeats}
            figures = run_case(case, args.timeout)
            if "failed" in figures:
                print(f"  {figures['failed']}", flush=True)
                row.setdefault("failures", []).append(figures.pop("failed"))
            row.update(figures)
            if phase == "prepare" and "file" not in row:
                break
        results[name] = row
    print(f"load average after: {os.getloadavg()}\n")
    header = (
        f"| model | file | .mlpackage (<= {SIZE_TARGET:g}x file) | .pt2 (<= {SIZE_TARGET:g}x file) | resident, decoded "
        f"| resident, kept compressed | {MEMORY_TARGET:g}x file + largest layer | peak in forward, decoded / kept "
        f"| forward, decoded | forward, kept compressed | kept / decoded (<= {TIME_TARGET:g}x) |"
    )
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for name, r in results.items():
        print(table_row(name, r))
    print()
    for name, r in results.items():
        notes = []
        if "lut_layers" in r:
            notes.append(f"Core ML: {r['lut_layers']} of {r['layers']} clustered layers as lookup tables, "
                         f"{r['dense_layers']} dense, converted in {r['coreml_time']:.0f} s")
        if "pt2_graph" in r:
            notes.append(f".pt2 graph and metadata {mib(r['pt2_graph'])} (a plain torch.export of the float "
                         f"model: {mib(r['plain_graph'])}), tensors {mib(r['pt2'] - r['pt2_graph'])}"
                         if "plain_graph" in r else f".pt2 graph and metadata {mib(r['pt2_graph'])}")
        if "pt2_torch" in r:
            notes.append(f"torch.export.save of the same program (graph uncompressed) {mib(r['pt2_torch'])} "
                         f"({r['pt2_torch'] / r['file']:.2f}x file)")
        if "pte" in r:
            notes.append(f"ExecuTorch .pte {mib(r['pte'])} ({r['pte'] / r['file']:.2f}x file)")
        if "decoded_cold_rss" in r and "compressed_cold_rss" in r:
            notes.append(f"resident the first time in the process (code paged in counted): decoded "
                         f"{mib(r['decoded_cold_rss'])}, kept compressed {mib(r['compressed_cold_rss'])}")
        if "palettize" in r:
            notes.append(f"palettized in {r['palettize']:.0f} s")
        notes += r.get("failures", [])
        if notes:
            print(f"{name}: " + "; ".join(notes))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
