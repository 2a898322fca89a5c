"""The package's layout rules: no import cycle, pure ops, a file layer without training code, one job a module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dkm_param"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every dkm_param module ``name`` imports when it runs, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # imports for type checkers only are not run, so they make no cycle
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def test_the_import_walk_sees_the_package():
    assert {"dkm_param.ops.soft", "dkm_param.format.reader", "dkm_param.dkm.finalize"} <= set(MODULES)
    assert "dkm_param.ops.layout" in GRAPH["dkm_param.format.layer"]
    assert "dkm_param.format" in GRAPH["dkm_param.dkm.finalize"]


def test_no_import_cycle_in_the_package():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_ops_imports_nothing_from_the_rest_of_the_package():
    for name in MODULES:
        if name.startswith("dkm_param.ops"):
            outside = {t for t in GRAPH[name] if not t.startswith("dkm_param.ops")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_file_code_imports_no_training_code():
    training = ("dkm_param.dkm", "dkm_param.posttrain", "dkm_param.filters", "dkm_param.cli")
    for name in MODULES:
        if name.startswith("dkm_param.format"):
            wrong = {t for t in GRAPH[name] if t.startswith(training) or t == "dkm_param"}
            assert not wrong, f"{name} imports {sorted(wrong)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_its_one_job_in_its_first_line(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc, f"{name} has no docstring"
    first = doc.splitlines()[0]
    assert first.strip() and first.rstrip().endswith("."), f"{name}: first line {first!r} is not a sentence"


def test_ruff_is_clean():
    ran = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks", "examples", "docs"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert "No module named ruff" not in ran.stderr, "ruff is part of the dev extra: pip install -e '.[dev]'"
    assert ran.returncode == 0, ran.stdout + ran.stderr


# What torch.compile and symbolic shapes pull in: over a second of start-up that `import dkm_param`
# (and so every dkm-param command) must not pay. Checked as modules, not seconds, so that a loaded
# machine cannot make the test flaky.
DEFERRED = ("torch._dynamo", "torch._inductor", "sympy", "matplotlib", "sklearn", "torchvision", "transformers")


def added_modules(code: str) -> str:
    """The modules of DEFERRED that ``code`` loads after ``import torch`` in a fresh interpreter, as printed."""
    probe = (
        "import sys, torch; before = set(sys.modules)\n"
        f"{code}\n"
        "added = set(sys.modules) - before\n"
        f"print(sorted(m for m in {DEFERRED!r} if m in added))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_import_does_not_load_the_compiler():
    assert added_modules("import dkm_param; from dkm_param import register_dkm, palettize, Policy") == "[]"


def test_import_costs_under_a_third_of_a_second_beyond_torch():
    # the least of three fresh interpreters; on a machine too loaded for 0.3 s, a quarter of torch's
    # own import (about 0.06 of it here) still tells the compiler or an extra was pulled in
    probe = (
        "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); import dkm_param; "
        "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(tuple(map(float, done.stdout.split())))
    torch_s, ours_s = min(runs, key=lambda run: run[1])
    assert ours_s < 0.3 or ours_s < 0.25 * torch_s, runs


def test_command_line_help_and_inspect_do_not_load_the_compiler(tmp_path):
    path = tmp_path / "m.safetensors"
    code = (
        "import contextlib, io, dkm_param as dp\n"
        "from dkm_param.cli import main\n"
        f"dp.palettize(torch.nn.Linear(64, 64), dp.Policy(small_layer_bits=None)).save({str(path)!r})\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0 and main(['inspect', '--help']) == 0\n"
        f"    assert main(['inspect', {str(path)!r}]) == 0"
    )
    assert added_modules(code) == "[]"


def test_the_compiler_is_loaded_when_dkm_is_registered():
    # forward gets torch.compiler.disable when the first parametrization is built, not at import
    code = (
        "import dkm_param as dp\n"
        "dp.register_dkm(torch.nn.Linear(64, 64), dp.Policy(small_layer_bits=None))\n"
        "assert dp.DKMParametrization.forward._torchdynamo_disable"
    )
    assert "torch._dynamo" in added_modules(code)


def test_module_docstring_names_the_entry_points_and_the_api_reference():
    import dkm_param

    doc = dkm_param.__doc__
    assert len(doc.splitlines()) > 5 and "docs/api.md" in doc
    for name in ("register_dkm", "finalize", "palettize", "load_compressed", "Policy", "LayerSpec"):
        assert f"``{name}" in doc and name in dkm_param.__all__, name


def test_install_hints_name_published_packages_and_the_extra_of_a_checkout():
    import tomllib

    from dkm_param.extras import EXTRAS, install_hint

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {name: tuple(extras[name]) for name in EXTRAS} == EXTRAS
    hint = install_hint("plots")
    assert hint.startswith("pip install 'matplotlib>=3.7'") and 'pip install -e ".[plots]"' in hint
    assert "dkm-param[" not in hint
    assert "pip install 'scikit-learn>=1.3' 'matplotlib>=3.7' 'tqdm>=4.60'" in install_hint("demo")


def test_the_library_works_without_numpy_and_says_what_to_coreml_needs(tmp_path):
    # numpy and coremltools are not dependencies: blocked, the core still imports, clusters, saves and loads
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['coremltools'] = None\n"
        "import torch, dkm_param as dp\n"
        "model = torch.nn.Sequential(torch.nn.Linear(64, 32))\n"
        "policy = dp.Policy.from_notation('fc:2/1', small_layer_bits=None)\n"
        f"path = dp.palettize(model, policy).save({str(tmp_path / 'm.safetensors')!r})\n"
        "fresh = dp.load_compressed(path, torch.nn.Sequential(torch.nn.Linear(64, 32)), keep_compressed=True)\n"
        "assert torch.equal(fresh[0].weight, model[0].weight)\n"
        "try:\n"
        "    dp.to_coreml(model, dp.read_compressed(path), (torch.zeros(1, 64),))\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "to_coreml needs coremltools" in done.stdout and "pip install 'coremltools>=8'" in done.stdout
