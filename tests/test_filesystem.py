"""dagshub:// through fsspec against the real local server: ls/info/cat/open/get, pandas, caching."""
from __future__ import annotations

import os

import fsspec
import pytest

from streamloader.remote.filesystem import DagsHubFileSystem

TOKEN = "sl-test-token-3f9a1c"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    (root / "data" / "imgs").mkdir(parents=True)
    (root / "data" / "labels.tsv").write_text("a.jpg\tA red\tcaption\t7.5\thttp://x/a\nb.jpg\tblue\t6.6\thttp://x/b\n")
    (root / "data" / "table.csv").write_text("x,y\n1,2\n3,4\n")
    for i in range(30):
        (root / "data" / "imgs" / f"{i:03d}.bin").write_bytes(os.urandom(2000 + i))
    (root / "big.bin").write_bytes(os.urandom(300_000))
    return root


@pytest.fixture
def opts(make_server, tree, tmp_path):
    srv = make_server(str(tree), token=TOKEN)
    return srv, {"host": srv.url, "token": TOKEN, "cache_dir": str(tmp_path / "cache"), "skip_instance_cache": True}


def test_protocol_is_registered(opts):
    _srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    assert isinstance(fs, DagsHubFileSystem)


def test_ls_info_exists_isdir_isfile(opts, tree):
    srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    names = fs.ls("dagshub://user/repo/data", detail=False)
    assert names == ["user/repo/data/imgs", "user/repo/data/labels.tsv", "user/repo/data/table.csv"]
    detail = {d["name"]: d for d in fs.ls("user/repo/data")}
    assert detail["user/repo/data/imgs"]["type"] == "directory"
    assert detail["user/repo/data/labels.tsv"]["size"] == (tree / "data" / "labels.tsv").stat().st_size
    assert fs.info("user/repo/big.bin")["size"] == 300_000
    assert fs.isdir("user/repo/data/imgs") and not fs.isfile("user/repo/data/imgs")
    assert fs.isfile("user/repo/data/imgs/001.bin")
    assert fs.exists("user/repo/data") and not fs.exists("user/repo/nope.txt")
    with pytest.raises(FileNotFoundError):
        fs.info("user/repo/data/nope.txt")
    assert len(fs.find("user/repo/data")) == 32
    assert len(fs.glob("user/repo/data/imgs/*.bin")) == 30


def test_listings_are_cached(opts):
    srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    for _ in range(3):
        fs.ls("user/repo/data/imgs")
        fs.info("user/repo/data/imgs/003.bin")
    assert srv.request_count(kind="content") == 1  # data/imgs once: its listing answers the info too


def test_cat_file_ranges_and_open_random_access(opts, tree):
    _srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    big = (tree / "big.bin").read_bytes()
    assert fs.cat_file("user/repo/big.bin", 10, 110) == big[10:110]
    assert fs.cat_file("user/repo/big.bin", -50) == big[-50:]
    assert fs.cat_file("user/repo/big.bin") == big
    with fs.open("user/repo/big.bin", "rb") as f:
        f.seek(1000)
        assert f.read(10) == big[1000:1010]
        f.seek(-5, 2)
        assert f.read() == big[-5:]
    with pytest.raises(PermissionError):
        fs.open("user/repo/new.txt", "wb")


def test_large_files_are_range_read_not_downloaded_whole(make_server, tree, tmp_path):
    srv = make_server(str(tree), token=TOKEN)
    fs = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=str(tmp_path / "c2"), whole_file_max=100_000,
                           skip_instance_cache=True)
    big = (tree / "big.bin").read_bytes()
    with fs.open("user/repo/big.bin", block_size=32_768) as f:
        f.seek(200_000)
        assert f.read(100) == big[200_000:200_100]
    ranged = [r for r in srv.request_log if r["kind"] == "raw"]
    assert ranged and all(r["range"] for r in ranged)
    assert fs.cache.info()["files"] == 0


def test_fsspec_open_text_and_pandas(opts, tree):
    srv, so = opts
    so = {k: v for k, v in so.items() if k != "skip_instance_cache"}
    with fsspec.open("dagshub://user/repo/data/labels.tsv", "rt", **so) as f:
        assert f.read() == (tree / "data" / "labels.tsv").read_text()
    pd = pytest.importorskip("pandas")
    df = pd.read_csv("dagshub://user/repo/data/table.csv", storage_options=so)
    assert df.to_dict("list") == {"x": [1, 3], "y": [2, 4]}


def test_cat_of_one_path_is_its_bytes_and_of_a_list_a_dict(opts, tree):
    _srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    one = (tree / "data" / "table.csv").read_bytes()
    assert fs.cat("user/repo/data/table.csv") == one  # fsspec's contract: one path, its bytes
    assert fs.cat(["user/repo/data/table.csv"]) == {"user/repo/data/table.csv": one}
    with pytest.raises(IsADirectoryError):  # as fsspec's local file system answers
        fs.cat("user/repo/data/imgs")


def test_cat_many_is_concurrent_and_cached(opts, tree):
    srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    fs.ls("user/repo/data/imgs")
    srv.faults.latency = 0.1
    out = fs.cat("user/repo/data/imgs/*.bin")
    assert len(out) == 30
    for name, data in out.items():
        assert data == (tree / "data" / "imgs" / os.path.basename(name)).read_bytes()
    srv.reset_counts()
    fs.cat("user/repo/data/imgs/*.bin")
    assert srv.request_count(kind="raw") == 0  # second read comes from the cache


def test_get_downloads_tree(opts, tree, tmp_path):
    _srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    dest = tmp_path / "out"
    fs.get("user/repo/data/imgs", str(dest), recursive=True)
    got = sorted(os.listdir(dest))
    assert len(got) == 30
    assert (dest / "007.bin").read_bytes() == (tree / "data" / "imgs" / "007.bin").read_bytes()


def test_prefetch_and_local_path(opts, tree):
    srv, so = opts
    fs = fsspec.filesystem("dagshub", **so)
    paths = [f"user/repo/data/imgs/{i:03d}.bin" for i in range(30)]
    res = fs.prefetch(paths, progress=False)
    assert res.files == 30 and not res.failed
    srv.reset_counts()
    local = fs.local_path(paths[3])
    assert open(local, "rb").read() == (tree / "data" / "imgs" / "003.bin").read_bytes()
    assert srv.request_count(kind="raw") == 0


def test_moved_branch_never_serves_stale_bytes(make_server, tree, tmp_path):
    srv = make_server(str(tree), token=TOKEN)
    cache = str(tmp_path / "shared-cache")
    fs1 = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    assert fs1.cat_file("user/repo/data/table.csv") == b"x,y\n1,2\n3,4\n"
    (tree / "data" / "table.csv").write_text("x,y\n9,9\n")
    fs2 = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    assert fs2.cat_file("user/repo/data/table.csv") == b"x,y\n9,9\n"


def test_new_process_on_known_commit_lists_nothing_and_offline_mode(make_server, tree, tmp_path):
    srv = make_server(str(tree), token=TOKEN)
    cache = str(tmp_path / "persist")
    fs1 = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    data = fs1.cat_file("user/repo/data/imgs/004.bin")
    sha = srv.head_sha()
    srv.reset_counts()
    # pinned to a commit listed before: no branch, commit or listing requests, and the file comes from the cache
    fs2 = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, revision=sha, skip_instance_cache=True)
    assert fs2.cat_file("user/repo/data/imgs/004.bin") == data
    assert fs2.info("user/repo/data/imgs/004.bin")["size"] == len(data)
    assert srv.all_counts() == {}
    # offline: the branch resolves to the commit recorded on this machine; missing things are clear errors
    srv.stop()
    fs3 = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    fs3.repo("user", "repo").offline = True
    assert fs3.cat_file("user/repo/data/imgs/004.bin") == data
    from streamloader.errors import RemoteError

    with pytest.raises(RemoteError, match="offline mode"):
        fs3.cat_file("user/repo/data/imgs/005.bin")
    with pytest.raises(RemoteError, match="offline mode"):
        fs3.ls("user/repo/data")


def test_default_host_follows_the_environment(make_server, tree, tmp_path, monkeypatch):
    """fsspec caches instances by arguments: host=None must not hand back an instance bound to an older host."""
    first, second = make_server(str(tree), token=TOKEN), make_server(str(tree), token=TOKEN)
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    for srv in (first, second):
        monkeypatch.setenv("DAGSHUB_CLIENT_HOST", srv.url)
        fs = fsspec.filesystem("dagshub")
        assert fs.host == srv.url
        assert fs.cat_file("user/repo/data/table.csv") == b"x,y\n1,2\n3,4\n"
        assert srv.request_count(kind="branches") + srv.request_count(kind="repo") >= 1  # this server was asked


def _list_in_child(repo, out):
    out.put([e.path for e in repo.ls("data/imgs")][:2])


def test_fork_while_another_thread_holds_the_locks_does_not_deadlock(make_server, tree, tmp_path):
    import multiprocessing as mp

    srv = make_server(str(tree), token=TOKEN)
    fs = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=str(tmp_path / "c"), skip_instance_cache=True)
    repo = fs.repo("user", "repo")
    repo.revision()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with repo._lock, fs.cache._local_guard:  # as if another thread were inside them at fork time
        child = ctx.Process(target=_list_in_child, args=(repo, out))
        child.start()
        child.join(30)
    assert child.exitcode == 0, "child deadlocked on a lock inherited from the parent"
    assert out.get(timeout=5) == ["data/imgs/000.bin", "data/imgs/001.bin"]


def test_retry_policy_is_a_storage_option(make_server, tree, tmp_path):
    from streamloader.errors import RemoteError

    srv = make_server(str(tree), token=TOKEN)
    fs = fsspec.filesystem("dagshub", host=srv.url, token=TOKEN, cache_dir=str(tmp_path / "c"),
                           retry={"attempts": 2, "initial_backoff": 0.01}, skip_instance_cache=True)
    fs.ls("user/repo/data")
    srv.faults.fail_paths = {"data/table.csv": 503}
    with pytest.raises(RemoteError, match="table.csv"):
        fs.cat_file("user/repo/data/table.csv")
    assert srv.request_count("data/table.csv", kind="raw") == 2


def test_warm_reads_of_unlisted_files_ask_sqlite_nothing_and_a_stale_hint_costs_no_download(
        make_server, tree, tmp_path, monkeypatch):
    import streamloader.remote.listings as listings

    monkeypatch.setattr(listings, "_ABSENT_RECHECK", 60.0)  # a remembered None stays a hint for the whole test
    srv = make_server(str(tree), token=TOKEN)
    cache = str(tmp_path / "cache")
    paths = [f"user/repo/data/imgs/{i:03d}.bin" for i in range(30)]
    want = {p: (tree / "data" / "imgs" / p.rsplit("/", 1)[1]).read_bytes() for p in paths}
    fs = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    assert all(fs.cat_file(p) == want[p] for p in paths)  # cold; nothing lists data/imgs: stored by location
    repo = fs.repo("user", "repo")
    statements: list = []
    repo.cache.flush()  # (the last commits land in the background: a read meanwhile would wait under the lock)
    repo.store._conn().set_trace_callback(statements.append)
    srv.reset_counts()
    for _epoch in range(3):  # warm epochs: served from the cache with no SQLite query per file
        assert all(fs.cat_file(p) == want[p] for p in paths)
    assert [sql for sql in statements if "SELECT" in sql.upper()] == []
    assert srv.request_count(kind="raw") == 0
    # another process lists the folder (hashes: content keys) and fetches the files under those keys, while this
    # one's copies by location are gone: its hints (nothing known) are stale now, and must cost no download
    located = [repo.cached_path(p.split("/", 2)[2]) for p in paths]
    for local in located:
        os.remove(local)
    other = DagsHubFileSystem(host=srv.url, token=TOKEN, cache_dir=cache, skip_instance_cache=True)
    other.ls("user/repo/data/imgs")
    assert all(other.cat_file(p) == want[p] for p in paths)
    srv.reset_counts()
    assert all(fs.cat_file(p) == want[p] for p in paths)
    assert srv.request_count(kind="raw") == 0  # the look under the file's lock asked the store, found the hash
