"""Issue 8.3 — many readers, one cache: 8 processes and, separately, 8 threads cold-read the same files through an
unreliable server; eviction under a small cap while readers are active (litData #452).

tests/test_shared_cache.py checks the fault-free 8-process case with one access path; here the server drops and
fails requests, the readers mix ``cat_file``/``open``/``cat``, and the check is "exactly one *successful* GET
per file", so a retry can never turn into a second download by another reader.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import threading
from collections import Counter
from typing import Dict, List

import pytest

from conftest import TOKEN
from reliability import workers
from reliability.conftest import check_cache, injected_faults
from streamloader.server import ServerFaults

N_FILES = 36
READERS = 8


@pytest.fixture
def files(tmp_path) -> Dict[str, bytes]:
    root = tmp_path / "repo" / "data"
    root.mkdir(parents=True)
    blobs = {}
    for i in range(N_FILES):
        data = os.urandom(8_000 + 997 * i)
        (root / f"f{i:03d}.bin").write_bytes(data)
        blobs[f"user/repo/data/f{i:03d}.bin"] = data
    return blobs


def _flaky(seed: int) -> ServerFaults:
    return ServerFaults(latency=0.02, error_rate=0.15, drop_rate=0.1, throttle_rate=0.05, retry_after=0.05,
                        seed=seed)


def _successful_gets(srv) -> Counter:
    return Counter(e["path"] for e in srv.request_log if e["kind"] == "raw" and not e["fault"])


def _run_processes(target, arg_lists: List[tuple], timeout: float = 120) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter per reader, like separate training jobs
    procs = [ctx.Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0


@pytest.mark.timeout(180)
def test_eight_processes_cold_read_one_successful_get_per_file(tmp_path, files, make_server, figures):
    srv = make_server(tmp_path / "repo", token=TOKEN, faults=_flaky(seed=81))
    cache = str(tmp_path / "cache")
    outs = [str(tmp_path / f"proc{i}.json") for i in range(READERS)]
    _run_processes(workers.cold_reader, [(srv.url, TOKEN, cache, sorted(files), i, outs[i]) for i in range(READERS)])
    expected = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    for out in outs:
        with open(out) as f:
            report = json.load(f)
        assert report["error"] is None, report["error"]
        assert report["digests"] == expected
    ok = _successful_gets(srv)
    assert ok == Counter({p.split("/", 2)[2]: 1 for p in files}), ok
    faults = injected_faults(srv)
    assert faults["error"] and faults["drop"], faults
    assert check_cache(cache) == (N_FILES, [])
    figures.update(processes=READERS, files=N_FILES, reads=READERS * N_FILES, faults=dict(faults))


@pytest.mark.timeout(120)
def test_eight_threads_cold_read_one_successful_get_per_file(tmp_path, files, make_server, figures):
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(tmp_path / "repo", token=TOKEN, faults=_flaky(seed=82))
    cache = str(tmp_path / "cache")
    shared = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    results: List[Dict[str, str]] = [{} for _ in range(READERS)]
    errors: List[BaseException] = []
    start = threading.Barrier(READERS)

    def reader(i: int) -> None:
        # half the threads share one filesystem object, the others each have their own: both must dedupe
        fs = shared if i < READERS // 2 else DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache,
                                                                skip_instance_cache=True)
        order = sorted(files)[i:] + sorted(files)[:i]
        start.wait()
        try:
            for j, path in enumerate(order):
                data = workers.read_one(fs, path, ("cat_file", "open", "cat")[(i + j) % 3])
                results[i][path] = hashlib.sha256(data).hexdigest()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors
    expected = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    assert all(r == expected for r in results)
    assert _successful_gets(srv) == Counter({p.split("/", 2)[2]: 1 for p in files})
    faults = injected_faults(srv)
    assert faults["error"] and faults["drop"], faults
    assert check_cache(cache) == (N_FILES, [])
    figures.update(threads=READERS, files=N_FILES, reads=READERS * N_FILES, faults=dict(faults))


@pytest.mark.timeout(180)
def test_eviction_under_a_small_cap_never_breaks_an_active_reader(tmp_path, files, make_server, figures):
    srv = make_server(tmp_path / "repo", token=TOKEN)
    srv.faults.latency = 0.005
    cache = str(tmp_path / "cache")
    total = sum(len(d) for d in files.values())
    cap = total // 6  # room for a handful of files: constant eviction while 6 processes read
    expected = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    n_procs, reads = 6, 80
    outs = [str(tmp_path / f"evict{i}.json") for i in range(n_procs)]
    _run_processes(workers.evicting_reader,
                   [(srv.url, TOKEN, cache, cap, expected, reads, i, outs[i]) for i in range(n_procs)])
    checked, failures = 0, []
    for out in outs:
        with open(out) as f:
            report = json.load(f)
        assert report["error"] is None, report["error"]
        checked += report["checked"]
        failures += report["failures"]
    assert not failures, failures[:10]
    assert checked == n_procs * reads
    downloads = sum(_successful_gets(srv).values())
    assert downloads > N_FILES  # files really were evicted and fetched again (the test is not vacuous)
    objects, temps = check_cache(cache)
    assert temps == []
    figures.update(processes=n_procs, reads_checked=checked, downloads=downloads, cap_bytes=cap,
                   objects_left=objects)
