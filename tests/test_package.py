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
