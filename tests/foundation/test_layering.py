"""The package's shape, checked from its source with `ast` (nothing is imported).

Layers, lowest first; a module may import its own layer (when no cycle results) or a lower one, never a
higher one:
    0  config, errors, _version, progress
    1  model
    2  data, kernels
    3  train, eval, infer
    4  serve, cli, demo, bench, api, and the package itself (loraforge/__init__.py)
Every `import` / `from ... import` of loraforge counts, at module level or inside a function, an `if` or a
`try`: a lazy import still ties the two modules together. There is no import cycle between modules, nor
between parts (two parts of one layer import each other one way at most). And a function fits a screen
(MAX_FUNCTION_LINES) unless a comment on the line above its `def` (or above its decorators), or a
docstring line starting "Long because" / "Long on purpose", says why it may not.

The tests are split by top-level part of the package (`-k data`, `-k model`), so each part's owner sees
their own failures; every failure names the file and line.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "loraforge"
ROOT = "__init__"  # the package itself, as a top-level part
LAYERS = {
    "config": 0, "errors": 0, "_version": 0, "progress": 0,
    "model": 1,
    "data": 2, "kernels": 2,
    "train": 3, "eval": 3, "infer": 3,
    "serve": 4, "cli": 4, "demo": 4, "bench": 4, "api": 4, ROOT: 4,
}
MAX_FUNCTION_LINES = 120
LONG_DOCSTRING = re.compile(r"^\s*long (because|on purpose)\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. loraforge.data.load
    target: str  # imported module (the nearest module when a name inside one is imported)
    where: str  # file:line of the import statement


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


@cache
def files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def trees() -> dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in files().items()}


def _nearest_module(name: str) -> str:
    """`loraforge.data.load.load_source` → `loraforge.data.load`: the longest prefix that is a module."""
    while name not in files() and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module named by a (possibly relative) `from X import`."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if files()[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports() -> tuple[Import, ...]:
    out = []
    for module, tree in trees().items():
        rel = files()[module].relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, node)
                # `from loraforge.data import cache` imports the module loraforge.data.cache
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files() else base for a in node.names]
            else:
                continue
            for name in names:
                if name == "loraforge" or name.startswith("loraforge."):
                    target = _nearest_module(name)
                    if target != module:
                        out.append(Import(module, target, f"{rel}:{node.lineno}"))
    return tuple(dict.fromkeys(out))  # `from x import a, b` is one import


def graph(level: str = "module") -> dict[str, dict[str, list[str]]]:
    """module → {imported module: where}, or with level="part" the same between top-level parts (data, eval, ...)."""
    name = (lambda m: m) if level == "module" else top_level
    edges: dict[str, dict[str, list[str]]] = {name(m): {} for m in files()}
    for imp in imports():
        if name(imp.source) != name(imp.target):
            edges[name(imp.source)].setdefault(name(imp.target), []).append(imp.where)
    for targets in edges.values():
        for where in targets.values():
            where.sort(key=lambda w: (w.rsplit(":", 1)[0], int(w.rsplit(":", 1)[1])))
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The groups of nodes that import each other, directly or not (strongly connected, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def describe(group: list[str], edges: dict[str, dict[str, list[str]]]) -> str:
    """Every import inside one cycle group: cutting enough of them breaks the cycle."""
    return f"{' <-> '.join(group)}:\n    " + "\n    ".join(
        f"{a} imports {b} ({', '.join(edges[a][b])})" for a in group for b in sorted(edges[a]) if b in group)


@dataclass(frozen=True)
class Function:
    name: str
    lines: int
    where: str
    excused: bool


def functions(module: str) -> list[Function]:
    path = files()[module]
    source = path.read_text(encoding="utf-8").splitlines()
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                above = source[first - 2].strip() if first >= 2 else ""
                doc = ast.get_docstring(child) or ""
                out.append(Function(f"{prefix}{child.name}", child.end_lineno - child.lineno + 1,
                                    f"{path.relative_to(SRC.parent)}:{child.lineno}",
                                    above.startswith("#") or bool(LONG_DOCSTRING.search(doc))))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(trees()[module], "")
    return out


PARTS = sorted({top_level(m) for m in files()})


def test_every_part_of_the_package_has_a_layer() -> None:
    unplaced = [p for p in PARTS if p not in LAYERS]
    assert not unplaced, f"place these top-level modules/packages in LAYERS (in {Path(__file__).name}): {unplaced}"


def test_the_checks_see_the_imports() -> None:
    # A parser that silently saw nothing would pass every check below.
    found = {(i.source, i.target) for i in imports()}
    assert ("loraforge.data.pipeline", "loraforge.data.load") in found
    assert ("loraforge.data.load", "loraforge.data.cache") in found  # from loraforge.data import cache
    assert any(t == "loraforge.config" for _, t in found)


@pytest.mark.parametrize("part", PARTS)
def test_no_import_from_a_higher_layer(part: str) -> None:
    bad = [f"{i.where}: {i.source} (layer {LAYERS.get(part)}) imports {i.target} "
           f"(layer {LAYERS.get(top_level(i.target))})"
           for i in imports() if top_level(i.source) == part
           and LAYERS.get(top_level(i.target), 0) > LAYERS.get(part, 0)]
    assert not bad, "imports from a higher layer:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("part", PARTS)
def test_no_import_cycle_between_modules(part: str) -> None:
    edges = graph("module")
    mine = [c for c in cycles(edges) if any(top_level(m) == part for m in c)]
    assert not mine, "import cycles:\n  " + "\n  ".join(describe(c, edges) for c in mine)


@pytest.mark.parametrize("part", PARTS)
def test_no_import_cycle_between_parts(part: str) -> None:
    # Parts of one layer may import each other one way only (eval -> infer, or infer -> eval, not both).
    edges = graph("part")
    mine = [c for c in cycles(edges) if part in c]
    assert not mine, "import cycles between parts:\n  " + "\n  ".join(describe(c, edges) for c in mine)


@pytest.mark.parametrize("part", PARTS)
def test_functions_fit_a_screen(part: str) -> None:
    long = [f"{f.where}: {f.name} is {f.lines} lines"
            for m in files() if top_level(m) == part for f in functions(m)
            if f.lines > MAX_FUNCTION_LINES and not f.excused]
    assert not long, (f"functions longer than {MAX_FUNCTION_LINES} lines with no comment saying why (a comment on "
                      "the line above the def, or a docstring line starting 'Long because'):\n  " + "\n  ".join(long))
