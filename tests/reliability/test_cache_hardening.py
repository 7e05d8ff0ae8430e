"""Issue 15 — holes an adversarial review found in the cache, each shown with real servers, files and processes.

3  unverifiable hashes (sha256, ``sha256:...``, 40-hex under DVC) were shared keys across repos: a hostile repo could
   plant bytes a trusted repo then read with no GET. They are scoped to (host, owner, repo) now; checked kinds
   (git sha1, md5) stay shared.
4  cached objects were trusted forever: a truncated or replaced object is dropped and downloaded again (size check on
   every use, ``verify="full"`` re-hashes once per process), and objects are read-only.
11 deleting ``<cache>/tmp`` (or the whole cache) under a running process broke every later cold read with a
   FileNotFoundError naming the temp file, which ``on_error="skip"`` took for a missing image.
12 a cache root others can write is tightened (ours) or refused (not ours, or a shared sticky dir).
13 a capped cache filled by 4 processes at once overshot its cap ~3x: the running total is shared now.
14 temp files of killed processes are swept when a cache starts (at most every few minutes) and by a bare
   ``streamloader cache prune``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Callable, List

import numpy as np
import pytest

from _helpers import git_blob_sha1, git_key
from conftest import TOKEN
from reliability import workers
from reliability.hostile import HostileProxy
from streamloader.cache.commit_queue import QUEUE
from streamloader.cache import CacheKey, FileCache
from streamloader.errors import CacheError
from streamloader.remote.filesystem import DagsHubFileSystem


def writer(data: bytes, calls: list = None) -> Callable:
    def fill(f):
        if calls is not None:
            calls.append(1)
        f.write(data)
    return fill


def raw_gets(srv, path: str) -> int:
    return sum(1 for e in srv.request_log if e["kind"] == "raw" and e["path"] == path and not e["fault"])


# --- 3: no shared keys for hashes the cache cannot check ------------------------------------------------------------
GOOD, EVIL = b"trusted model weights\n" * 50, b"planted by a hostile repo\n" * 40


def _claiming(hash_value: str, versioning: str) -> Callable[[str, bytes], bytes]:
    """A proxy mutation: the listing row of data/model.bin announces ``hash_value`` under ``versioning``."""
    def mutate(path: str, body: bytes) -> bytes:
        data = json.loads(body)
        items = data.get("entries", data) if isinstance(data, dict) else data
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and item.get("path") == "data/model.bin":
                    item["hash"], item["versioning"] = hash_value, versioning
        return json.dumps(data).encode()
    return mutate


UNCHECKABLE = {
    "sha256-hex": (hashlib.sha256(GOOD).hexdigest(), "dvc"),
    "sha256-prefixed": ("sha256:" + hashlib.sha256(GOOD).hexdigest(), "dvc"),
    "40-hex-dvc": (hashlib.sha1(GOOD).hexdigest(), "dvc"),
    "etag-like": ('"' + hashlib.md5(GOOD).hexdigest() + '-3"', "bucket"),
}


@pytest.fixture
def two_repos(tmp_path, make_server):
    """A trusted repo (good/data) and a hostile one (evil/data) on two servers, each holding data/model.bin."""
    roots = {}
    for name, content in (("good", GOOD), ("evil", EVIL)):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "model.bin").write_bytes(content)
        roots[name] = make_server(tmp_path / name, owner=name, repo="data", token=TOKEN)
    return roots


def _listed_hash(fs: DagsHubFileSystem, folder: str) -> str:
    """List ``folder`` (so its files are read under their content hash) and return model.bin's listed hash."""
    repo, rel = fs.resolve(folder + "/model.bin")
    fs.ls(folder)
    return (repo.info(rel).hash or "").lower()


@pytest.mark.parametrize("form", sorted(UNCHECKABLE))
def test_a_hostile_repo_cannot_plant_bytes_under_an_unverifiable_hash(two_repos, tmp_path, form, figures):
    claimed, versioning = UNCHECKABLE[form]
    cache = str(tmp_path / "cache")
    with HostileProxy(two_repos["evil"].url, _claiming(claimed, versioning)) as evil, \
            HostileProxy(two_repos["good"].url, _claiming(claimed, versioning)) as good:
        hostile = DagsHubFileSystem(host=evil.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
        assert _listed_hash(hostile, "evil/data/data") == claimed.lower()  # read under the hash, not the path
        assert hostile.cat_file("evil/data/data/model.bin") == EVIL  # the hostile repo reads its own bytes
        trusted = DagsHubFileSystem(host=good.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
        assert _listed_hash(trusted, "good/data/data") == claimed.lower()
        assert trusted.cat_file("good/data/data/model.bin") == GOOD
        assert raw_gets(two_repos["good"], "data/model.bin") == 1  # downloaded, not taken from the poisoned entry
        assert trusted.cat_file("good/data/data/model.bin") == GOOD  # and cached for the trusted repo itself
    assert raw_gets(two_repos["good"], "data/model.bin") == 1
    figures.update(form=form)


def test_checked_hashes_stay_shared_across_repos(tmp_path, make_server):
    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "model.bin").write_bytes(GOOD)
    a = make_server(tmp_path / "a", owner="a", repo="data", token=TOKEN)
    b = make_server(tmp_path / "b", owner="b", repo="data", token=TOKEN)
    cache = str(tmp_path / "cache")
    for srv, owner in ((a, "a"), (b, "b")):
        fs = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
        assert _listed_hash(fs, f"{owner}/data/data") == git_blob_sha1(GOOD)
        assert fs.cat_file(f"{owner}/data/data/model.bin") == GOOD
    assert raw_gets(a, "data/model.bin") == 1 and raw_gets(b, "data/model.bin") == 0  # git sha1: verified, shared


def test_scope_changes_only_unverifiable_keys():
    sha1, md5, sha256 = hashlib.sha1(b"x").hexdigest(), hashlib.md5(b"x").hexdigest(), hashlib.sha256(b"x").hexdigest()
    here, there = ("https://dagshub.com", "o", "r"), ("https://dagshub.com", "o", "r2")
    assert CacheKey.from_hash("git", sha1, scope=here) == CacheKey.from_hash("git", sha1, scope=there)
    assert CacheKey.from_hash("dvc", md5, scope=here) == CacheKey.from_hash("dvc", md5, scope=there)
    for versioning, value in (("dvc", sha256), ("dvc", "sha256:" + sha256), ("dvc", sha1), (None, "not hex")):
        mine, theirs = CacheKey.from_hash(versioning, value, scope=here), CacheKey.from_hash(versioning, value,
                                                                                             scope=there)
        assert mine.kind == "opaque" and mine != theirs
        assert CacheKey.from_hash(versioning, value, scope=("https://dagshub.com", "o\x00r", "")) != mine


# --- 4: cached objects are checked on use and read-only ----------------------------------------------------------
@pytest.fixture
def one_file(tmp_path, make_server):
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "a.bin").write_bytes(GOOD)
    return make_server(tmp_path / "repo", token=TOKEN)


def _object_path(cache_root: str, data: bytes) -> str:
    return FileCache(cache_root).path_for(git_key(data))


def _overwrite(path: str, data: bytes) -> None:
    os.chmod(path, 0o600)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("damage", ["truncated", "grown"])
def test_an_object_of_the_wrong_size_is_dropped_counted_and_downloaded_again(one_file, tmp_path, damage, caplog):
    cache = str(tmp_path / "cache")
    fs = DagsHubFileSystem(host=one_file.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    fs.ls("user/repo/data")  # known size and hash: the object is stored (and checked) under its git key
    assert fs.cat_file("user/repo/data/a.bin") == GOOD
    assert fs.cache.flush(10)
    obj = _object_path(cache, GOOD)
    _overwrite(obj, GOOD[:100] if damage == "truncated" else GOOD + b"tail")
    later = DagsHubFileSystem(host=one_file.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    later.ls("user/repo/data")
    with caplog.at_level(logging.WARNING, logger="streamloader.cache"):
        assert later.cat_file("user/repo/data/a.bin") == GOOD
        with later.open("user/repo/data/a.bin", "rb") as f:
            assert f.read() == GOOD
    assert raw_gets(one_file, "data/a.bin") == 2
    assert later.cache.corrupt_entries == 1 and "corrupt cache entry" in caplog.text
    with open(obj, "rb") as f:
        assert f.read() == GOOD


def test_get_with_the_expected_size_drops_a_damaged_entry(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    path = cache.fetch(git_key(GOOD), writer(GOOD), len(GOOD))
    assert cache.get(git_key(GOOD), size=len(GOOD)) == path
    _overwrite(path, GOOD[:-1])
    assert cache.get(git_key(GOOD), size=len(GOOD)) is None and not os.path.exists(path)
    assert cache.corrupt_entries == 1  # (with no size given, the size noted on it: tests/reliability/test_cache_unsized.py)


def test_verify_full_rehashes_each_entry_once_per_process(tmp_path, monkeypatch):
    from streamloader.cache import verify as _verify

    root = str(tmp_path / "c")
    path = FileCache(root).fetch(git_key(GOOD), writer(GOOD), len(GOOD))
    flipped = bytearray(GOOD)
    flipped[7] ^= 1
    _overwrite(path, bytes(flipped))  # same size: only a hash tells
    assert FileCache(root).get(git_key(GOOD), len(GOOD)) == path  # the default trusts a same-size object
    hashed: List[str] = []
    real_check = _verify.Verifier.check_file
    monkeypatch.setattr(_verify.Verifier, "check_file", lambda self, p, *a, **k: (hashed.append(p),
                                                                                  real_check(self, p, *a, **k))[1])
    paranoid = FileCache(root, verify="full")
    calls: list = []
    with paranoid.open(git_key(GOOD), writer(GOOD, calls), len(GOOD)) as f:
        assert f.read() == GOOD
    assert calls == [1] and paranoid.corrupt_entries == 1
    paranoid.flush()
    hashed.clear()
    for _ in range(3):
        assert paranoid.get(git_key(GOOD), len(GOOD)) == path
    assert hashed == []  # downloaded and verified by this process: never hashed again
    fresh = FileCache(root, verify="full")
    for _ in range(3):
        assert fresh.get(git_key(GOOD), len(GOOD)) == path
    assert hashed == [path]  # a new reader hashes it once
    with pytest.raises(ValueError, match="verify"):
        FileCache(root, verify="sometimes")


def test_streamloader_verify_full_reaches_the_caches_file_systems_make(one_file, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    fs = DagsHubFileSystem(host=one_file.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    fs.ls("user/repo/data")
    assert fs.cat_file("user/repo/data/a.bin") == GOOD
    assert fs.cache.flush(10)
    path = _object_path(cache, GOOD)
    flipped = bytearray(GOOD)
    flipped[7] ^= 1
    _overwrite(path, bytes(flipped))  # same size: only a hash tells
    assert DagsHubFileSystem(host=one_file.url, token=TOKEN, cache_dir=cache,
                             skip_instance_cache=True).cat_file("user/repo/data/a.bin") == bytes(flipped)
    monkeypatch.setenv("STREAMLOADER_VERIFY", "full")
    fs = DagsHubFileSystem(host=one_file.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    assert fs.cat_file("user/repo/data/a.bin") == GOOD and fs.cache.corrupt_entries == 1
    monkeypatch.setenv("STREAMLOADER_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="STREAMLOADER_VERIFY"):
        FileCache(cache)


def test_verify_full_checks_a_file_read_before_any_listing_against_the_sha256_noted_as_it_was_stored(
        one_file, tmp_path, monkeypatch):
    """The guide's loop reads files no listing has named: no listed hash, so the cache notes the bytes' sha256."""
    from conftest import remote_repo

    cache = str(tmp_path / "cache")
    repo = remote_repo(one_file, cache)
    assert repo.read_bytes("data/a.bin") == GOOD  # unlisted: stored under a path key
    repo.cache.flush(10)
    path = repo.cached_path("data/a.bin")
    assert "/objects/path/" in path
    assert os.getxattr(path, "user.streamloader.sha256").decode() == hashlib.sha256(GOOD).hexdigest()
    flipped = bytearray(GOOD)
    flipped[7] ^= 1
    _overwrite(path, bytes(flipped))  # same size, same notes: only a hash tells
    assert remote_repo(one_file, cache).read_bytes("data/a.bin") == bytes(flipped)  # the default trusts it
    monkeypatch.setenv("STREAMLOADER_VERIFY", "full")
    gets = raw_gets(one_file, "data/a.bin")
    paranoid = remote_repo(one_file, cache)
    assert paranoid.read_bytes("data/a.bin") == GOOD and paranoid.cache.corrupt_entries == 1
    assert raw_gets(one_file, "data/a.bin") == gets + 1
    paranoid.cache.flush(10)
    path = paranoid.cached_path("data/a.bin")
    os.removexattr(path, "user.streamloader.sha256")  # no note to check against: not trusted either
    again = remote_repo(one_file, cache)
    assert again.read_bytes("data/a.bin") == GOOD and again.cache.corrupt_entries == 1


def test_finished_objects_are_read_only_yet_evictable(tmp_path):
    cache = FileCache(str(tmp_path / "c"), max_size=len(GOOD) + 10)
    path = cache.fetch(git_key(GOOD), writer(GOOD), len(GOOD))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    with cache.open(git_key(EVIL), writer(EVIL), len(EVIL)) as f:  # stored by the background commit
        assert f.read() == EVIL
    assert cache.flush(10)
    assert stat.S_IMODE(os.stat(cache.get(git_key(EVIL))).st_mode) == 0o400
    assert not os.path.exists(path)  # evicted despite being read-only
    assert cache.clear() == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_writing_to_a_cached_file_fails_for_its_owner(tmp_path):
    """Root ignores file modes, so the check runs in a child that drops to an unprivileged user when it is root."""
    base = tempfile.mkdtemp(prefix="sl-ro-")
    try:
        if os.geteuid() == 0:
            os.chown(base, 65534, 65534)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                cache = FileCache(os.path.join(base, "c"))
                path = cache.fetch(git_key(GOOD), writer(GOOD), len(GOOD))
                try:
                    open(path, "r+b").close()
                    code = 2
                except PermissionError:
                    code = 0 if cache.clear() == 1 and not os.path.exists(path) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- 11: the cache's own directories vanish under a running process -------------------------------------------------
def test_laion_skip_never_mistakes_a_deleted_cache_dir_for_missing_images(tmp_path, make_server, served_env,
                                                                          isolated_env, figures):
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.synthetic import make_laion_repo

    repo = make_laion_repo(tmp_path / "laion", n_images=12, n_squirrel=2, image_size=(16, 16), seed=4)
    srv = make_server(repo.root, token=TOKEN)
    served_env(srv, TOKEN)
    ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data", on_error="skip")
    cache_root = str(isolated_env / "streamloader-cache")
    from PIL import Image

    def check(i: int) -> None:
        image, _score = ds[i]
        expected = np.asarray(Image.open(repo.image_path(repo.files[i])).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal((image.numpy() * 255).round().astype(np.uint8), expected), repo.files[i]

    for i in range(4):
        check(i)
    QUEUE.drain(10)  # background commits done: nothing writes into the cache while it is deleted
    shutil.rmtree(os.path.join(cache_root, "tmp"))
    for i in range(4, 8):
        check(i)
    QUEUE.drain(10)
    shutil.rmtree(cache_root)  # the whole cache, listings and locks included
    for i in range(8, 12):
        check(i)
    assert ds.stats["skipped"] == 0 and ds.stats["missing_image"] == 0
    figures.update(items=12, dirs_deleted=2)


@pytest.mark.parametrize("sub", ["tmp", "locks", "objects", ""])
def test_fetch_and_open_recreate_a_deleted_cache_directory(tmp_path, sub):
    from streamloader.cache import entrylock as _entrylock

    cache = FileCache(str(tmp_path / "c"))
    first = os.urandom(3000)
    cache.fetch(git_key(first), writer(first), len(first))
    shutil.rmtree(os.path.join(cache.root, sub))
    data = os.urandom(4000)
    assert open(cache.fetch(git_key(data), writer(data), len(data)), "rb").read() == data
    shutil.rmtree(os.path.join(cache.root, sub))
    more = os.urandom(5000)
    with cache.open(git_key(more), writer(more), len(more)) as f:
        assert f.read() == more
    assert cache.flush(10) and cache.get(git_key(more)) is not None
    assert os.path.join(cache.root, "locks") not in _entrylock._NO_OFD_DIRS  # still one shared lock file
    assert cache.sweep_temp() == 0


def test_a_temp_file_vanishing_mid_download_is_retried_then_a_cache_error(tmp_path):
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(6000)
    calls: list = []

    def fill_deleting_tmp(times: int) -> Callable:
        def fill(f):
            calls.append(1)
            f.write(data)
            if len(calls) <= times:
                shutil.rmtree(os.path.join(cache.root, "tmp"))
        return fill

    assert open(cache.fetch(git_key(data), fill_deleting_tmp(1), len(data)), "rb").read() == data
    assert len(calls) == 2
    calls.clear()
    other = os.urandom(10)
    with pytest.raises(CacheError) as excinfo:
        cache.fetch(git_key(other), lambda f: (calls.append(1), f.write(other),
                                               shutil.rmtree(os.path.join(cache.root, "tmp"))), len(other))
    assert not isinstance(excinfo.value, FileNotFoundError) and len(calls) == 2
    assert "tmp" in str(excinfo.value) or "temp" in str(excinfo.value)


@pytest.mark.parametrize("how", ["fetch", "open"])
def test_a_size_less_download_whose_temp_file_vanishes_is_downloaded_again(tmp_path, how):
    """Without a size a git blob is hashed from the finished temp file: its loss must not read as a missing file."""
    cache = FileCache(str(tmp_path / "c"))
    data = os.urandom(7000)
    calls: list = []

    def fill(f):
        calls.append(1)
        f.write(data)
        if len(calls) == 1:
            shutil.rmtree(os.path.join(cache.root, "tmp"))

    if how == "fetch":
        got = open(cache.fetch(git_key(data), fill), "rb").read()
    else:
        with cache.open(git_key(data), fill) as f:
            got = f.read()
    assert got == data and len(calls) == 2
    assert cache.flush(10) and cache.get(git_key(data), len(data)) is not None


# --- 12: a cache root that others can write ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_cache_root_of_ours_that_others_can_write_is_tightened(tmp_path, mode, caplog):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, mode)
    with caplog.at_level(logging.WARNING, logger="streamloader.cache"):
        FileCache(str(root))
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert "0700" in caplog.text and str(root) in caplog.text


@pytest.mark.parametrize("mode", [0o666, 0o644])
def test_a_cache_root_that_is_a_file_is_refused_and_the_file_left_alone(tmp_path, mode):
    notes = tmp_path / "notes.txt"
    notes.write_text("my data\n")
    os.chmod(notes, mode)
    with pytest.raises(CacheError, match="not a directory"):
        FileCache(str(notes))
    assert stat.S_IMODE(os.stat(notes).st_mode) == mode and notes.read_text() == "my data\n"


def test_a_cache_root_others_can_write_and_we_do_not_own_is_refused(tmp_path):
    sticky = tmp_path / "scratch"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # a shared scratch dir (like /tmp): never chmod-ed behind its owner's back
    with pytest.raises(CacheError, match="chmod 700"):
        FileCache(str(sticky))
    assert stat.S_IMODE(os.stat(sticky).st_mode) == 0o1777
    if os.geteuid() == 0:  # as root we can hand a directory to someone else
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chmod(theirs, 0o777)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(CacheError, match="another directory"):
            FileCache(str(theirs))
        assert stat.S_IMODE(os.stat(theirs).st_mode) == 0o777
    fine = tmp_path / "fine"
    fine.mkdir()
    os.chmod(fine, 0o755)  # readable by others is the user's choice; only writable is refused
    FileCache(str(fine))
    assert stat.S_IMODE(os.stat(fine).st_mode) == 0o755


# --- 13: a capped cache filled by several processes at once --------------------------------------------------------
CAP, N_PROCS, PER_PROC = 60_000, 4, 30


def _objects_bytes(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(os.path.join(root, "objects")):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


@pytest.mark.timeout(120)
def test_four_processes_filling_a_capped_cache_stay_near_the_cap(tmp_path, figures):
    root = str(tmp_path / "c")
    FileCache(root)
    ctx = mp.get_context("spawn")
    go = ctx.Barrier(N_PROCS + 1)  # the fillers start storing together, as 4 jobs launched at once would
    procs = [ctx.Process(target=workers.capped_filler, args=(root, CAP, PER_PROC, seed, go)) for seed in range(N_PROCS)]
    for p in procs:
        p.start()
    samples: List[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_objects_bytes(root))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    go.wait(60)
    for p in procs:
        p.join(100)
    stop.set()
    sampler.join(10)
    assert [p.exitcode for p in procs] == [0] * N_PROCS
    bound = CAP + N_PROCS * 6_000
    final = _objects_bytes(root)
    assert final <= bound and max(samples) <= bound, (final, max(samples), bound)
    assert len(samples) > 20
    figures.update(processes=N_PROCS, cap=CAP, written=N_PROCS * PER_PROC * 4_000, max_seen=max(samples),
                   final=final, samples=len(samples))


# --- 14: temp files of killed processes -----------------------------------------------------------------------------
_HUNG = textwrap.dedent("""
    import hashlib, sys, time
    from streamloader.cache import CacheKey, FileCache
    data = sys.argv[2].encode() * 100_000
    key = CacheKey.from_hash("git", hashlib.sha1(b"blob %d\\x00" % len(data) + data).hexdigest())
    def fill(f):
        f.write(data[:1000]); f.flush()
        time.sleep(120)
    FileCache(sys.argv[1]).fetch(key, fill, len(data))
""")


def _hung_download(root: str, byte: str = "x") -> subprocess.Popen:
    """A real process downloading ``byte * 100_000`` into the cache at ``root``, stuck once its temp file exists."""
    proc = subprocess.Popen([sys.executable, "-c", _HUNG, root, byte])
    tmp = os.path.join(root, "tmp")
    deadline = time.monotonic() + 30
    while not any(f".{proc.pid}." in n for n in (os.listdir(tmp) if os.path.isdir(tmp) else [])):
        assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    return proc


def _age_sweep_stamp(root: str) -> None:
    from streamloader.cache import scan as _cachescan

    stamp = os.path.join(root, _cachescan.SWEEP_STAMP)
    old = time.time() - _cachescan.SWEEP_INTERVAL - 1
    os.utime(stamp, (old, old))


@pytest.mark.timeout(90)
def test_a_starting_cache_sweeps_temp_files_of_killed_processes_and_keeps_live_ones(tmp_path, figures):
    root = str(tmp_path / "c")
    FileCache(root)
    victim, alive = _hung_download(root), None
    try:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        alive = _hung_download(root, "y")  # another entry: its lock is held while it downloads
        FileCache(root)  # swept less than the interval ago: starting costs one stat, the files stay
        assert len(os.listdir(os.path.join(root, "tmp"))) == 2
        _age_sweep_stamp(root)
        FileCache(root)
        left = os.listdir(os.path.join(root, "tmp"))
        assert len(left) == 1 and f".{alive.pid}." in left[0]  # the live download is untouched
    finally:
        for p in (victim, alive):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    figures.update(processes=3)


@pytest.mark.timeout(90)
def test_bare_cache_prune_sweeps_temp_files_of_a_killed_process(tmp_path):
    root = str(tmp_path / "c")
    FileCache(root)
    victim = _hung_download(root)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    assert len(os.listdir(os.path.join(root, "tmp"))) == 1
    out = subprocess.run([sys.executable, "-m", "streamloader", "cache", "prune", "--cache-dir", root],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "1 stale temp file" in out.stdout
    assert os.listdir(os.path.join(root, "tmp")) == []
