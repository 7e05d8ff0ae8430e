"""The top-level API (streamloader/__init__.py): a small set of lazily imported names that type checkers see too."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import streamloader

INIT = Path(streamloader.__file__)


def _type_checking_imports() -> dict:
    """{name: module} of the ``if TYPE_CHECKING:`` block of streamloader/__init__.py."""
    found = {}
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.dump(stmt)
                found.update({alias.asname or alias.name: stmt.module for alias in stmt.names})
    return found


def test_all_lists_exactly_the_exports_and_each_resolves() -> None:
    exports = streamloader._EXPORTS
    assert sorted(streamloader.__all__) == sorted([*exports, "__version__"])
    assert len(exports) <= 30  # what a user calls; the rest lives in the subpackages
    for name, module in exports.items():
        value = getattr(streamloader, name)
        assert value is getattr(importlib.import_module(module), name), name


def test_type_checkers_see_every_export_where_it_is_defined() -> None:
    assert _type_checking_imports() == streamloader._EXPORTS


def test_dir_lists_the_exports() -> None:
    assert set(streamloader.__all__) <= set(dir(streamloader))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        streamloader.DagsHubServer  # noqa: B018 - moved to streamloader.server
    except AttributeError as exc:
        assert "DagsHubServer" in str(exc)
    else:
        raise AssertionError("streamloader.DagsHubServer should not be exported")


def test_import_streamloader_imports_no_heavy_module() -> None:
    """``import streamloader`` loads no submodule and none of torch, numpy, requests, fsspec (a fresh process)."""
    code = ("import json, sys; import streamloader; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('streamloader', 'torch', 'numpy', 'requests', 'fsspec', 'urllib3', 'PIL', 'tqdm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(INIT.parent.parent)).stdout
    assert json.loads(out) == ["streamloader"]


def test_the_prefetch_function_does_not_bring_the_http_stack() -> None:
    """``streamloader.prefetch`` is a plain function; reaching it imports the hooks, not requests or torch."""
    code = ("import inspect, json, sys; import streamloader; assert inspect.isfunction(streamloader.prefetch); "
            "print(json.dumps(sorted(m for m in ('torch', 'requests', 'fsspec') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(INIT.parent.parent)).stdout
    assert json.loads(out) == []
