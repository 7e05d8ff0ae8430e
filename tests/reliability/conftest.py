"""Fixtures and helpers for the reliability suite, plus the closing figures table.

This folder is a package (``tests/reliability/__init__.py``) on purpose: a second top-level ``conftest`` module
would shadow ``tests/conftest.py`` for every ``from conftest import ...`` in the other test modules.

Helpers
    FAST                 a RetryPolicy with small backoffs, for clients the tests build themselves
    injected_faults      Counter of the faults a server really injected, from its request log
    check_cache          walk a cache root: every finished object verifies, returns (objects, temp files)
Fixtures
    figures              dict a test fills (faults, samples, processes, ...); printed in a table at the end
    served_env           sets DAGSHUB_CLIENT_HOST / DAGSHUB_TOKEN for a server: ``served_env(srv, token)``

Also here: ``workers.py`` (entry points of spawned reader processes) and ``hostile.py`` (a lying proxy in front
of the real server, and a file-access audit hook). The shared fixtures (``make_server``, ``make_server_process``,
``TOKEN``, ``make_jpeg``, the isolated environment) come from tests/conftest.py.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Tuple

import pytest

from _helpers import git_blob_sha1
from streamloader.remote.client import RetryPolicy

FAST = RetryPolicy(attempts=8, max_time=30.0, initial_backoff=0.01, max_backoff=0.1, max_retry_after=0.5)

# one row per test that recorded figures, printed by pytest_terminal_summary
_FIGURES: List[Tuple[str, Dict[str, Any], float]] = []


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def injected_faults(srv: Any) -> Counter:
    """``Counter({"error": n, "throttle": n, "drop": n, ...})`` of the faults the server actually injected."""
    return Counter(entry["fault"] for entry in srv.request_log if entry.get("fault"))


def wait_for_log(srv: Any, predicate: Callable[[List[Dict[str, Any]]], bool], timeout: float = 5.0) -> List[Any]:
    """The server logs a request just after answering it: poll its log until ``predicate`` holds (or timeout)."""
    deadline = time.monotonic() + timeout
    log = srv.request_log
    while not predicate(log) and time.monotonic() < deadline:
        time.sleep(0.02)
        log = srv.request_log
    return log


def check_cache(root: str) -> Tuple[int, List[str]]:
    """Verify every finished object under a FileCache root; return (number of objects, names of temp files).

    A "git" object must hash (git blob sha1) to its own name; any object must be non-empty-named and inside
    ``objects/``. An object that does not verify fails the test: a partial or corrupt file became visible.
    """
    objects = os.path.join(root, "objects")
    count = 0
    for dirpath, _dirs, files in os.walk(objects):
        for name in files:
            path = os.path.join(dirpath, name)
            kind = os.path.basename(os.path.dirname(dirpath))
            if kind == "git":
                with open(path, "rb") as f:
                    data = f.read()
                assert git_blob_sha1(data) == name, f"corrupt cache object {path} ({len(data)} bytes)"
            count += 1
    tmp = os.path.join(root, "tmp")
    temps = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
    return count, temps


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Dict[str, Any]:
    """A dict the test fills with its figures; recorded with the test's call time when it passes."""
    data: Dict[str, Any] = {}
    yield data
    rep = getattr(request.node, "rep_call", None)
    if data and rep is not None and rep.passed:
        _FIGURES.append((request.node.nodeid.split("::", 1)[-1], data, rep.duration))


@pytest.fixture
def served_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any, str], None]:
    """``served_env(srv, token)``: point the default host (and token) of every dagshub:// URL at ``srv``."""

    def apply(srv: Any, token: str) -> None:
        monkeypatch.setenv("DAGSHUB_CLIENT_HOST", srv.url)
        monkeypatch.setenv("DAGSHUB_TOKEN", token)

    return apply


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    tr = terminalreporter
    tr.section("reliability figures")
    for name, data, seconds in _FIGURES:
        details = ", ".join(f"{k}={v}" for k, v in data.items())
        tr.write_line(f"{name:<60} {seconds:6.1f} s  {details}")
