"""The import graph of `flashctl`: no cycle, and no module imports one from a higher floor.

Floors, lowest first (design §7; issue 13):

0. ground: errors, io, term, spec, yamlio, flow, system, progress, images, stats, findings, pipelines
1. worlds and stores: shapes, data, models, track, mlflow_server
2. jobs: distill, launch, evaluate, teacher, plan
3. grids: ablate, report
4. cli

Every import counts, module level or inside a function (a lazy import still ties the two
modules together). Run as a script to print the graph: `python tests/test_layers.py`.

`KNOWN_CYCLES` / `KNOWN_UPWARD` are the violations open work removes (issue 13 items 2 and 4):
the tests fail on any other, and the lists should only ever shrink.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flashctl"

FLOORS: dict[str, int] = {
    **dict.fromkeys(("errors", "io", "term", "spec", "yamlio", "flow", "system", "progress", "images",
                     "stats", "findings", "pipelines", "__init__"), 0),
    **dict.fromkeys(("shapes", "data", "models", "track", "mlflow_server"), 1),
    **dict.fromkeys(("distill", "launch", "evaluate", "teacher", "plan"), 2),
    **dict.fromkeys(("ablate", "report"), 3),
    "cli": 4,
}

KNOWN_CYCLES: list[list[str]] = []
KNOWN_UPWARD: list[tuple[str, str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """`flashctl.x.y` -> its file, for every module of the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The flashctl modules `name` imports (`from pkg import sub` counts the submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import flashctl.a.b` of a module's attribute
                t = t.rpartition(".")[0]
            if t and t != name and t != "flashctl":
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def floor(name: str) -> int | None:
    """The floor of `flashctl.<top>...` (None: a module the table does not place)."""
    top = name.split(".")[1] if "." in name else "__init__"
    return FLOORS.get(top)


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) where the imported module lives on a higher floor."""
    return sorted((a, b) for a, deps in g.items() for b in deps
                  if floor(a) is not None and floor(b) is not None and floor(b) > floor(a))


def test_every_module_has_a_floor():
    assert [m for m in graph() if floor(m) is None] == []


def test_no_import_cycle():
    assert [c for c in cycles(graph()) if c not in KNOWN_CYCLES] == []


def test_no_module_imports_from_a_higher_floor():
    assert [e for e in upward(graph()) if e not in KNOWN_UPWARD] == []


if __name__ == "__main__":
    g = graph()
    for name in sorted(g):
        print(f"{name} [{floor(name)}]: {', '.join(sorted(g[name])) or '-'}")
    print("\ncycles:", cycles(g) or "none")
    print("upward imports:", upward(g) or "none")
    print("unplaced:", [m for m in g if floor(m) is None] or "none")
