"""Imports point down only: no module of streamloader/ imports from a higher layer, and no import cycle.

Layers, lowest first (a module may import its own layer and those below): bottom helpers (``_*``, errors, auth,
URL helpers, HTTP transport) -> cache -> remote -> hooks, data, fusemount, server -> commands, CLI and the package
``streamloader`` itself (the public facade: the CLI may use it, like a user; the library below never does). Every import counts, at module level
or inside a function; imports under ``if TYPE_CHECKING:`` do not (they never run). A lazy import inside a function
may point up or close a cycle only when it is listed in :data:`ALLOWED` with the reason it is intentional.
"""
from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "streamloader"

# (layer name, module patterns), lowest first; the first layer with a matching pattern wins
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("bottom", ("streamloader._[!_]*", "streamloader.errors", "streamloader.auth", "streamloader.remote.urls",
                "streamloader.remote.transport", "streamloader.remote.leanhttp", "streamloader.remote.leansync")),
    ("cache", ("streamloader.cache", "streamloader.cache.*")),
    ("remote", ("streamloader.remote", "streamloader.remote.*")),
    ("features", ("streamloader.hooks", "streamloader.hooks.*", "streamloader.data", "streamloader.data.*",
                  "streamloader.dataloaders", "streamloader.fusemount", "streamloader.fusemount.*",
                  "streamloader.server", "streamloader.server.*", "streamloader.synthetic")),
    ("interface", ("streamloader.commands", "streamloader.commands.*", "streamloader.cli", "streamloader.__main__",
                   "streamloader")),
]

# (importer, imported): why this lazy import (inside a function) may point up or close a cycle
ALLOWED: Dict[Tuple[str, str], str] = {
    ("streamloader.hooks.router", "streamloader.hooks.install"):
        "HookedRoot.uninstall(): the handle install_hooks returns removes itself through the lifecycle, which is "
        "built on the routing table the handle is defined with",
    ("streamloader.hooks.spawn", "streamloader.hooks.install"):
        "a spawned child unpickles the parent's hooks as a call that installs them (the lifecycle ships itself "
        "through the multiprocessing patch it installs)",
    ("streamloader.cache.store", "streamloader.cache.report"):
        "FileCache.info()/clear(): the report reads the cache folder layout the cache defines",
}


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _layer(module: str) -> int:
    for index, (_name, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, int, bool]]:
    """(imported streamloader module, line, inside a function) for every import that runs."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: List[Tuple[str, int, bool]] = []

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            if name == "streamloader" or name.startswith("streamloader."):
                target = owner(name)
                if target and target != module:
                    out.append((target, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def _graph() -> Dict[str, List[Tuple[str, int, bool]]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in sorted(modules.items())}


def upward_imports() -> List[str]:
    """'importer:line -> imported' for every import of a higher layer that ALLOWED does not excuse."""
    bad = []
    for module, imports in _graph().items():
        for target, line, lazy in imports:
            if _layer(target) > _layer(module) and not (lazy and (module, target) in ALLOWED):
                bad.append(f"{module}:{line} ({LAYERS[_layer(module)][0]}) -> {target} ({LAYERS[_layer(target)][0]})")
    return bad


def import_cycles() -> List[List[str]]:
    """Every strongly connected group of modules (Tarjan), ALLOWED lazy edges left out."""
    edges: Dict[str, Set[str]] = {}
    for module, imports in _graph().items():
        edges[module] = {t for t, _line, lazy in imports if not (lazy and (module, t) in ALLOWED)}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[List[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return groups


def test_no_module_imports_from_a_higher_layer() -> None:
    assert upward_imports() == []


def test_no_import_cycle() -> None:
    assert import_cycles() == []


def test_every_allowance_is_a_lazy_import_that_exists() -> None:
    """An allowance outlives its import only by mistake: each must still name a lazy import that needs it."""
    graph = _graph()
    for (module, target), reason in ALLOWED.items():
        assert reason
        lazy = [line for t, line, is_lazy in graph.get(module, []) if t == target and is_lazy]
        assert lazy, f"ALLOWED names {module} -> {target}, which no function of {module} imports"


def test_the_check_sees_an_upward_and_a_cyclic_import(tmp_path: Path, monkeypatch) -> None:
    """The walk itself: a planted upward import and a planted cycle are both reported."""
    package = tmp_path / "streamloader"
    (package / "remote").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("def f():\n    from streamloader.remote import client\n")
    (package / "remote" / "__init__.py").write_text("")
    (package / "remote" / "client.py").write_text("import streamloader.remote.repo\n")
    (package / "remote" / "repo.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import streamloader.cli\n"
        "from streamloader.remote import client\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert upward_imports() == ["streamloader.errors:2 (bottom) -> streamloader.remote.client (remote)"]
    assert import_cycles() == [["streamloader.remote.client", "streamloader.remote.repo"]]
