"""streamloader._realos: the disk's own stat/lstat, which installed hooks never replace and which never go remote."""
from __future__ import annotations

import importlib.util
import os

import pytest

from streamloader import _realos


def test_under_a_hooked_root_it_sees_only_the_disk_and_sends_no_request(hooked, remote, project):
    assert os.stat("data/0000.jpg").st_size > 0  # the hooks serve it (this call asks the server) ...
    remote.reset_counts()
    for path in ("data/0000.jpg", str(project / "data" / "labels.tsv"), "data/nested/deeper/note.txt", "data"):
        with pytest.raises(FileNotFoundError):
            _realos.stat(path)
        with pytest.raises(FileNotFoundError):
            _realos.lstat(path)
        assert not _realos.exists_locally(path)
        assert not _realos.exists_locally(path, follow_symlinks=False)
    assert remote.request_count() == 0  # ... but the real stat never did
    (project / "local.txt").write_bytes(b"abc")  # (a new file under the root: the hooks ask what the repo has there)
    remote.reset_counts()
    assert _realos.stat("local.txt").st_size == 3 and _realos.exists_locally(str(project / "local.txt"))
    os.symlink("gone", project / "dangling")
    assert not _realos.exists_locally("dangling") and _realos.exists_locally("dangling", follow_symlinks=False)
    assert remote.request_count() == 0


def test_imported_after_the_hooks_it_still_has_the_unpatched_functions(hooked):
    assert os.stat is not _realos.stat  # hooks are on
    spec = importlib.util.spec_from_file_location("fresh_realos", _realos.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # a first import that happens while the hooks are installed
    native = importlib.import_module(os.name)
    assert fresh.stat is native.stat and fresh.lstat is native.lstat
    assert _realos.stat is native.stat and _realos.lstat is native.lstat


def test_a_cold_read_through_the_hooks_never_asks_them_about_the_cache_own_files(hooked, monkeypatch):
    from streamloader.hooks import patches

    cache_root = hooked.repo.cache.root
    asked = []
    real = patches._stat_remote

    def recording(path, dir_fd, local_error):
        asked.append(os.fspath(path))
        return real(path, dir_fd, local_error)

    monkeypatch.setattr(patches, "_stat_remote", recording)
    for name in ("data/0000.jpg", "data/0001.jpg"):
        with open(name, "rb") as f:  # cold: looked up, locked, downloaded, verified, committed
            assert f.read()
    hooked.repo.cache.flush()
    # the cache's looks at its own paths went to the disk's stat, not through the hooks' (which would also ask
    # whether each missing cache path is a repository's)
    assert [path for path in asked if path.startswith(cache_root)] == []
