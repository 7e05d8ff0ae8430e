"""Issue 3 acceptance: many processes cold-reading the same remote files through one cache, against the server."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

from conftest import TOKEN

N_FILES = 40
N_PROCS = 8


def _reader(host: str, cache_dir: str, out_path: str) -> None:
    from streamloader.remote.filesystem import DagsHubFileSystem

    fs = DagsHubFileSystem(host=host, token=TOKEN, cache_dir=cache_dir, skip_instance_cache=True)
    digests = []
    for i in range(N_FILES):
        digests.append(hashlib.sha256(fs.cat_file(f"user/repo/data/f{i:03d}.bin")).hexdigest())
    with open(out_path, "w") as f:
        f.write("\n".join(digests))


def test_eight_processes_make_one_get_per_file(make_server, tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    expected = []
    for i in range(N_FILES):
        data = os.urandom(20_000 + i)
        (root / "data" / f"f{i:03d}.bin").write_bytes(data)
        expected.append(hashlib.sha256(data).hexdigest())
    srv = make_server(str(root), token=TOKEN)
    srv.faults.latency = 0.02  # widen the race window between processes
    cache_dir = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_reader, args=(srv.url, cache_dir, str(tmp_path / f"out{i}"))) for i in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for i in range(N_PROCS):
        assert (tmp_path / f"out{i}").read_text().split("\n") == expected
    counts = srv.get_counts(kind="raw")
    assert counts == {f"data/f{i:03d}.bin": 1 for i in range(N_FILES)}
