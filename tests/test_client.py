"""DagsHubClient against the real local server: revisions, listings, ranges, retries, typed errors."""
from __future__ import annotations

import io
import os
import time

import pytest

from streamloader.errors import (AuthenticationError, RemoteError, RemoteFileNotFoundError,
                                 RevisionNotFoundError)
from streamloader.remote.client import DagsHubClient, RetryPolicy
from streamloader.remote.entries import parse_entries
from streamloader.remote.urls import RepoRef, safe_repo_path

TOKEN = "sl-test-token-3f9a1c"
FAST = RetryPolicy(attempts=6, max_time=20, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "a.bin").write_bytes(os.urandom(70_000))
    (root / "data" / "b.txt").write_text("hello\n")
    (root / "data" / "sub" / "c.txt").write_text("nested")
    (root / "top.txt").write_text("top")
    return root


@pytest.fixture
def srv(make_server, tree):
    return make_server(str(tree), token=TOKEN)


def client_for(srv, **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("retry", FAST)
    return DagsHubClient(srv.repo_url, **kw)


def test_repo_ref_parsing():
    ref = RepoRef.parse("https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus.git")
    assert (ref.host, ref.owner, ref.repo) == ("https://dagshub.com", "DagsHub-Datasets", "LAION-Aesthetics-V2-6.5plus")
    assert RepoRef.parse("o/r", host="http://127.0.0.1:9/").url == "http://127.0.0.1:9/o/r"
    with pytest.raises(ValueError):
        RepoRef.parse("https://dagshub.com/only-owner")
    for bad in ("../x", "/etc/passwd", "a/../../b", "a\x00b", "a\\b"):
        with pytest.raises(ValueError):
            safe_repo_path(bad)
    assert safe_repo_path("./data//x.jpg") == "data/x.jpg"


def test_revision_is_resolved_once_and_pinned(srv, tree):
    c = client_for(srv, branch="main")
    sha = c.resolve_revision()
    assert sha == srv.head_sha() and len(sha) == 40
    (tree / "data" / "b.txt").write_text("changed\n")
    assert srv.head_sha() != sha  # the branch moved...
    assert c.resolve_revision() == sha  # ...but this client keeps reading its snapshot
    assert srv.request_count(kind="branches") == 1
    assert client_for(srv, branch="main").resolve_revision() == srv.head_sha()


def test_default_branch_and_explicit_revision(srv):
    assert client_for(srv).resolve_revision() == srv.head_sha()
    assert client_for(srv, revision=srv.head_sha()).resolve_revision() == srv.head_sha()
    with pytest.raises(RevisionNotFoundError, match="nope"):
        client_for(srv, branch="nope").resolve_revision()
    with pytest.raises(RevisionNotFoundError):
        client_for(srv, revision="0" * 40, branch="main").resolve_revision()


def test_listing_has_full_paths_real_sizes_and_hashes(srv, tree):
    c = client_for(srv)
    entries = {e.path: e for e in c.list_dir("data")}
    assert set(entries) == {"data/a.bin", "data/b.txt", "data/sub"}
    assert entries["data/a.bin"].size == 70_000 and entries["data/a.bin"].type == "file"
    assert entries["data/sub"].is_dir and entries["data/sub"].size == 0
    assert entries["data/a.bin"].hash
    assert {e.path for e in c.list_dir("")} == {"data", "top.txt"}
    with pytest.raises(RemoteFileNotFoundError):
        c.list_dir("missing")


def test_read_whole_and_ranges(srv, tree):
    c = client_for(srv)
    data = (tree / "data" / "a.bin").read_bytes()
    assert c.read_bytes("data/a.bin") == data
    assert c.read_bytes("data/a.bin", 100, 1100) == data[100:1100]
    assert c.read_bytes("data/a.bin", 69_990) == data[69_990:]
    assert c.read_bytes("data/a.bin", 5, 5) == b""
    with pytest.raises(FileNotFoundError) as info:
        c.read_bytes("data/none.bin")
    assert info.value.errno == 2


def test_auth_errors_are_typed_and_hint_at_token(srv):
    with pytest.raises(AuthenticationError, match="DAGSHUB_TOKEN") as info:
        client_for(srv, token="wrong-token").list_dir("data")
    assert "wrong-token" not in str(info.value)


def test_retries_5xx_and_429_with_retry_after(srv, tree):
    c = client_for(srv)
    c.resolve_revision()
    srv.faults.fail_first = {"data/b.txt": 3}
    assert c.read_bytes("data/b.txt") == b"hello\n"
    assert srv.request_count("data/b.txt", kind="raw") == 4
    srv.faults.fail_first = {}
    srv.faults.throttle_rate = 1.0
    srv.faults.retry_after = 0.3
    srv.reset_counts()
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="429"):  # pushbacks spend the throttled-time budget, not the attempts
        client_for(srv, retry=RetryPolicy(attempts=3, max_time=10, max_throttled_time=1.0)).read_bytes("data/b.txt")
    assert 0.55 <= time.monotonic() - t0 < 5  # waits of Retry-After, until the budget is spent
    assert srv.request_count("data/b.txt", kind="raw") > 3
    srv.faults.throttle_rate = 0.0


def test_truncated_bodies_are_retried_never_returned_short(srv, tree):
    c = client_for(srv)
    c.resolve_revision()
    data = (tree / "data" / "a.bin").read_bytes()
    srv.faults.drop_rate = 0.5
    srv.faults.seed = 7
    for _ in range(10):
        assert c.read_bytes("data/a.bin") == data
    srv.faults.drop_rate = 1.0
    with pytest.raises(RemoteError, match="a.bin"):
        client_for(srv, retry=RetryPolicy(attempts=3, max_time=5, initial_backoff=0.01)).read_bytes("data/a.bin")


def test_permanent_failure_ends_in_clear_error_within_budget(srv):
    srv.faults.fail_paths = {"data/b.txt": 500}
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as info:
        client_for(srv, retry=RetryPolicy(attempts=4, max_time=5, initial_backoff=0.01)).read_bytes("data/b.txt")
    assert "data/b.txt" in str(info.value) and info.value.status == 500
    assert time.monotonic() - t0 < 5


def test_connection_refused_fails_within_retry_budget():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = DagsHubClient(f"http://127.0.0.1:{port}/o/r", token=TOKEN,
                      retry=RetryPolicy(attempts=3, max_time=3, initial_backoff=0.01))
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="ConnectionError"):
        c.resolve_revision()
    assert time.monotonic() - t0 < 5


def test_token_not_sent_across_origin_on_redirect(make_server, srv, tmp_path):
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = make_server(str(other_root))
    c = client_for(srv)
    c.resolve_revision()
    srv.faults.redirect_raw_to = other.url.replace("127.0.0.1", "localhost")
    with pytest.raises(FileNotFoundError):
        c.read_bytes("data/b.txt")  # the other origin does not have the repo
    deadline = time.monotonic() + 5  # the server logs a request after answering it
    while not [r for r in other.request_log if r["kind"] == "raw"] and time.monotonic() < deadline:
        time.sleep(0.02)
    raw = [r for r in other.request_log if r["kind"] == "raw"]
    assert raw and not any(r["has_auth"] for r in raw)
    assert all(r["has_auth"] for r in srv.request_log if r["kind"] == "raw")


def test_client_pickles_without_session_and_token_stays_hidden(srv):
    import pickle

    c = client_for(srv)
    c.list_dir("data")
    clone = pickle.loads(pickle.dumps(c))
    assert [e.path for e in clone.list_dir("data")] == [e.path for e in c.list_dir("data")]
    assert TOKEN not in repr(c)


def test_listing_entries_outside_directory_are_skipped(caplog):
    items = [{"path": "data/ok.jpg", "type": "file", "size": 1, "hash": "h"},
             {"path": "data/../../etc/passwd", "type": "file", "size": 1, "hash": "h"},
             {"path": "/etc/passwd", "type": "file", "size": 1, "hash": "h"},
             {"path": "other/x.jpg", "type": "file", "size": 1, "hash": "h"},
             {"path": "data/sub/deeper.jpg", "type": "file", "size": 1, "hash": "h"},
             {"type": "file"}]
    kept = list(parse_entries(items, "data"))
    assert [e.path for e in kept] == ["data/ok.jpg"]


def test_concurrent_reads_share_a_pool(srv, tree):
    from concurrent.futures import ThreadPoolExecutor

    for i in range(40):
        (tree / "data" / f"f{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    c = client_for(srv, max_concurrency=16)
    srv.faults.latency = 0.1
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: c.read_bytes(f"data/f{i}.bin"), range(40)))
    elapsed = time.monotonic() - t0
    assert got == [bytes([i]) * (1000 + i) for i in range(40)]
    assert elapsed < 40 * 0.1 / 2  # clearly concurrent, not sequential


def test_listing_entries_that_change_under_normalisation_are_refused():
    items = [{"path": "data/.", "type": "file", "size": 1, "hash": "h"},
             {"path": "data//x.jpg", "type": "file", "size": 1, "hash": "h"},
             {"path": "data/./y.jpg", "type": "file", "size": 1, "hash": "h"},
             {"path": "data/sub/", "type": "dir", "size": 0, "hash": "h"}]
    assert [e.path for e in parse_entries(items, "data")] == ["data/sub"]
