"""The package's layering (DESIGN.md §3) as a test: the import graph of ``lib/ctrlgen`` read with ``ast``.

Layers, each importing only from its own layer or the layers above it in this list:

1. ``config``, ``paths``, ``results``, ``thesis``, ``seeding``, ``runtime``, ``progress``,
   ``result_cache``, ``figures``, ``profiles``, ``parallel`` (and the package's own ``__init__``)
2. ``data``
3. ``models``
4. ``attention``
5. ``guidance``, ``inversion``, ``sampling``, ``training``
6. ``methods``
7. ``metrics``, ``analysis``, ``downstream`` (``analysis`` and ``downstream`` may import ``metrics``, not the reverse)
8. ``experiments`` (a chapter's module may import the shared ``experiments.base_models``, never another
   chapter's module)
9. ``cli``, ``book``, ``bench``

A module named in a string for a later import (the CLI's plugin table, ``run_later``) is an edge too.
Besides the order: no import cycle between modules, no function-local ``ctrlgen`` import (it hides an
edge of the graph), and a function-local third-party import only with a comment on the same or the
previous line saying why it is local (an optional or heavy dependency).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = LIB / "ctrlgen"

LAYERS: dict[str, int] = {
    "config": 1, "paths": 1, "results": 1, "thesis": 1, "seeding": 1, "runtime": 1, "progress": 1,
    "result_cache": 1, "figures": 1, "profiles": 1, "parallel": 1,
    "data": 2,
    "models": 3,
    "attention": 4,
    "guidance": 5, "inversion": 5, "sampling": 5, "training": 5,
    "methods": 6,
    "metrics": 7, "analysis": 7, "downstream": 7,
    "experiments": 8,
    "cli": 9, "book": 9, "bench": 9,
}
# Within a layer, pairs (importer's top package, imported top package) that are refused.
SAME_LAYER_FORBIDDEN = {("metrics", "analysis"), ("metrics", "downstream")}
# The experiments package: modules everyone in it may import (the shared base models); the rest are chapters'.
EXPERIMENTS_SHARED = "ctrlgen.experiments.base_models"


@dataclass(frozen=True)
class Import:
    """One import statement's target module, where it is, and whether it sits inside a function."""

    target: str
    line: int
    local: bool
    commented: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of ``from X import ...`` (relative levels resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _has_comment(lines: list[str], lineno: int) -> bool:
    same = lines[lineno - 1]
    previous = lines[lineno - 2].strip() if lineno >= 2 else ""
    return "#" in same or previous.startswith("#")


def imports_of(path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file, ``from a import b`` counted as module ``a.b`` when that is a module."""
    module = module_name(path)
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, child.lineno, in_function, _has_comment(lines, child.lineno)))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_from(child, module, path.name == "__init__.py")
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in modules else base
                    found.append(Import(target, child.lineno, in_function, _has_comment(lines, child.lineno)))
            visit(child, local)

    visit(tree, False)
    return list(dict.fromkeys(found))  # `from a import b, c` is one edge


def named_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules a file names in a string to import later (``importlib.import_module("ctrlgen.cli.data")``, the
    CLI's plugin table, ``run_later("ctrlgen.cli.pretrain_run", ...)``): edges of the graph as well."""
    own = module_name(path)
    ancestors = {own.rsplit(".", k)[0] for k in range(1, own.count(".") + 1)}  # imported before the file anyway
    return {node.value for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules} - ancestors


def graph() -> dict[str, set[str]]:
    """Module -> the ``ctrlgen`` modules it imports or names for a later import (a package import counts as its
    ``__init__``)."""
    modules = all_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = {_known(i.target, modules) for i in imports_of(path, modules) if i.target.split(".")[0] == "ctrlgen"}
        edges[name] = (imported | named_modules(path, modules)) - {name}
    return edges


def _known(target: str, modules: dict[str, Path]) -> str:
    """The deepest existing module named by ``target`` (``ctrlgen.x.f`` with ``f`` a function -> ``ctrlgen.x``)."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def top(module: str) -> str:
    """The first-level name under ``ctrlgen`` (``''`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    name = top(module)
    if name == "":
        return 1
    if name not in LAYERS:
        raise KeyError(f"{module}: {name!r} is in no layer; add it to LAYERS in tests/test_layering.py "
                       f"and to DESIGN.md §3 / README's Layout")
    return LAYERS[name]


def violations(edges: dict[str, set[str]]) -> list[str]:
    """``importer -> target (why)`` for every edge against the order."""
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            ls, ld = layer(src), layer(dst)
            if ld > ls:
                bad.append(f"{src} (layer {ls}) -> {dst} (layer {ld})")
            elif (top(src), top(dst)) in SAME_LAYER_FORBIDDEN:
                bad.append(f"{src} -> {dst} ({top(src)} may not import {top(dst)})")
            elif top(src) == top(dst) == "experiments" and _chapter(src) and _chapter(dst) and _chapter(src) != _chapter(dst):
                bad.append(f"{src} -> {dst} (a chapter's experiments import only {EXPERIMENTS_SHARED})")
    return bad


def _chapter(module: str) -> str:
    """The chapter module an experiments module belongs to ('' for the package and the shared base models)."""
    parts = module.split(".")
    if len(parts) < 3 or ".".join(parts[:3]) == EXPERIMENTS_SHARED:
        return ""
    return parts[2]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by an iterative depth-first search (white/grey/black colouring)."""
    colour = {n: 0 for n in edges}
    found = []
    for start in sorted(edges):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child, 2) == 1:
                found.append(path[path.index(child):] + [child])
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return found


# ================================================================================================ the checker
def test_cycle_finder_on_hand_graphs():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"a"}}) == [["a", "a"]]
    # a diamond is not a cycle
    assert cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []


def test_imports_resolve_relative_and_from_package(tmp_path, monkeypatch):
    pkg = tmp_path / "ctrlgen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "paths.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from ctrlgen import paths\nfrom ..paths import x\nfrom .b import f\n"
        "def g():\n    import numpy\n    # heavy\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", tmp_path)
    mods = {module_name(p): p for p in pkg.rglob("*.py")}
    got = [(i.target, i.local, i.commented) for i in imports_of(pkg / "sub" / "a.py", mods)]
    assert got == [("ctrlgen.paths", False, False), ("ctrlgen.paths", False, False), ("ctrlgen.sub.b", False, False),
                   ("numpy", True, False), ("torch", True, True)]
    assert [i.target for i in imports_of(pkg / "sub" / "__init__.py", mods)] == ["ctrlgen.sub.b"]
    (pkg / "sub" / "c.py").write_text('"""Uses ctrlgen.paths."""\nPLUGINS = {"x": ("ctrlgen.sub.b", "f")}\n'
                                      'NAME = "ctrlgen.nope"\nDATA = files("ctrlgen.sub")\n')
    mods = {module_name(p): p for p in pkg.rglob("*.py")}
    assert named_modules(pkg / "sub" / "c.py", mods) == {"ctrlgen.sub.b"}


def test_violations_name_each_bad_edge():
    edges = {"ctrlgen.data.x": {"ctrlgen.models.y"}, "ctrlgen.models.y": {"ctrlgen.config"},
             "ctrlgen.metrics.m": {"ctrlgen.analysis.a"}, "ctrlgen.analysis.a": {"ctrlgen.metrics.m"},
             "ctrlgen.experiments.ch04_didgen": {"ctrlgen.experiments.ch02_background", EXPERIMENTS_SHARED},
             "ctrlgen.experiments.ch02_background": {EXPERIMENTS_SHARED}}
    assert violations(edges) == [
        "ctrlgen.data.x (layer 2) -> ctrlgen.models.y (layer 3)",
        "ctrlgen.experiments.ch04_didgen -> ctrlgen.experiments.ch02_background "
        f"(a chapter's experiments import only {EXPERIMENTS_SHARED})",
        "ctrlgen.metrics.m -> ctrlgen.analysis.a (metrics may not import analysis)",
    ]


# ================================================================================================ the package
def test_every_module_has_a_layer():
    for name in all_modules():
        layer(name)


def test_imports_follow_the_layer_order():
    bad = violations(graph())
    assert not bad, "imports against DESIGN.md §3's layer order:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in found)


def test_no_function_local_ctrlgen_imports():
    modules = all_modules()
    bad = [f"{name}:{i.line} imports {i.target}" for name, path in modules.items()
           for i in imports_of(path, modules) if i.local and i.target.split(".")[0] == "ctrlgen"]
    assert not bad, "function-local ctrlgen imports (lift them to the module top):\n  " + "\n  ".join(bad)


def test_function_local_third_party_imports_say_why():
    modules = all_modules()
    bad = [f"{name}:{i.line} imports {i.target}" for name, path in modules.items()
           for i in imports_of(path, modules)
           if i.local and i.target.split(".")[0] != "ctrlgen" and not i.commented]
    assert not bad, ("function-local imports without a comment (same or previous line) saying why they are local "
                     "(optional or heavy dependency):\n  " + "\n  ".join(bad))


if __name__ == "__main__":  # a map of the graph for whoever restructures the package
    edges = graph()
    print("\n".join(violations(edges)))
    for c in cycles(edges):
        print("cycle:", " -> ".join(c))
    raise SystemExit(pytest.main([__file__, "-q"]))
