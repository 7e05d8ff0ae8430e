"""Process entry points for the reliability tests (importable as ``reliability.workers`` by spawned children).

Each reader reads through a fresh ``DagsHubFileSystem`` on a shared cache root and writes a JSON report to
``out_path``; the test process compares the reports with the source bytes.
"""
from __future__ import annotations

import hashlib
import json
import random
import traceback
from typing import Any, Dict, List, Optional


def _fs(host: str, token: str, cache_dir: str, cache_max_size: Optional[int] = None) -> Any:
    from streamloader.remote.filesystem import DagsHubFileSystem

    return DagsHubFileSystem(host=host, token=token, cache_dir=cache_dir, cache_max_size=cache_max_size,
                             skip_instance_cache=True)


def read_one(fs: Any, path: str, how: str) -> bytes:
    """Read a whole file through one of the public access paths."""
    if how == "cat_file":
        return fs.cat_file(path)
    if how == "open":
        with fs.open(path, "rb") as f:
            return f.read()
    if how == "cat":
        return fs.cat([path, path])[path]
    raise ValueError(how)


def cold_reader(host: str, token: str, cache_dir: str, paths: List[str], seed: int, out_path: str) -> None:
    """Read every path once, in a seeded order, alternating access paths; report {path: sha256}."""
    report: Dict[str, Any] = {"digests": {}, "error": None}
    try:
        fs = _fs(host, token, cache_dir)
        order = list(paths)
        random.Random(seed).shuffle(order)
        for i, path in enumerate(order):
            data = read_one(fs, path, ("cat_file", "open", "cat")[(i + seed) % 3])
            report["digests"][path] = hashlib.sha256(data).hexdigest()
    except BaseException:  # noqa: BLE001 - reported to the test process
        report["error"] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(report, f)


def evicting_reader(host: str, token: str, cache_dir: str, cap: int, expected: Dict[str, str], reads: int,
                    seed: int, out_path: str) -> None:
    """Random reads through a capped cache while other processes evict; some handles are held open meanwhile.

    Reports how many reads were checked and every failure (an exception or bytes that do not match).
    """
    report: Dict[str, Any] = {"checked": 0, "failures": [], "error": None}
    try:
        fs = _fs(host, token, cache_dir, cache_max_size=cap)
        rng = random.Random(seed)
        paths = sorted(expected)
        held: List[Any] = []
        for i in range(reads):
            path = rng.choice(paths)
            try:
                if i % 10 == 0:  # open now, read much later: eviction must not pull the file from under it
                    held.append((path, fs.open(path, "rb")))
                    continue
                data = read_one(fs, path, ("cat_file", "open")[i % 2])
                if hashlib.sha256(data).hexdigest() != expected[path]:
                    report["failures"].append(f"{path}: wrong bytes ({len(data)})")
                report["checked"] += 1
            except Exception as exc:  # noqa: BLE001
                report["failures"].append(f"{path}: {type(exc).__name__}: {exc}")
        for path, handle in held:
            with handle:
                data = handle.read()
            if hashlib.sha256(data).hexdigest() != expected[path]:
                report["failures"].append(f"{path}: held handle read wrong bytes ({len(data)})")
            report["checked"] += 1
    except BaseException:  # noqa: BLE001
        report["error"] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(report, f)


def capped_filler(root: str, cap: int, files: int, seed: int, go: Any) -> None:
    """Store ``files`` random 2-6 KB files into a FileCache capped at ``cap`` (half by fetch, half by open), each
    written with a 3 ms pause like a download, once ``go`` (a Barrier) lets every filler start together."""
    import os
    import time

    from _helpers import git_key  # tests/ is on a spawned child's sys.path, as on its parent's
    from streamloader.cache import FileCache

    rng = random.Random(seed)
    cache = FileCache(root, max_size=cap)

    def fill(data: bytes) -> Any:
        def download(f: Any) -> None:
            f.write(data[:1000])
            time.sleep(0.003)
            f.write(data[1000:])
        return download

    go.wait(60)
    for _ in range(files):
        data = os.urandom(rng.randint(2_000, 6_000))
        key = git_key(data)
        if rng.random() < 0.5:
            cache.fetch(key, fill(data), len(data))
        else:
            cache.open(key, fill(data), len(data)).close()
    cache.flush(30)
