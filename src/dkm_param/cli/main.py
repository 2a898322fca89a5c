"""The dkm-param command line: demo, inspect, decode, compress, plan.

Every command is a thin layer over the public API; failures the user can
fix (a bad file, model or policy) print one line to stderr and exit with
status 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import __version__
from ..dkm.finalize import finalize
from ..dkm.register import register_dkm
from ..errors import DKMError
from ..extras import install_hint
from ..format import read_compressed
from ..format.writer import write_safetensors
from ..policy import Policy
from ..posttrain.palettize import palettize
from ..tables import format_size, printable
from .inspect import facts, facts_text

PROG = "dkm-param"
EXIT_ERROR = 2


class CommandError(Exception):
    """A problem with the command line's own input (MODEL, --kwargs, --policy, paths)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the problem, or the help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        return args.command(args) or 0
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        _silence_stdout()
        return 1
    except (CommandError, DKMError, OSError, ModuleNotFoundError) as exc:
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compress PyTorch networks by weight clustering, and look inside the files.",
        epilog=f"Start with: {PROG} demo",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits, compress it with DKM and palettize, compare",
        description="Train a small CNN on scikit-learn's 8x8 digits, compress a copy with DKM fine-tuning "
        "and another with post-training palettization, and compare test accuracy and size. "
        f"Writes both .safetensors files and a plot. Needs scikit-learn and matplotlib: {install_hint('demo')}.",
    )
    demo.add_argument("--epochs", type=_positive, default=15, help="float training epochs (default 15)")
    demo.add_argument("--dkm-epochs", type=_positive, default=4, help="DKM fine-tuning epochs (default 4)")
    demo.add_argument(
        "--bits", type=int, default=2, choices=range(1, 9), metavar="1..8",
        help="bits of each index: a codebook of 2**bits vectors per layer (default 2)",
    )
    demo.add_argument(
        "--dim", type=int, default=4, choices=(1, 2, 4),
        help="weights per vector, each vector one index: bits/dim bits a weight (default 4: 2/4, half a bit)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed of the data split and training (default 0)")
    demo.add_argument("--out", type=Path, default=Path("dkm-demo"), help="output directory (default ./dkm-demo)")
    demo.add_argument("--quiet", action="store_true", help="print only the results table")
    demo.set_defaults(command=_demo)

    inspect = commands.add_parser(
        "inspect",
        help="show what a .safetensors file holds: layers, bits, sizes, ratio",
        description="Validate a dkm-param file and list its clustered layers (shape, bits, dim, codebook, "
        "groups, scales, sizes), the tensors stored plain, and the total compression.",
    )
    inspect.add_argument("file", type=Path, metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print the same facts as JSON")
    inspect.add_argument("--plot", type=Path, metavar="PNG", help="also save a plot of the largest layer and the sizes")
    inspect.set_defaults(command=_inspect)

    decode = commands.add_parser(
        "decode",
        help="write the decoded weights as a plain safetensors state_dict",
        description="Decode every clustered weight and write the whole state_dict as an ordinary "
        "safetensors file, loadable with safetensors.torch.load_file and model.load_state_dict.",
    )
    decode.add_argument("file", type=Path, metavar="FILE")
    decode.add_argument("out", type=Path, metavar="OUT")
    decode.add_argument(
        "--max-layer-bytes",
        type=_positive,
        default=_memory() // 4,
        metavar="N",
        help="refuse to decode a layer that needs more memory than this (default: a quarter of the RAM)",
    )
    decode.set_defaults(command=_decode)

    model_help = (
        "module:callable that builds the model, e.g. torchvision.models:resnet18 "
        "(called with --kwargs; random weights, nothing is downloaded unless the callable does)"
    )
    policy_help = (
        "policy in the paper's notation kind:bits/dim, e.g. 'cv:4/1, fc:4/2' (default 'cv:4/1, fc:4/1'), "
        "or a .json file holding Policy.to_dict()"
    )
    compress = commands.add_parser(
        "compress",
        help="build a model from Python, compress it and save the file",
        description="Build MODEL, load --weights into it if given, compress it with the policy and "
        "write a dkm-param file. To fine-tune with DKM, use the Python API.",
    )
    compress.add_argument("model", metavar="MODEL", help=model_help)
    compress.add_argument("--policy", default="cv:4/1, fc:4/1", help=policy_help)
    compress.add_argument("--out", type=Path, required=True, metavar="FILE", help="the .safetensors file to write")
    compress.add_argument(
        "--method",
        choices=("palettize", "dkm-snap"),
        default="palettize",
        help="palettize: post-training k-means (default); dkm-snap: register DKM and snap to its "
        "initial centroids, without training",
    )
    compress.add_argument(
        "--kwargs", default="{}", metavar="JSON", help="keyword arguments for MODEL, e.g. '{\"num_classes\": 10}'"
    )
    compress.add_argument(
        "--weights",
        type=Path,
        metavar="STATE_DICT",
        help="trained weights to load first: a state_dict in .safetensors or .pt",
    )
    compress.add_argument("--seed", type=int, default=0, help="torch seed before MODEL is built (default 0)")
    compress.add_argument(
        "--plot", type=Path, metavar="PNG", help="also save a plot of the largest layer and the sizes"
    )
    compress.add_argument("--quiet", action="store_true", help="do not print the summary")
    compress.set_defaults(command=_compress)

    plan = commands.add_parser(
        "plan",
        help="show which layers a policy would cluster, and why the others are skipped",
        description="Build MODEL and print the policy's plan for it, without changing anything.",
    )
    plan.add_argument("model", metavar="MODEL", help=model_help)
    plan.add_argument("--policy", default="cv:4/1, fc:4/1", help=policy_help)
    plan.add_argument(
        "--kwargs", default="{}", metavar="JSON", help="keyword arguments for MODEL, e.g. '{\"num_classes\": 10}'"
    )
    plan.set_defaults(command=_plan)

    export = commands.add_parser(
        "export",
        help="write a file's model for a runtime: a Core ML package or a torch.export program",
        description="Build MODEL, load FILE into it and write it for a runtime. coreml: convert it with "
        "coremltools to an ML program whose clustered weights are lookup tables of the file's codebooks and "
        "indices (converting works on Linux; running it needs macOS). torch: a torch.export program (.pt2) that "
        "keeps codebooks and packed indices and decodes them in the graph (about the file's size).",
    )
    export.add_argument("runtime", choices=("coreml", "torch"), help="coreml: a .mlpackage; torch: a .pt2 program")
    export.add_argument("file", type=Path, metavar="FILE")
    export.add_argument("model", metavar="MODEL", help=model_help)
    export.add_argument("--out", type=Path, required=True, metavar="PATH", help="the .mlpackage or .pt2 to write")
    export.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="[NAME=]SHAPE[:DTYPE]",
        help="an example input, e.g. 1x3x224x224 or input_ids=1x128:int64 (repeat for several; named ones are "
        "passed by keyword); floats are random normal, integers ones; dtypes: " + ", ".join(_INPUT_DTYPES),
    )
    export.add_argument(
        "--kwargs", default="{}", metavar="JSON", help="keyword arguments for MODEL, e.g. '{\"num_classes\": 10}'"
    )
    export.add_argument(
        "--strict", action="store_true", help="coreml: fail when a clustered layer cannot be a lookup table"
    )
    export.set_defaults(command=_export)
    return parser


# -- commands ----------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    start = time.perf_counter()
    result = run_demo(
        args.out,
        epochs=args.epochs,
        dkm_epochs=args.dkm_epochs,
        bits=args.bits,
        dim=args.dim,
        seed=args.seed,
        log=None if args.quiet else print,
    )
    if args.quiet:
        print(result)
        return 0
    print()
    print(result)
    print()
    for path in result.files.values():  # the table's size is the weights'; a file adds its metadata
        print(f"wrote {path} ({format_size(path.stat().st_size)} with the file's metadata)")
    print(f"done in {time.perf_counter() - start:.0f} s; next: {PROG} inspect {result.files['dkm']}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.plot:
        _check_plot(args.plot)
    compressed = read_compressed(args.file)  # validates everything first
    found = facts(args.file, compressed)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(facts_text(found))
    if args.plot:
        from .plots import plot_overview

        print(f"wrote {plot_overview(compressed, args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _decode(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.file.resolve():
        raise CommandError(f"OUT {args.out} is FILE itself; choose another path for the decoded weights")
    _check_writable("OUT", args.out)
    compressed = read_compressed(args.file)
    # a file can declare far more weights than it holds bytes: decode one layer at a time, each
    # only if it fits the memory allowed
    parts = {}
    for name, layer in compressed.layers.items():
        need = layer.numel * (layer.dtype.itemsize + 4)  # the weight, and decoding's float32 work
        if need > args.max_layer_bytes:
            raise CommandError(
                f"layer {name!r} ({'x'.join(map(str, layer.shape))} weights) needs {format_size(need)} to decode, "
                f"more than --max-layer-bytes {format_size(args.max_layer_bytes)}; raise it if the file is trusted"
            )
        parts[name] = (tuple(layer.shape), layer.dtype, layer.weight)
    for name, tensor in compressed.tensors.items():
        parts[name] = (tuple(tensor.shape), tensor.dtype, lambda t=tensor: t)
    for alias, target in compressed.aliases.items():  # safetensors stores every name apart
        parts[alias] = parts[target]
    # "format": "pt" marks a PyTorch state_dict for loaders that check it (e.g. transformers)
    write_safetensors(args.out, parts, {"format": "pt"})
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in parts.values())
    print(f"wrote {args.out}: {len(parts)} tensors, {format_size(total)} of weights")
    return 0


def _compress(args: argparse.Namespace) -> int:
    _check_writable("--out", args.out)
    if args.plot:
        _check_plot(args.plot)
    policy = _policy(args.policy)
    torch.manual_seed(args.seed)
    model = _build_model(args.model, args.kwargs)
    if args.weights:
        _load_weights(model, args.weights)
    plan = policy.plan(model)
    if not plan.clustered():
        raise CommandError(f"policy {args.policy!r} clusters no layer of {args.model}; see: {PROG} plan {args.model}")
    float_state = None
    if args.method == "palettize":
        compressed = palettize(model, policy, inplace=False)
        float_state = model.state_dict()
    else:
        if args.plot:
            float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        register_dkm(model, policy)
        model.eval()  # eval mode snaps each weight to its nearest centroid
        compressed = finalize(model)
    path = compressed.save(args.out)
    if not args.quiet:
        print(compressed.summary())
    print(f"wrote {path} ({format_size(path.stat().st_size)})")
    if args.plot:
        from .plots import plot_overview

        print(f"wrote {plot_overview(compressed, args.plot, weights=float_state)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    print(policy.plan(_build_model(args.model, args.kwargs)))
    return 0


def _export(args: argparse.Namespace) -> int:
    suffix = ".mlpackage" if args.runtime == "coreml" else ".pt2"
    if args.out.suffix != suffix:
        raise CommandError(f"--out {args.out}: a {args.runtime} export is written to a path ending in {suffix}")
    if not args.out.parent.is_dir():
        raise CommandError(f"--out {args.out}: directory {args.out.parent} does not exist; create it first")
    if args.runtime == "coreml" and importlib.util.find_spec("coremltools") is None:  # before any work
        raise CommandError(f"export coreml needs coremltools; install it with {install_hint('coreml')}")
    inputs = _example_inputs(args.input)
    compressed = read_compressed(args.file)
    model = _build_model(args.model, args.kwargs).eval()
    if args.runtime == "coreml":
        import warnings

        from ..deploy.coreml import to_coreml

        with warnings.catch_warnings():  # the layers left dense are in the report printed below
            warnings.filterwarnings("ignore", message=".*not the file's lookup tables in the Core ML program")
            result = to_coreml(model, compressed, inputs, path=args.out, strict=args.strict)
        print(result)
    else:
        from ..deploy.export import export_program, save_program

        save_program(export_program(model, compressed, inputs), args.out)
        print(f"wrote {args.out} ({format_size(args.out.stat().st_size)})")
    return 0


# -- inputs ------------------------------------------------------------------

_INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32}


def _example_inputs(specs: list[str]) -> tuple | dict:
    """Example inputs from ``[NAME=]SHAPE[:DTYPE]`` texts: a tuple, or a dict when they are named."""
    generator = torch.Generator().manual_seed(0)
    named: dict[str, torch.Tensor] = {}
    plain: list[torch.Tensor] = []
    for spec in specs:
        name, _, rest = spec.rpartition("=")
        shape_text, _, dtype_name = rest.partition(":")
        dtype = _INPUT_DTYPES.get(dtype_name or "float32")
        try:
            shape = tuple(int(size) for size in shape_text.split("x"))
        except ValueError:
            shape = ()
        if dtype is None or not shape or min(shape) < 1:
            raise CommandError(
                f"--input {spec!r} is not [NAME=]SHAPE[:DTYPE]; write e.g. 1x3x224x224 or input_ids=1x128:int64 "
                f"(dtypes: {', '.join(_INPUT_DTYPES)})"
            )
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
        else:
            tensor = torch.ones(shape, dtype=dtype)
        if name:
            named[name] = tensor
        else:
            plain.append(tensor)
    if named and plain:
        raise CommandError("--input: name all example inputs (NAME=SHAPE) or none of them")
    return named if named else tuple(plain)


def _build_model(target: str, kwargs_json: str) -> nn.Module:
    """Import ``module:callable`` and call it with the JSON keyword arguments."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"MODEL {target!r} is not module:callable; write e.g. torchvision.models:resnet18")
    kwargs = _kwargs(kwargs_json)
    if os.getcwd() not in sys.path:  # so that a model defined in ./mymodels.py is found
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"MODEL {target!r}: cannot import {module_name!r} ({exc})") from None
    except Exception as exc:  # the module itself failed while importing
        raise CommandError(f"MODEL {target!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            close = difflib.get_close_matches(part, [n for n in dir(factory) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CommandError(f"MODEL {target!r}: {module_name!r} has no attribute {attr!r}{hint}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise CommandError(
            f"MODEL {target!r}: {attr!r} is a {type(factory).__name__}, not a callable that builds a model"
        )
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: report it in one line, the way any other input problem is
        raise CommandError(
            f"MODEL {target!r}: calling it with --kwargs {kwargs_json} failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise CommandError(f"MODEL {target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict file into ``model``, naming what does not fit."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own errors for a bad header
            raise CommandError(f"--weights {path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # pickles of anything but tensors are refused by weights_only
            raise CommandError(
                f"--weights {path}: cannot read a state_dict from it ({type(exc).__name__}: {exc})"
            ) from None
    if not isinstance(state, dict):
        raise CommandError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # torch lists the missing, unexpected and mis-shaped keys
        first = str(exc).strip().splitlines()
        raise CommandError(
            f"--weights {path} does not fit MODEL: {' '.join(line.strip() for line in first[:4])}"
        ) from None


def _kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(
            f"--kwargs {text!r} is not valid JSON ({exc}); write e.g. '{{\"num_classes\": 10}}'"
        ) from None
    if not isinstance(kwargs, dict):
        raise CommandError(f"--kwargs must be a JSON object of keyword arguments, got {text!r}")
    return kwargs


def _policy(text: str) -> Policy:
    if text.endswith(".json"):
        path = Path(text)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CommandError(f"--policy {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CommandError(f"--policy {path}: must hold a JSON object (Policy.to_dict())")
        return Policy.from_dict(data)
    return Policy.from_notation(text)


def _check_writable(option: str, path: Path) -> None:
    """Fail before the work, not after it, when ``path`` cannot be written."""
    parent = path.parent
    if not parent.is_dir():
        raise CommandError(f"{option} {path}: directory {parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise CommandError(f"{option} {path} is a directory; give a file name")


def _check_plot(path: Path) -> None:
    """Fail before the work when the --plot file cannot be written or matplotlib is not installed."""
    _check_writable("--plot", path)
    from .plots import require_matplotlib

    require_matplotlib()


def _memory() -> int:
    """Bytes of physical memory (8 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


# -- errors ------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """The error as one printable line: messages can quote names from a hostile file."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return printable(f"{exc.filename}: {exc.strerror}")
    return printable(str(exc))


def _silence_stdout() -> None:
    """Point stdout at devnull so Python's exit-time flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
