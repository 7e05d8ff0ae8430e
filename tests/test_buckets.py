"""Connected storage buckets at ``.dagshub/storage/<protocol>/<bucket>/...`` (streamloader/remote/buckets.py and the
server's server/storage.py): paged listings, hooks, ``dagshub://``, prefetch, one download per object across
processes, objects that change between runs, a server whose paging token repeats, and the official client."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import fsspec
import pytest
from PIL import Image

import streamloader
from conftest import (AUTH, TOKEN, api_get, make_jpeg, official_hooks_script, remote_repo, rewrite_file, run_official,
                      write_labels)
from streamloader.errors import PagingError, RemoteError
from streamloader.remote.client import RetryPolicy
from streamloader.server import DagsHubLike

FAST = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05)
BUCKET = ".dagshub/storage/s3/my-bucket"
N_IMAGES = 250


@pytest.fixture(scope="module")
def bucket_template(tmp_path_factory):
    """A bucket folder: images/0000.jpg .. 0249.jpg (8x8 JPEGs), labels.tsv, table.csv, notes/a.txt, b.txt."""
    root = tmp_path_factory.mktemp("bucket-template")
    for i in range(N_IMAGES):
        make_jpeg(root / "images" / f"{i:04d}.jpg", seed=i, size=(8, 8))
    write_labels(root / "labels.tsv", [(f"{i:04d}.jpg", f"caption {i}", "6.5", "u") for i in range(3)])
    (root / "table.csv").write_bytes(b"a,b\n1,2\n3,4\n")
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_bytes(b"first version\n")
    (root / "notes" / "b.txt").write_bytes(b"b one\n")
    (root / "notes" / "c.txt").write_bytes(b"c one\n")
    return root


@pytest.fixture
def bucket_dir(bucket_template, tmp_path):
    import shutil

    return shutil.copytree(bucket_template, tmp_path / "bucket")


@pytest.fixture
def srv(serve, bucket_dir):
    return serve(storage={"s3/my-bucket": str(bucket_dir)})


@pytest.fixture
def hooked(srv, hook_project):
    return hook_project(srv)


def _storage(srv, prefix):
    """{key: count} of the server's storage requests whose key starts with ``prefix`` ("content/", "raw/")."""
    return {k: n for k, n in srv.get_counts("storage").items() if k.startswith(prefix)}


def _pages(srv, folder):
    return [e["query"] for e in srv.request_log if e["kind"] == "storage" and e["path"] == f"content/{folder}"]


# -- listings -------------------------------------------------------------------------------------------------------
def test_a_folder_of_250_objects_lists_in_three_pages_once_per_run(hooked, srv):
    srv.reset_counts()
    names = os.listdir(f"{BUCKET}/images")
    assert names == [f"{i:04d}.jpg" for i in range(N_IMAGES)]
    queries = _pages(srv, "s3/my-bucket/images")
    assert len(queries) == 3, queries
    assert "from_token" not in queries[0] and "from_token=100" in queries[1] and "from_token=200" in queries[2]
    assert all("paging=true" in q for q in queries)
    # the official client's mount: the connected buckets make the folders above them (one GET .../storage)
    assert os.listdir(".dagshub") == ["storage"] and os.listdir(".dagshub/storage") == ["s3"]
    assert os.listdir(".dagshub/storage/s3") == ["my-bucket"]
    assert sorted(os.listdir(BUCKET)) == ["images", "labels.tsv", "notes", "table.csv"]
    assert os.path.isdir(f"{BUCKET}/images") and os.path.isdir(BUCKET) and not os.path.exists(f"{BUCKET}/nope")
    assert sorted(e.name for e in os.scandir(f"{BUCKET}/notes")) == ["a.txt", "b.txt", "c.txt"]
    assert srv.request_count("", kind="storage") == 1
    before = srv.request_count(kind="storage")
    assert len(os.listdir(f"{BUCKET}/images")) == N_IMAGES  # stored for the run: asked once
    assert srv.request_count(kind="storage") == before
    assert "s3" not in os.listdir(".")  # the root listing's bucket entries are not files


def test_workers_share_the_runs_listings_and_offline_mode_refuses_buckets(srv, tmp_path):
    import pickle

    repo = remote_repo(srv, tmp_path / "cache", FAST)
    assert len(repo.listing(f"{BUCKET}/images")) == N_IMAGES
    before = srv.request_count(kind="storage")
    worker = pickle.loads(pickle.dumps(repo))  # what a spawned DataLoader / prefetch worker receives
    assert worker.buckets.run_id == repo.buckets.run_id and worker.buckets.store.path == repo.buckets.store.path
    assert len(worker.listing(f"{BUCKET}/images")) == N_IMAGES and worker.info(f"{BUCKET}/images/0001.jpg").size
    assert srv.request_count(kind="storage") == before  # no listing asked again
    later = remote_repo(srv, tmp_path / "cache", FAST)  # a new run asks again
    assert later.buckets.store.path != repo.buckets.store.path
    assert len(later.listing(f"{BUCKET}/images")) == N_IMAGES and srv.request_count(kind="storage") > before
    offline = remote_repo(srv, tmp_path / "cache", offline=True)
    with pytest.raises(RemoteError, match="offline"):
        offline.listing(f"{BUCKET}/images")
    with pytest.raises(RemoteError, match="offline"):
        offline.read_bytes(f"{BUCKET}/labels.tsv")


# -- open / stat / PIL / dagshub:// / prefetch ------------------------------------------------------------------
def test_open_stat_and_pil_through_the_hooks(hooked, srv, bucket_dir):
    srv.reset_counts()
    with open(f"{BUCKET}/images/0007.jpg", "rb") as f:
        assert f.read() == (bucket_dir / "images" / "0007.jpg").read_bytes()
    # open never lists the folder: one raw GET of the object
    assert [(e["kind"], e["path"]) for e in srv.request_log] == [("storage", "raw/s3/my-bucket/images/0007.jpg")]
    assert os.stat(f"{BUCKET}/images/0007.jpg").st_size == (bucket_dir / "images" / "0007.jpg").stat().st_size
    assert srv.request_count(kind="storage") == 1  # the download told the size
    assert Image.open(f"{BUCKET}/images/0008.jpg").size == (8, 8)
    with open(f"{BUCKET}/labels.tsv") as f:
        assert f.readline() == "0000.jpg\tcaption 0\t6.5\tu\n"
    # stat of an object never downloaded lists its folder (the storage API answers no single-object question)
    assert os.path.getsize(f"{BUCKET}/images/0100.jpg") == (bucket_dir / "images" / "0100.jpg").stat().st_size
    assert len(_pages(srv, "s3/my-bucket/images")) == 3
    with pytest.raises(FileNotFoundError):
        open(f"{BUCKET}/images/missing.jpg", "rb")
    with pytest.raises(IsADirectoryError):
        open(f"{BUCKET}/notes", "rb")
    with pytest.raises(FileNotFoundError):
        os.listdir(".dagshub/storage/s3/other-bucket")


def test_dagshub_urls_pandas_and_the_laion_dataset(srv, bucket_dir, tmp_path):
    pd = pytest.importorskip("pandas")
    options = {"host": srv.url, "token": TOKEN, "branch": "main", "cache_dir": str(tmp_path / "cache"),
               "skip_instance_cache": True}
    base = f"dagshub://user/repo/{BUCKET}"
    table = pd.read_csv(f"{base}/table.csv", storage_options=options)
    assert table.to_dict("list") == {"a": [1, 3], "b": [2, 4]}
    fs = fsspec.filesystem("dagshub", **options)
    assert fs.ls(f"user/repo/{BUCKET}/notes", detail=False) == [f"user/repo/{BUCKET}/notes/{n}"
                                                               for n in ("a.txt", "b.txt", "c.txt")]
    info = fs.info(f"{base}/images/0003.jpg")
    assert info["type"] == "file" and info["size"] == (bucket_dir / "images" / "0003.jpg").stat().st_size
    assert info["hash"] == hashlib.md5((bucket_dir / "images" / "0003.jpg").read_bytes()).hexdigest()
    assert fs.cat_file(f"{base}/notes/a.txt", start=6, end=13) == b"version"
    with fs.open(f"{base}/images/0004.jpg") as f:
        assert f.read() == (bucket_dir / "images" / "0004.jpg").read_bytes()
    assert fs.isdir("user/repo/.dagshub/storage/s3") and fs.ls("user/repo/.dagshub/storage", detail=False) == [
        "user/repo/.dagshub/storage/s3"]
    ds = streamloader.LaionAestheticsDataset(f"{base}/labels.tsv", f"{base}/images", storage_options=options)
    image, score = ds[2]
    assert tuple(image.shape) == (3, 8, 8) and score.item() == pytest.approx(6.5)


def test_prefetch_of_hooked_paths_and_urls_downloads_each_object_once(hooked, srv, bucket_dir, tmp_path):
    paths = [f"{BUCKET}/images/{i:04d}.jpg" for i in range(30)]
    srv.reset_counts()
    result = streamloader.prefetch(paths, progress=False)
    assert result.files == 30 and not result.failed
    urls = [f"dagshub://user/repo/{BUCKET}/images/{i:04d}.jpg" for i in range(30, 40)]
    options = {"host": srv.url, "token": TOKEN, "branch": "main", "cache_dir": str(tmp_path / "c2"),
               "skip_instance_cache": True}
    assert streamloader.prefetch(urls, progress=False, storage_options=options).files == 10
    raws = _storage(srv, "raw/")
    assert len(raws) == 40 and set(raws.values()) == {1}
    for path in paths[:5]:  # served from the cache
        with open(path, "rb") as f:
            assert f.read() == (bucket_dir / path.split("/", 4)[4]).read_bytes()
    assert srv.request_count(kind="storage") == 40


# -- concurrency ----------------------------------------------------------------------------------------------------
READER = textwrap.dedent(
    """
    import hashlib, json, sys
    from concurrent.futures import ThreadPoolExecutor
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.repo import RemoteRepo
    url, token, cache, out = sys.argv[1:5]
    repo = RemoteRepo(DagsHubClient(url, token=token, branch="main"), FileCache(cache))
    folder = ".dagshub/storage/s3/my-bucket/images"
    names = repo.listing(folder).names()[:40]
    with ThreadPoolExecutor(8) as pool:
        data = list(pool.map(lambda n: repo.read_bytes(folder + "/" + n), names))
    with open(out, "w") as f:
        json.dump({n: hashlib.sha256(d).hexdigest() for n, d in zip(names, data)}, f)
    """
)


def test_four_processes_download_each_object_once(repo_dir, bucket_dir, make_server_process, tmp_path):
    proc = make_server_process(repo_dir, token=TOKEN, storage={"s3/my-bucket": str(bucket_dir)})  # --storage
    script = tmp_path / "reader.py"
    script.write_text(READER)
    cache = tmp_path / "shared-cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, str(script), proc.repo_url, TOKEN, str(cache), str(tmp_path / f"{i}.json")],
                             env=env) for i in range(4)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0, 0, 0]
    want = {f"{i:04d}.jpg": hashlib.sha256((bucket_dir / "images" / f"{i:04d}.jpg").read_bytes()).hexdigest()
            for i in range(40)}
    assert all(json.loads((tmp_path / f"{i}.json").read_text()) == want for i in range(4))
    raws = _storage(proc, "raw/")
    assert len(raws) == 40 and set(raws.values()) == {1}, raws  # one download per object, whoever asked
    assert proc.get_counts("storage")["content/s3/my-bucket/images"] == 4 * 3  # each process is its own run

    # objects opened without a listing: prefetch workers (processes) share their parent's run
    proc.reset_counts()
    repo = remote_repo(proc, tmp_path / "c2")
    paths = [f"{BUCKET}/images/{i:04d}.jpg" for i in range(60)]
    result = repo.prefetch(paths, processes=4, progress=False)
    assert result.files == 60 and not result.failed
    raws = _storage(proc, "raw/")
    assert len(raws) == 60 and set(raws.values()) == {1}
    assert repo.read_bytes(paths[0]) == (bucket_dir / "images" / "0000.jpg").read_bytes()
    assert proc.request_count(kind="storage") == 60


# -- objects that change ----------------------------------------------------------------------------------------
def test_an_object_changed_between_runs_is_fetched_again_and_never_served_stale(srv, bucket_dir, tmp_path):
    a, b, c = (f"{BUCKET}/notes/{n}.txt" for n in "abc")
    first = remote_repo(srv, tmp_path / "cache", FAST)
    first.ls(f"{BUCKET}/notes")
    assert first.read_bytes(a) == b"first version\n"
    rewrite_file(bucket_dir / "notes" / "a.txt", b"other version\n")  # same size, new content
    rewrite_file(bucket_dir / "notes" / "b.txt", b"b two, longer\n")
    assert first.read_bytes(a) == b"first version\n"  # this run's listing named that version: its snapshot
    with pytest.raises(RemoteError):  # listed at 6 bytes, now 14: refused, never passed off as that version
        first.read_bytes(b)

    srv.reset_counts()
    second = remote_repo(srv, tmp_path / "cache", FAST)  # a later run asks again, and sees the change
    second.ls(f"{BUCKET}/notes")
    assert second.read_bytes(a) == b"other version\n" and second.read_bytes(b) == b"b two, longer\n"
    assert srv.request_count("raw/s3/my-bucket/notes/a.txt", kind="storage") == 1
    # an object opened before its folder is listed is cached for this run only: a later run downloads it again,
    # and once this run's listing names a newer version, that copy is not served any more
    third = remote_repo(srv, tmp_path / "cache", FAST)
    with open(third.local_path(c), "rb") as f:
        assert f.read() == b"c one\n"
    fourth = remote_repo(srv, tmp_path / "cache", FAST)
    assert fourth.read_bytes(c) == b"c one\n"
    assert srv.request_count("raw/s3/my-bucket/notes/c.txt", kind="storage") == 2
    rewrite_file(bucket_dir / "notes" / "c.txt", b"c two\n")
    fourth.ls(f"{BUCKET}/notes")
    assert fourth.read_bytes(c) == b"c two\n"

    srv.reset_counts()
    fifth = remote_repo(srv, tmp_path / "cache", FAST)
    fifth.ls(f"{BUCKET}/notes")
    assert [fifth.read_bytes(p) for p in (a, b, c)] == [b"other version\n", b"b two, longer\n", b"c two\n"]
    assert _storage(srv, "raw/") == {}  # nothing changed since the last listing: all from the cache


def test_a_repeating_next_token_is_a_paging_error_not_an_endless_loop(hooked, srv, tmp_path):
    srv.faults.storage_token_repeats = True
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    with pytest.raises(PagingError):
        repo.listing(f"{BUCKET}/images")
    assert len(_pages(srv, "s3/my-bucket/images")) == 2
    with pytest.raises(PagingError):
        os.listdir(f"{BUCKET}/images")
    srv.faults.storage_token_repeats = False
    assert len(repo.listing(f"{BUCKET}/images")) == N_IMAGES  # nothing half-stored was kept


# -- the server -----------------------------------------------------------------------------------------------------
def test_the_server_pages_lists_and_serves_buckets_the_way_the_official_client_parses_them(srv, bucket_dir):
    dacite = pytest.importorskip("dacite")
    from dagshub.common.api.responses import ContentAPIEntry, StorageAPIEntry, StorageContentAPIResult

    storages = [dacite.from_dict(StorageAPIEntry, s) for s in api_get(srv, "storage").json()]
    assert [str(s.path_in_mount) for s in storages] == [BUCKET]
    assert storages[0].list_path == f"{srv.api_url}/storage/content/s3/my-bucket"
    root = [dacite.from_dict(ContentAPIEntry, e) for e in api_get(srv, "content/main/").json()]
    assert [(e.path, e.versioning) for e in root if e.type == "storage"] == [("s3/my-bucket", "bucket")]
    first = api_get(srv, "storage/content/s3/my-bucket/images", params={"paging": "true"}).json()
    page = dacite.from_dict(StorageContentAPIResult, first)
    assert len(page.entries) == 100 and page.next_token == "100"
    entry = page.entries[0]
    data = (bucket_dir / "images" / "0000.jpg").read_bytes()
    assert (entry.path, entry.type, entry.size, entry.hash, entry.versioning) == (
        "s3/my-bucket/images/0000.jpg", "file", len(data), hashlib.md5(data).hexdigest(), "bucket")
    last = api_get(srv, "storage/content/s3/my-bucket/images", params={"paging": "true", "from_token": "200"}).json()
    assert len(last["entries"]) == 50 and last["next_token"] is None
    assert len(api_get(srv, "storage/content/s3/my-bucket/images", params={"limit": "7"}).json()["entries"]) == 7
    top = api_get(srv, "storage/content/s3/my-bucket/").json()
    assert [(e["path"], e["type"]) for e in top["entries"]][:2] == [("s3/my-bucket/images", "dir"),
                                                                     ("s3/my-bucket/labels.tsv", "file")]
    raw = api_get(srv, "storage/raw/s3/my-bucket/images/0000.jpg")
    assert raw.content == data and raw.headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    ranged = api_get(srv, "storage/raw/s3/my-bucket/images/0000.jpg", headers={**AUTH, "Range": "bytes=0-3"})
    assert (ranged.status_code, ranged.content) == (206, data[:4])
    assert api_get(srv, "storage/content/s3/my-bucket/notes/a.txt").json()["path"] == "s3/my-bucket/notes/a.txt"
    for missing in ("storage/content/s3/nope/", "storage/raw/s3/my-bucket/nope.jpg", "storage/raw/s3/my-bucket/notes"):
        assert api_get(srv, missing).status_code == 404, missing
    # the dagshub-like mode's own bucket is connected too (empty), in every place that names buckets
    srv.dagshub_like = DagsHubLike(max_in_flight=0)
    names = sorted(f"{s['protocol']}/{s['name']}" for s in api_get(srv, "storage").json())
    assert names == ["s3/my-bucket", "s3/streamloader-bucket"]
    assert sorted(e["path"] for e in api_get(srv, "content/main/").json() if e["type"] == "storage") == names
    assert api_get(srv, "storage/content/s3/streamloader-bucket").json() == {"entries": [], "next_token": None}
    assert len(api_get(srv, "storage/content/s3/my-bucket/images", params={"paging": "true"}).json()["entries"]) == 100


# -- the official client ------------------------------------------------------------------------------------------
OFFICIAL_SCRIPT = official_hooks_script("""
    bucket = os.path.join(mount, ".dagshub", "storage", "s3", "my-bucket")
    res["root"] = sorted(os.listdir(mount))
    res["buckets"] = sorted(os.listdir(os.path.join(mount, ".dagshub", "storage", "s3")))
    res["images"] = sorted(os.listdir(os.path.join(bucket, "images")))
    with open(os.path.join(bucket, "images", "0003.jpg"), "rb") as f:
        res["jpg_sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(bucket, "notes", "a.txt")) as f:
        res["text"] = f.read()
    """)


def test_the_official_client_lists_and_reads_a_bucket_through_its_hooks(srv, bucket_dir, tmp_path):
    pytest.importorskip("dagshub")
    (tmp_path / "mount").mkdir()
    env = {"DAGSHUB_CLIENT_HOST": srv.url, "DAGSHUB_USER_TOKEN": TOKEN}
    srv.reset_counts()
    res = run_official(OFFICIAL_SCRIPT, [srv.repo_url, tmp_path / "mount"], env, tmp_path, "official_buckets")
    assert ".dagshub" in res["root"] and res["buckets"] == ["my-bucket"]
    assert res["images"] == [f"{i:04d}.jpg" for i in range(N_IMAGES)]
    assert res["jpg_sha256"] == hashlib.sha256((bucket_dir / "images" / "0003.jpg").read_bytes()).hexdigest()
    assert res["text"] == "first version\n"
    assert len(_pages(srv, "s3/my-bucket/images")) == 3  # it followed every next_token to the null one
    assert srv.request_count("raw/s3/my-bucket/images/0003.jpg", kind="storage") == 1
