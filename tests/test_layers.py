"""The layer contract (.importlinter, docs/development.md): import-linter keeps it, every module
is placed in a layer, the import graph has no cycle (imports inside functions included), and a
function-local import is kept only where the command line loads a verb's modules lazily."""
import ast
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

LINT = Path(sys.executable).with_name("lint-imports")
# Function-local project imports allowed: the CLI's per-verb loading, and the kernels' launcher,
# compile check and benchmark (its fixed-tile rows), which import triton (a heavy optional
# dependency) only when used.
LAZY_OK = {"trainer.cli", "kernels", "kernels.compile_check", "kernels.bench"}


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / ".importlinter")], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_import_linter_keeps_every_contract():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Independent of scripts/import_graph.py: a module is on a cycle with ``m`` when each reaches
    the other (plain reachability by depth-first search)."""
    reach = {}
    for start in edges:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    comps = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in edges if m in reach[m]}
    return [set(c) for c in comps]


def test_no_cycles_counting_imports_inside_functions():
    graph = grimp.build_graph("trainer", "kernels")   # grimp reads every import statement
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert "trainer.train" in edges["trainer.cli"]   # a function-local import is in the graph
    assert _strongly_connected(edges) == []
    assert import_graph.report(ROOT, ROOT / ".importlinter", {})["cycles"] == []


def test_the_independent_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(edges) == [{"a", "b", "c"}]
    assert import_graph.cycles(edges) == [["a", "b", "c"]]


def test_every_module_is_in_a_layer():
    layers = import_graph.layers(ROOT / ".importlinter")
    assert len(layers) == len(import_graph.LAYER_NAMES)
    graph = grimp.build_graph("trainer", "kernels")
    unplaced = sorted(m for m in graph.modules if m not in ("trainer", "kernels")
                      and import_graph.layer_of(m, layers, {}) is None)
    assert unplaced == [], f"add these modules to a layer in .importlinter: {unplaced}"


def test_function_local_imports_only_where_documented():
    mods = import_graph.modules(ROOT)
    _, local = import_graph.imports(mods)
    offenders = {m: sorted(t) for m, t in local.items() if t and m not in LAZY_OK}
    assert offenders == {}
    # The allowed ones import downward only (no cycle through them: checked above).
    cli = ast.parse((ROOT / "trainer" / "cli.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "train" for n in ast.walk(cli))


@pytest.mark.parametrize("where, line", [
    ("trainer/model.py", "def _upward():\n    from .train import run\n"),                 # foundation -> run
    ("trainer/train.py", "def _by_name():\n    from .methods.eclipse import PREFIX\n"),   # run -> a method
    ("kernels/spec.py", "def _trainer():\n    from trainer import config\n"),              # kernels -> trainer
])
def test_the_contract_breaks_on_an_import_that_crosses_a_layer(tmp_path, where, line):
    """A copy of the tree with one bad import inside a function: lint-imports must fail on it."""
    for part in ("trainer", "kernels"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / where, "a") as fh:
        fh.write("\n\n" + line)
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "BROKEN" in proc.stdout and "0 broken" not in proc.stdout


def test_layers_in_the_contract_match_the_docs():
    cp = configparser.ConfigParser()
    cp.read(ROOT / ".importlinter")
    assert cp["importlinter:contract:layers"]["type"] == "layers"
    doc = (ROOT / "docs" / "development.md").read_text()
    for name in import_graph.LAYER_NAMES:
        assert name in doc, f"docs/development.md does not describe the layer {name!r}"
