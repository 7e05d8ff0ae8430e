"""Cached objects whose size no listing says (dagshub.com lists none unless asked; a file read before anything was
listed is stored under its location) are checked against the size the cache noted on them as they were stored:
a cut, grown or replaced object is dropped and downloaded again, never served, and never the source of a size the
listing store then keeps. A symlink or a folder at an object's path is never followed or served either.
(Found by an audit: the size such a read was checked against was the cached copy's own.)"""
from __future__ import annotations

import os
import shutil

import pytest

from _helpers import git_key
from conftest import TOKEN
from streamloader._files import SIZE_XATTR, recorded_size
from streamloader.cache import FileCache
from streamloader.cache.commit_queue import QUEUE
from streamloader.remote.filesystem import DagsHubFileSystem
from streamloader.server import DagsHubLike

GOOD = b"the real bytes of a repository file\n" * 40


def _fill(data: bytes, calls: list):
    def fill(f):
        calls.append(1)
        f.write(data)
    return fill


def _xattrs_here(path: str) -> bool:
    probe = os.path.join(path, "probe")
    with open(probe, "wb") as f:
        try:
            os.setxattr(f.fileno(), "user.probe", b"1")
        except (OSError, AttributeError):
            return False
    return True


@pytest.fixture
def cache(tmp_path):
    if not _xattrs_here(str(tmp_path)):
        pytest.skip("this file system keeps no user extended attributes (nothing can be recorded)")
    return FileCache(str(tmp_path / "c"))


def _writable(path: str) -> None:
    os.chmod(path, 0o600)


def test_the_size_is_noted_on_each_object_as_it_is_stored(cache):
    path = cache.fetch(git_key(GOOD), _fill(GOOD, []))  # no size given
    assert recorded_size(path) == len(GOOD)
    assert os.getxattr(path, SIZE_XATTR) == str(len(GOOD)).encode()


@pytest.mark.parametrize("damage", ["cut", "grown", "replaced", "emptied"])
def test_an_object_damaged_on_disk_is_dropped_though_no_size_was_given(cache, damage, caplog):
    calls: list = []
    key = git_key(GOOD)
    path = cache.fetch(key, _fill(GOOD, calls))
    _writable(path)
    if damage == "cut":
        os.truncate(path, 100)
    elif damage == "grown":
        with open(path, "ab") as f:
            f.write(b"!")
    elif damage == "emptied":
        open(path, "wb").close()
    else:  # another file of the same size moved over it (a new inode: no size noted on it)
        other = path + ".other"
        with open(other, "wb") as f:
            f.write(b"x" * len(GOOD))
        os.replace(other, path)
    assert cache.get(key) is None
    assert cache.corrupt_entries == 1 and not os.path.exists(path)
    assert "dropped corrupt cache entry" in caplog.text
    with open(cache.fetch(key, _fill(GOOD, calls)), "rb") as f:
        assert f.read() == GOOD
    assert len(calls) == 2  # downloaded again


@pytest.mark.parametrize("known_size", [True, False])
def test_a_symlink_at_an_objects_path_is_never_followed(cache, tmp_path, known_size):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"s" * len(GOOD))  # the same size: only the link itself gives it away
    key = git_key(GOOD)
    path = cache.fetch(key, _fill(GOOD, []))
    os.unlink(path)
    os.symlink(str(outside), path)
    assert cache.get(key, len(GOOD) if known_size else None) is None
    assert not os.path.lexists(path) and outside.read_bytes() == b"s" * len(GOOD)  # the link went, not its target
    assert open(cache.fetch(key, _fill(GOOD, [])), "rb").read() == GOOD


def test_a_folder_at_an_objects_path_is_removed_and_the_file_downloaded_again(cache):
    key = git_key(GOOD)
    path = cache.fetch(key, _fill(GOOD, []))
    os.unlink(path)
    os.makedirs(os.path.join(path, "inner"))
    assert cache.get(key, len(GOOD)) is None and not os.path.exists(path)
    assert open(cache.fetch(key, _fill(GOOD, [])), "rb").read() == GOOD


@pytest.fixture
def unsized(tmp_path, make_server):
    """A dagshub.com-like server (folder listings without sizes) and a repo of 3 files."""
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    files = {f"data/{i}.bin": os.urandom(3000 + i) for i in range(3)}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    if not _xattrs_here(str(tmp_path)):
        pytest.skip("this file system keeps no user extended attributes (nothing can be recorded)")
    return make_server(str(root), token=TOKEN, dagshub_like=DagsHubLike(max_in_flight=0)), files


def _fs(srv, cache_dir: str) -> DagsHubFileSystem:
    return DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache_dir, skip_instance_cache=True)


def _objects(cache_dir: str) -> list:
    found = []
    for folder, _dirs, names in os.walk(os.path.join(cache_dir, "objects")):
        found += [os.path.join(folder, name) for name in names]
    return found


@pytest.mark.parametrize("first", ["prefetch", "cat_file"])
@pytest.mark.parametrize("damage", ["cut", "symlink"])
def test_unsized_files_damaged_in_the_cache_are_fetched_again_on_every_read_path(unsized, tmp_path, first, damage):
    srv, files = unsized
    rel, good = "data/1.bin", files["data/1.bin"]
    cache_dir = str(tmp_path / f"cache-{first}-{damage}")
    fs = _fs(srv, cache_dir)
    if first == "prefetch":
        assert fs.ls("user/repo/data")[0]["size"] is None  # dagshub.com lists no sizes
        fs.prefetch([f"user/repo/{rel}"], progress=False)
    else:
        assert fs.cat_file(f"user/repo/{rel}") == good  # before anything was listed: stored under its location
    assert QUEUE.drain(10)
    (obj,) = _objects(cache_dir)
    _writable(obj)
    if damage == "cut":
        os.truncate(obj, 100)
    else:
        os.unlink(obj)
        os.symlink("/etc/passwd", obj)
    reads = {
        "open": lambda f: f.open(f"user/repo/{rel}").read(),
        "cat_file": lambda f: f.cat_file(f"user/repo/{rel}"),
        "local_path": lambda f: open(f.local_path(f"user/repo/{rel}"), "rb").read(),
    }
    for name, read in reads.items():
        fresh = _fs(srv, cache_dir)  # a new process's view: nothing in memory
        assert fresh.info(f"user/repo/{rel}")["size"] in (None, len(good)), name
        assert read(fresh) == good, name
        assert fresh.size(f"user/repo/{rel}") == len(good), name  # the real size, never the damaged copy's
        assert QUEUE.drain(10)
        (obj,) = _objects(cache_dir)
        _writable(obj)
        os.truncate(obj, 100)  # damaged again for the next read path
    shutil.rmtree(cache_dir)
