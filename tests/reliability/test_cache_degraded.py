"""A cache in a bad way still serves what it holds (found by an audit): a damaged listing store is started afresh
(it only caches listings), a cache on a read-only mount reads its files online and offline, and a head record
that cannot be written (a full disk) no longer fails every new session."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import TOKEN
from streamloader.remote.filesystem import DagsHubFileSystem
from streamloader.remote.listings import ListingStore
from streamloader.remote.entries import RemoteEntry


@pytest.fixture
def served(tmp_path, make_server):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    files = {f"data/{i}.bin": os.urandom(2000 + i) for i in range(3)}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return make_server(str(root), token=TOKEN), files


def _fs(srv, cache_dir: str) -> DagsHubFileSystem:
    return DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache_dir, skip_instance_cache=True)


def _warm(srv, files, cache_dir: str) -> None:
    """Fill ``cache_dir`` in a process that then exits (its listing store closed, as a finished job leaves it)."""
    out = _read_in_a_new_process(srv, cache_dir, sorted(files))
    assert out.returncode == 0 and out.stdout.split()[1:] == [files[rel].hex() for rel in sorted(files)], out.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated", "garbage wal and shm"])
def test_a_damaged_listing_store_is_started_afresh(served, tmp_path, damage):
    srv, files = served
    cache_dir = str(tmp_path / "cache")
    _warm(srv, files, cache_dir)
    (store,) = glob.glob(os.path.join(cache_dir, "listings", "*", "*.sqlite"))
    if damage == "garbage":
        with open(store, "wb") as f:
            f.write(b"this is not a database, whatever it once was\n" * 100)
    elif damage == "truncated":
        with open(store, "r+b") as f:
            f.truncate(100)
    else:
        for suffix in ("-wal", "-shm"):
            with open(store + suffix, "wb") as f:
                f.write(os.urandom(5000))
    out = _read_in_a_new_process(srv, cache_dir, sorted(files))
    assert out.returncode == 0, out.stderr[-2000:]
    listed, *read = out.stdout.split()
    assert listed == ",".join(f"user/repo/{rel}" for rel in sorted(files))
    assert read == [files[rel].hex() for rel in sorted(files)]
    if damage != "garbage wal and shm":  # (SQLite itself may ignore or rebuild a bad -shm / -wal)
        assert "is damaged" in out.stderr


def _read_in_a_new_process(srv, cache_dir: str, rels, **env: str) -> subprocess.CompletedProcess:
    reader = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        from streamloader.remote.filesystem import DagsHubFileSystem
        fs = DagsHubFileSystem(host={srv.url!r}, token={TOKEN!r}, cache_dir={cache_dir!r}, skip_instance_cache=True)
        print(",".join(sorted(e["name"] for e in fs.ls("user/repo/data"))))
        for rel in {list(rels)!r}:
            print(fs.cat_file("user/repo/" + rel).hex())
    """)
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    return subprocess.run([sys.executable, "-c", reader], env=full, capture_output=True, text=True, timeout=60)


def test_a_damaged_store_opened_directly_is_started_afresh(tmp_path):
    path = str(tmp_path / "s" / "listings.sqlite")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"\x00garbage" * 1000)
    store = ListingStore(path)
    store.put_listing("data", [RemoteEntry("data/a.bin", "file", 5)])
    assert store.entry("data/a.bin").size == 5


def test_a_head_record_that_cannot_be_written_does_not_fail_the_session(served, tmp_path, caplog):
    srv, files = served
    cache_dir = str(tmp_path / "cache")
    _warm(srv, files, cache_dir)
    (heads,) = glob.glob(os.path.join(cache_dir, "listings", "*", "heads"))
    (record,) = os.listdir(heads)
    before = os.stat(os.path.join(heads, record)).st_mtime_ns
    fs = _fs(srv, cache_dir)
    assert fs.cat_file("user/repo/data/0.bin") == files["data/0.bin"]
    assert os.stat(os.path.join(heads, record)).st_mtime_ns == before  # the head did not move: not rewritten
    # now the record is stale and cannot be written (as on a full disk: every write fails)
    with open(os.path.join(heads, record), "w") as f:
        f.write("0" * 40)
    os.chmod(heads, 0o500)
    try:
        if os.access(heads, os.W_OK):  # root writes anyway: make the folder a file instead
            os.chmod(heads, 0o700)
            for name in os.listdir(heads):
                os.unlink(os.path.join(heads, name))
            os.rmdir(heads)
            with open(heads, "w") as f:
                f.write("in the way\n")
        fs = _fs(srv, cache_dir)
        assert fs.cat_file("user/repo/data/1.bin") == files["data/1.bin"]
        assert "cannot record" in caplog.text
    finally:
        if os.path.isdir(heads):
            os.chmod(heads, 0o700)


def _read_only_bind(source: str, target: str) -> bool:
    if os.geteuid() != 0:
        return False
    os.makedirs(target, exist_ok=True)
    if subprocess.run(["mount", "--bind", source, target], capture_output=True).returncode:
        return False
    if subprocess.run(["mount", "-o", "remount,bind,ro", target], capture_output=True).returncode:
        subprocess.run(["umount", target], capture_output=True)
        return False
    return True


@pytest.mark.timeout(120)
def test_a_cache_on_a_read_only_mount_serves_its_files_online_and_offline(served, tmp_path):
    srv, files = served
    cache_dir = str(tmp_path / "cache")
    _warm(srv, files, cache_dir)
    mounted = str(tmp_path / "ro")
    if not _read_only_bind(cache_dir, mounted):
        pytest.skip("needs root and bind mounts (a read-only mount is the only way root cannot write)")
    try:
        for offline in ("", "1"):
            out = _read_in_a_new_process(srv, mounted, sorted(files), STREAMLOADER_OFFLINE=offline)
            assert out.returncode == 0, out.stderr[-2000:]
            assert out.stdout.split()[1:] == [files[rel].hex() for rel in sorted(files)]
    finally:
        subprocess.run(["umount", "-l", mounted], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root and mounts needed: skipped without them)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and tmpfs mounts (a full disk)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # (lazy: the cache's files may be open)


@pytest.mark.timeout(120)
def test_a_full_disk_is_a_cache_error_and_leaves_nothing_behind(served, small_disk):
    from streamloader.errors import CacheError

    srv, files = served
    cache_dir = str(small_disk / "cache")
    fs = _fs(srv, cache_dir)
    assert fs.cat_file("user/repo/data/0.bin") == files["data/0.bin"]
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # the rest of the disk
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(CacheError, match="cannot write to the cache"):
        fs.cat_file("user/repo/data/1.bin")
    assert fs.cat_file("user/repo/data/0.bin") == files["data/0.bin"]  # what it holds it still serves
    assert not os.listdir(os.path.join(cache_dir, "tmp"))  # no temp file left
    filler.unlink()
    assert fs.cat_file("user/repo/data/1.bin") == files["data/1.bin"]
