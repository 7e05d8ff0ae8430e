"""How much the hooks slow down file access that has nothing to do with the repository.

``measure_hook_overhead()`` times reading a 32 KB local file outside any hooked root (open, read, close, os.stat),
by absolute and by relative path, plus bare ``open()+close()`` and bare ``os.stat()`` (the worst case: a fixed
~0.1-0.2 us per call against calls of 0.7-2 us), without and with hooks (installed against a throw-away local
server), and returns best-of-rounds timings and ratios for ``scripts/bench.py``::

    >>> measure_hook_overhead(20000)["ratio"]        # hooked / plain time of open+stat; 1.05 = 5% slower
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict

__all__ = ["measure_hook_overhead"]

_ROUNDS = 7
_FILE_SIZE = 32 * 1024  # a LAION-sized JPEG


def _read_stat_loop(path: str, n: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(n):
            with open(path, "rb") as f:  # builtins.open is looked up per call, as in user code
                f.read()
            os.stat(path)
        return time.perf_counter() - start

    return run


def _open_loop(path: str, n: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(n):
            open(path, "rb").close()
        return time.perf_counter() - start

    return run


def _stat_loop(path: str, n: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(n):
            os.stat(path)
        return time.perf_counter() - start

    return run


def measure_hook_overhead(n: int = 20000) -> Dict[str, float]:
    """Best-of-7 seconds for ``n`` iterations of each access pattern, plain and hooked, and their ratios.

    Keys: ``n``; ``plain_s``/``hooked_s``/``ratio`` for open+read+close+stat by absolute path (the headline);
    ``open_ratio`` (bare open+close), ``stat_ratio`` (bare os.stat) and ``relative_ratio`` (the headline pattern
    by a relative path, the cwd outside the hooked root). RuntimeError if hooks are already installed.
    """
    from streamloader.hooks import install_hooks, router, targets
    from streamloader.server import DagsHubServer

    if router.hooked():
        raise RuntimeError("measure_hook_overhead needs a process without installed hooks")
    with tempfile.TemporaryDirectory(prefix="streamloader-overhead-") as tmp:
        outside = os.path.join(tmp, "outside")
        served = os.path.join(tmp, "served")
        project = os.path.join(tmp, "project")
        for folder in (outside, served, project):
            os.mkdir(folder)
        target = os.path.join(outside, "file.bin")
        with open(target, "wb") as f:
            f.write(os.urandom(_FILE_SIZE))
        loops = {"abs": _read_stat_loop(target, n), "open": _open_loop(target, n), "stat": _stat_loop(target, n),
                 "rel": _read_stat_loop("file.bin", n)}
        best: Dict[str, float] = {}
        previous_cwd = os.getcwd()
        os.chdir(outside)
        try:
            with DagsHubServer(served, token="overhead-bench") as srv, \
                    install_hooks(project_root=project, repo_url=srv.repo_url, token="overhead-bench",
                                  cache_dir=os.path.join(tmp, "cache")):
                for _round in range(_ROUNDS):  # interleaved, so drifts in machine load hit both sides alike
                    for name, loop in loops.items():
                        best[f"hooked_{name}"] = min(best.get(f"hooked_{name}", float("inf")), loop())
                        targets.restore()  # the same process and root, only the wrappers taken out
                        try:
                            best[f"plain_{name}"] = min(best.get(f"plain_{name}", float("inf")), loop())
                        finally:
                            targets.apply()
        finally:
            os.chdir(previous_cwd)
    return {
        "n": float(n),
        "plain_s": best["plain_abs"],
        "hooked_s": best["hooked_abs"],
        "ratio": best["hooked_abs"] / best["plain_abs"],
        "open_ratio": best["hooked_open"] / best["plain_open"],
        "stat_ratio": best["hooked_stat"] / best["plain_stat"],
        "relative_ratio": best["hooked_rel"] / best["plain_rel"],
    }
