"""The import graph of ``trainer`` and ``kernels``, against the layers in ``.importlinter``.

    python scripts/import_graph.py [ROOT] [--place MODULE=LAYER ...] [--json]

Counts every import statement, including those inside functions (they load the module all the
same, and hide cycles from a reader): modules, import edges, function-local edges, cycles
(strongly connected components of more than one module) and upward imports (an edge from a
module to a module of a higher layer). ``ROOT`` defaults to the repository; for an older tree,
``git worktree add /tmp/old REV`` and pass ``/tmp/old`` (``--place`` puts modules that the
current layers do not name, e.g. ``--place trainer.sweep=experiments``).
"""
from __future__ import annotations

import argparse
import ast
import configparser
import json
import sys
from pathlib import Path

PACKAGES = ("trainer", "kernels")
LAYER_NAMES = ("command line", "experiments", "the run", "methods", "foundation", "kernels")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges, local)``: every module's imports of project modules, and those made inside a
    function body."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:   # the longest project module it names
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
                    if id(node) in in_function:
                        local[name].add(target)
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def layers(config: Path) -> list[list[str]]:
    """The layers contract of an ``.importlinter`` file, highest first (each a list of modules)."""
    cp = configparser.ConfigParser()
    cp.read(config)
    lines = [ln.strip() for ln in cp["importlinter:contract:layers"]["layers"].splitlines() if ln.strip()]
    return [[m.strip() for m in ln.replace("|", ":").split(":")] for ln in lines]


def layer_of(module: str, stack: list[list[str]], placed: dict[str, int]) -> int | None:
    best, where = "", None
    for i, members in enumerate(stack):
        for m in members:
            if (module == m or module.startswith(m + ".")) and len(m) > len(best):
                best, where = m, i
    for m, i in placed.items():
        if (module == m or module.startswith(m + ".")) and len(m) > len(best):
            best, where = m, i
    return where


def report(root: Path, config: Path, placed: dict[str, int]) -> dict:
    mods = modules(root)
    edges, local = imports(mods)
    stack = layers(config)
    level = {m: layer_of(m, stack, placed) for m in mods}
    upward = sorted(f"{a} -> {b}" for a in mods for b in edges[a]
                    if level[a] is not None and level[b] is not None and level[b] < level[a])
    return {"modules": len(mods), "edges": sum(map(len, edges.values())),
            "function_local_edges": sum(map(len, local.values())),
            "cycles": cycles(edges), "upward_imports": upward,
            "unplaced": sorted(m for m in mods if level[m] is None and m not in PACKAGES)}


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=str(repo))
    p.add_argument("--config", default=str(repo / ".importlinter"), help="the layers contract (default: this repo's)")
    p.add_argument("--place", nargs="*", default=[], metavar="MODULE=LAYER",
                   help=f"layer of a module the contract does not name; LAYER one of: {', '.join(LAYER_NAMES)}")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    placed = {}
    for item in args.place:
        module, _, layer = item.partition("=")
        if layer not in LAYER_NAMES:
            print(f"error: --place {item}: the layer must be one of {', '.join(LAYER_NAMES)}", file=sys.stderr)
            return 2
        placed[module] = LAYER_NAMES.index(layer)
    r = report(Path(args.root), Path(args.config), placed)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"modules {r['modules']}, import edges {r['edges']} ({r['function_local_edges']} inside functions), "
          f"cycles {len(r['cycles'])} (largest: {max(map(len, r['cycles']), default=0)} modules), "
          f"upward imports {len(r['upward_imports'])}")
    for c in r["cycles"]:
        print("  cycle:", " ".join(c))
    for u in r["upward_imports"]:
        print("  upward:", u)
    if r["unplaced"]:
        print("  not in any layer:", " ".join(r["unplaced"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
