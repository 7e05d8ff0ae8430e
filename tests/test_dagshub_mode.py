"""streamloader against a server that answers the way dagshub.com does (``DagsHubServer(dagshub_like=True)``):
unpaged listings without sizes, single-object answers for files, a bucket entry at the root, DVC md5 (dos2unix for
text), presigned redirects that expire, Range ignored, 429 with an HTTP-date Retry-After."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import TOKEN, make_jpeg, remote_repo
from streamloader.errors import RemoteError
from streamloader.remote import lookups as lookups_module
from streamloader.remote.client import DagsHubClient, RetryPolicy
from streamloader.remote.repo import RemoteRepo
from streamloader.remote.filesystem import DagsHubFileSystem
from streamloader.server import DagsHubLike

FAST = RetryPolicy(attempts=6, initial_backoff=0.01, max_backoff=0.1, max_retry_after=1.5)


@pytest.fixture
def like(serve):
    return serve(dagshub_like=DagsHubLike(max_in_flight=0))


@pytest.fixture
def hooked(like, hook_project):
    return hook_project(like)


def _requests(srv, kind=None):
    return [e for e in srv.request_log if kind is None or e["kind"] == kind]


def test_the_guides_first_steps_take_three_requests_and_never_list_the_folder(hooked, like, repo_dir):
    like.reset_counts()
    with open("data/labels.tsv") as f:
        rows = f.readlines()
    assert rows[0].startswith("0000.jpg\t")
    img = Image.open("data/0001.jpg")
    assert img.size == (32, 32)
    log = [e for e in _requests(like) if e["kind"] != "presigned"]
    # one raw GET per file (each DVC file answered through its presigned redirect); no listing, no content lookup
    assert [(e["kind"], e["path"]) for e in log] == [("raw", "data/labels.tsv"), ("raw", "data/0001.jpg")], log
    assert all(e["auth"] is None for e in _requests(like, "presigned"))  # the token never left the API origin
    assert like.request_count(kind="presigned") == 2
    # the sizes learnt from the downloads answer os.stat without asking
    assert os.stat("data/0001.jpg").st_size == (repo_dir / "data" / "0001.jpg").stat().st_size
    assert like.request_count(kind="content") == 0


def test_stat_gives_real_sizes_asking_for_one_path_only(hooked, like, repo_dir):
    assert os.stat("data/0002.jpg").st_size == (repo_dir / "data" / "0002.jpg").stat().st_size
    assert os.path.getsize("data/emb/img_emb_0.npy") == (repo_dir / "data" / "emb" / "img_emb_0.npy").stat().st_size
    assert os.path.isdir("data/nested") and not os.path.isfile("data/nested")
    assert not os.path.exists("data/nope.jpg")
    content = _requests(like, "content")
    assert content and all("data" != e["path"] for e in content), content  # data/ itself never listed
    # sizes are asked for files only: on a folder include_size costs the server time per entry
    for e in content:
        if "include_size" in e["query"]:
            assert e["path"] in ("data/0002.jpg", "data/emb/img_emb_0.npy"), e
    assert like.request_count(kind="raw") == 0


def test_listdir_lists_without_sizes_and_a_second_process_lists_nothing(hooked, like, repo_dir, tmp_path):
    names = os.listdir("data")
    assert sorted(names) == sorted(os.listdir(repo_dir / "data"))
    listing = [e for e in _requests(like, "content") if e["path"] == "data"]
    assert len(listing) == 1 and "include_size" not in listing[0]["query"]
    entries = {e.name: e for e in os.scandir("data")}
    assert entries["labels.tsv"].stat().st_size == (repo_dir / "data" / "labels.tsv").stat().st_size
    assert entries["emb"].is_dir()
    like.reset_counts()
    code = textwrap.dedent(f"""
        import os, streamloader
        streamloader.install_hooks({str(tmp_path / 'work')!r}, repo_url={like.repo_url!r}, branch="main")
        print(len(os.listdir("data")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path / "work"), env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(names)
    assert like.request_count(kind="content") == 0  # the stored listing served the new process


def test_listdir_of_a_file_is_not_a_directory_and_buckets_are_not_files(hooked, like):
    with pytest.raises(NotADirectoryError) as err:
        os.listdir("data/labels.tsv")
    assert err.value.errno == errno.ENOTDIR
    root = os.listdir(".")
    assert "data" in root and "README.md" in root
    assert not any(name.startswith("s3") for name in root)  # the connected bucket is not a fake file


def test_crlf_text_hashed_by_dvc_as_dos2unix_verifies(tmp_path, make_server):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    crlf = b"a.jpg\ta caption\t6.5\r\nb.jpg\tanother\t7.0\r\n"
    (root / "data" / "labels.tsv").write_bytes(crlf)
    srv = make_server(root, token=TOKEN, dagshub_like=DagsHubLike(max_in_flight=0))
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    entry = repo.ls("data")[0]
    assert entry.versioning == "dvc" and entry.size is None
    assert repo.read_bytes("data/labels.tsv") == crlf  # verified against the md5 of the LF form
    assert repo.cache_key(entry).kind == "md5"
    repo.cache.flush()
    assert os.path.exists(repo.cache.path_for(repo.cache_key(entry)))


def test_a_crlf_split_by_dvcs_1mib_chunk_boundary_is_hashed_as_dvc_did(tmp_path, make_server):
    """DVC 2 replaced CRLF within each 1 MiB chunk it read: one that the boundary splits stayed in the hash."""
    import hashlib

    line = b"x" * 62 + b"\r\n"
    text = bytearray(line * (2**21 // 64))
    text[2**20 - 3 : 2**20 + 1] = b"yy\r\n"  # the CR ends the first chunk, the LF starts the second
    text = bytes(text)
    dvc = hashlib.md5(text[: 2**20].replace(b"\r\n", b"\n") + text[2**20 :].replace(b"\r\n", b"\n")).hexdigest()
    assert dvc != hashlib.md5(text.replace(b"\r\n", b"\n")).hexdigest()
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "big.tsv").write_bytes(text)
    srv = make_server(root, token=TOKEN, dagshub_like=DagsHubLike(max_in_flight=0))
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    (entry,) = repo.ls("data")
    assert entry.hash == dvc  # the server hashes as DVC 2 did
    assert repo.read_bytes("data/big.tsv") == text  # through the cache
    uncached = RemoteRepo(DagsHubClient(srv.repo_url, token=TOKEN, branch="main", retry=FAST), use_cache=False)
    uncached.ls("data")
    assert uncached.read_bytes("data/big.tsv") == text  # verified in memory
    # bytes that differ from the hashed ones in that split CRLF alone are still refused
    from streamloader.cache.verify import Verifier

    joined = text[: 2**20 - 1] + text[2**20 :]
    assert not Verifier("md5", dvc).verify_bytes(joined)


def test_a_file_dvc_calls_binary_gets_no_dos2unix_second_chance():
    import hashlib

    from streamloader.cache.verify import Verifier

    binary = b"\x00\x01\r\n" * 64  # a NUL in the first 512 bytes: DVC hashed the bytes as they are
    assert not Verifier("md5", hashlib.md5(binary.replace(b"\r\n", b"\n")).hexdigest()).verify_bytes(binary)
    assert Verifier("md5", hashlib.md5(binary).hexdigest()).verify_bytes(binary)
    text = b"a\tb\r\n" * 64
    assert Verifier("md5", hashlib.md5(text.replace(b"\r\n", b"\n")).hexdigest()).verify_bytes(text)


def test_expired_presigned_links_are_asked_for_again(like, tmp_path, repo_dir):
    like.dagshub_like.expire_first = 2
    repo = remote_repo(like, tmp_path / "cache", FAST)
    assert repo.read_bytes("data/0003.jpg") == (repo_dir / "data" / "0003.jpg").read_bytes()
    assert like.request_count("data/0003.jpg", kind="raw") == 3
    like.dagshub_like.expire_first = 100
    with pytest.raises(RemoteError) as err:
        repo.read_bytes("data/0002.jpg")
    assert err.value.status == 403 and "DAGSHUB_TOKEN" not in str(err.value)  # not a credentials problem


def test_du_of_a_folder_listed_without_sizes_asks_each_file_its_size(like, tmp_path, repo_dir):
    fs = DagsHubFileSystem(host=like.url, token=TOKEN, cache_dir=str(tmp_path / "c"), skip_instance_cache=True,
                           retry=FAST)
    listed = fs.ls("user/repo/data/emb")
    assert listed and all(e["size"] is None for e in listed if e["type"] == "file")  # the server said nothing
    local = {p.name: p.stat().st_size for p in (repo_dir / "data" / "emb").iterdir() if p.is_file()}
    sizes = fs.du("user/repo/data/emb", total=False)
    assert {name.rsplit("/", 1)[1]: size for name, size in sizes.items()} == local
    assert fs.du("user/repo/data/emb") == sum(local.values())
    assert like.request_count(kind="content") >= len(local)  # one question per file whose size was unknown


def test_a_server_that_ignores_range_serves_slices_and_range_reads(like, tmp_path, repo_dir):
    fs = DagsHubFileSystem(host=like.url, token=TOKEN, cache_dir=str(tmp_path / "c"), skip_instance_cache=True,
                           retry=FAST, whole_file_max=16)
    data = (repo_dir / "data" / "0001.jpg").read_bytes()
    assert fs.cat_file("user/repo/data/0001.jpg", start=10, end=40) == data[10:40]
    with fs.open("user/repo/data/emb/img_emb_0.npy") as f:  # range reads above whole_file_max
        assert np.load(f).tolist() == np.load(repo_dir / "data" / "emb" / "img_emb_0.npy").tolist()


def test_rate_limits_with_an_http_date_retry_after_are_waited_out(like, tmp_path, repo_dir):
    like.dagshub_like.retry_after = 1.0
    like.dagshub_like.rate_limit_first = 3
    repo = remote_repo(like, tmp_path / "cache", FAST)
    assert repo.read_bytes("README.md") == (repo_dir / "README.md").read_bytes()


def test_a_server_error_on_the_branch_lookup_is_retried_not_reported_missing(like, tmp_path):
    like.faults.apply_to = ("branches",)
    like.faults.error_rate, like.faults.seed = 0.6, 3  # some branch lookups answer 5xx: retried
    repo = remote_repo(like, tmp_path / "cache", FAST)
    assert len(repo.revision()) == 40
    assert sum(1 for e in like.request_log if e["kind"] == "branches" and e["fault"]) >= 1
    like.faults.error_rate = 1.0  # every one does: a server error, never "branch not found"
    repo2 = remote_repo(like, tmp_path / "2" / "cache", FAST)
    with pytest.raises(RemoteError) as err:
        repo2.revision()
    assert "not found" not in str(err.value)


def test_a_missing_path_is_asked_again_after_a_while(like, tmp_path, repo_dir, monkeypatch):
    monkeypatch.setattr(lookups_module, "_MISSING_TTL", 0.2)
    repo = remote_repo(like, tmp_path / "cache", FAST)
    with pytest.raises(FileNotFoundError):
        repo.info("data/new.jpg")
    with pytest.raises(FileNotFoundError):
        repo.info("data/new.jpg")
    asked = like.request_count("data/new.jpg", kind="content")
    assert asked == 1
    import time

    time.sleep(0.3)
    make_jpeg(repo_dir / "data" / "new.jpg", seed=9)  # (the server serves the folder as it is now)
    assert repo.info("data/new.jpg").type == "file"


def test_one_image_of_a_large_synthetic_folder_without_listing_it(tmp_path, make_server):
    root = tmp_path / "repo"
    root.mkdir()
    srv = make_server(root, token=TOKEN, dagshub_like=DagsHubLike(max_in_flight=0, synthetic={"data": 200_000}))
    repo = remote_repo(srv, tmp_path / "cache", FAST)
    with repo.open("data/000123456.jpg") as f:
        assert Image.open(f).size == (32, 32)
    assert repo.stat("data/000199999.jpg").size > 0  # what it is (a file), then its size: for that path only
    assert srv.request_count(kind="content") == 2 and srv.request_count("data", kind="content") == 0
