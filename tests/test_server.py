"""The local DagsHub-compatible server (streamloader/server): endpoints, shapes, security, fault knobs, processes.

Requests go through ``requests`` or, where the exact bytes of the request line matter (traversal attempts that
``requests`` would normalise away), through ``http.client``.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from _helpers import git_blob_sha1
from conftest import AUTH, LABEL_ROWS, TOKEN, api_get, make_jpeg, rewrite_file
from streamloader.server import DagsHubServer, ServerFaults, ServerProcess
from streamloader.server.routes import Unsatisfiable, parse_range

SECRET = b"TOP-SECRET-outside-the-served-folder"


def raw_request(srv, target, method="GET", headers=None):
    """Send ``target`` verbatim as the request path; returns (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {**AUTH, **(headers or {})}.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- records -----------------------------------------------------------------------------------------------------


def test_user_and_repo_records_have_every_key_the_official_client_needs(server):
    user = requests.get(f"{server.url}/api/v1/user", headers=AUTH, timeout=10).json()
    assert {"id", "login", "username", "full_name"} <= set(user) and user["login"] == "user"
    assert requests.get(f"{server.url}/api/v1/users/user", headers=AUTH, timeout=10).status_code == 200
    assert requests.get(f"{server.url}/api/v1/users/nobody", headers=AUTH, timeout=10).status_code == 404
    repo = requests.get(server.api_url, headers=AUTH, timeout=10).json()
    required = {"id", "owner", "name", "full_name", "description", "private", "fork", "empty", "mirror", "size",
                "html_url", "clone_url", "stars_count", "forks_count", "watchers_count", "open_issues_count",
                "default_branch", "created_at", "updated_at"}
    assert required <= set(repo)
    assert {"id", "login", "full_name", "username"} <= set(repo["owner"])
    assert (repo["full_name"], repo["default_branch"], repo["html_url"]) == ("user/repo", "main", server.repo_url)
    assert api_get(server, "storage").json() == []
    assert api_get(server, "storage/content/s3/bucket/x").status_code == 404
    assert requests.get(f"{server.url}/api/v1/repos/user/other", headers=AUTH, timeout=10).status_code == 404


def test_branch_and_commit_endpoints(server):
    branch = api_get(server, "branches/main").json()
    sha = branch["commit"]["id"]
    assert branch["name"] == "main" and re.fullmatch(r"[0-9a-f]{40}", sha)
    assert {"id", "message", "url", "timestamp"} <= set(branch["commit"])
    assert sha == server.head_sha()
    assert api_get(server, "branches").json()[0]["name"] == "main"
    assert api_get(server, "branches/nope").status_code == 404
    assert api_get(server, f"commits/{sha}").json()["commit"]["id"] == sha
    assert api_get(server, "commits/" + "0" * 40).status_code == 404


def test_commit_sha_is_stable_and_follows_changes(server, repo_dir):
    first = server.head_sha()
    assert server.head_sha() == first
    rewrite_file(repo_dir / "data" / "labels.tsv", b"x.jpg\tnew caption\t7\thttp://x\n")
    second = api_get(server, "branches/main").json()["commit"]["id"]
    assert second != first
    # an issued sha stays valid (no history is kept: it serves the current folder)
    assert api_get(server, f"commits/{first}").status_code == 200
    assert api_get(server, f"raw/{first}/data/labels.tsv").content == b"x.jpg\tnew caption\t7\thttp://x\n"
    (repo_dir / "data" / "added.txt").write_bytes(b"new")
    assert server.head_sha() not in (first, second)
    # a sha the server never issued is unknown everywhere
    for path in ("commits/", "content/", "raw/"):
        assert api_get(server, path + "f" * 40 + ("/README.md" if path == "raw/" else "")).status_code == 404


# --- listings ----------------------------------------------------------------------------------------------------


def test_listing_shapes_sizes_and_hashes(server, repo_dir):
    root = api_get(server, "content/main/").json()
    assert [(e["path"], e["type"], e["size"]) for e in root] == [("README.md", "file", 12), ("data", "dir", 0)]
    data = {e["path"]: e for e in api_get(server, "content/main/data", params={"include_size": "true"}).json()}
    assert sorted(data) == ["data/0000.jpg", "data/0001.jpg", "data/0002.jpg", "data/0003.jpg", "data/emb",
                            "data/labels.tsv", "data/nested"]
    for path, entry in data.items():
        assert entry["versioning"] == "git" and isinstance(entry["hash"], str) and entry["hash"]
        if entry["type"] == "file":
            content = (repo_dir / path).read_bytes()
            assert (entry["size"], entry["hash"]) == (len(content), git_blob_sha1(content))
            # download_url points back at this server
            assert requests.get(entry["download_url"], headers=AUTH, timeout=10).content == content
        else:
            assert entry["size"] == 0
            listing = requests.get(entry["content_url"], headers=AUTH, timeout=10).json()
            assert all(e["path"].startswith(path + "/") for e in listing)
    assert [e["path"] for e in api_get(server, "content/main/data/nested/deeper").json()] == [
        "data/nested/deeper/note.txt"]
    sha = server.head_sha()
    assert [e["path"] for e in api_get(server, f"content/{sha}/data").json()] == sorted(data)
    one = api_get(server, "content/main/data/labels.tsv")  # a file path answers with that file's own entry
    assert one.status_code == 200 and one.json()["path"] == "data/labels.tsv" and one.json()["type"] == "file"
    assert api_get(server, "content/main/nope").status_code == 404
    assert api_get(server, "content/nobranch/data").status_code == 404


def test_listing_pages(server):
    full = api_get(server, "content/main/data").json()
    pages, token = [], None
    while True:
        params = {"paging": "true", "limit": "3", **({"from_token": token} if token else {})}
        body = api_get(server, "content/main/data", params=params).json()
        pages.append(body["entries"])
        token = body["next_token"]
        if token is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [e for p in pages for e in p] == full
    assert set(api_get(server, "content/main/data", params={"limit": 100}).json()) == {"entries", "next_token"}
    assert api_get(server, "content/main/data", params={"paging": "true", "from_token": "x"}).status_code == 400


def test_names_that_need_quoting_round_trip(server, repo_dir):
    (repo_dir / "data" / "odd name #1 & ?.txt").write_bytes(b"odd")
    entry = next(e for e in api_get(server, "content/main/data").json() if e["path"].endswith(".txt"))
    assert entry["path"] == "data/odd name #1 & ?.txt"
    assert requests.get(entry["download_url"], headers=AUTH, timeout=10).content == b"odd"


# --- raw ---------------------------------------------------------------------------------------------------------


def test_raw_bytes_headers_and_head(server, repo_dir):
    content = (repo_dir / "data" / "0000.jpg").read_bytes()
    resp = api_get(server, "raw/main/data/0000.jpg")
    assert resp.status_code == 200 and resp.content == content
    assert int(resp.headers["Content-Length"]) == len(content)
    assert resp.headers["ETag"] == f'"{git_blob_sha1(content)}"' and resp.headers["Accept-Ranges"] == "bytes"
    head = requests.head(f"{server.api_url}/raw/main/data/0000.jpg", headers=AUTH, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(content))
    assert api_get(server, f"raw/{server.head_sha()}/data/0000.jpg").content == content
    assert api_get(server, "raw/main/data/missing.jpg").status_code == 404
    assert api_get(server, "raw/main/data").status_code == 404
    assert api_get(server, "raw/other-branch/data/0000.jpg").status_code == 404
    assert requests.post(f"{server.api_url}/raw/main/README.md", headers=AUTH, timeout=10).status_code == 405


@pytest.mark.parametrize(
    "header, status, span",
    [
        ("bytes=0-9", 206, (0, 9)),
        ("bytes=10-", 206, (10, None)),
        ("bytes=-5", 206, (-5, None)),
        ("bytes=5-100000000", 206, (5, None)),
        ("bytes=abc", 200, None),
        ("bytes=0-1,4-5", 200, None),
        ("bytes=9-3", 200, None),
    ],
)
def test_range_requests(server, repo_dir, header, status, span):
    content = (repo_dir / "data" / "labels.tsv").read_bytes()
    resp = api_get(server, "raw/main/data/labels.tsv", headers={**AUTH, "Range": header})
    assert resp.status_code == status
    if span is None:
        assert resp.content == content and "Content-Range" not in resp.headers
        return
    start, end = span
    expected = content[start:] if end is None else content[start : end + 1]
    first = start % len(content)
    assert resp.content == expected
    assert resp.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(content)}"
    assert int(resp.headers["Content-Length"]) == len(expected)


@pytest.mark.parametrize("header", ["bytes=100000-", "bytes=-0", "bytes=100000-100010"])
def test_unsatisfiable_range_is_416(server, repo_dir, header):
    size = (repo_dir / "data" / "labels.tsv").stat().st_size
    resp = api_get(server, "raw/main/data/labels.tsv", headers={**AUTH, "Range": header})
    assert resp.status_code == 416 and resp.headers["Content-Range"] == f"bytes */{size}"


def test_parse_range_edges():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("BYTES=2-2", 10) == (2, 2)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=-1", 0)


# --- auth --------------------------------------------------------------------------------------------------------


def test_token_is_required_bearer_or_basic(server):
    endpoints = ["", "branches/main", "content/main/", "raw/main/README.md", "storage"]
    for path in endpoints:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Token{TOKEN}"}):
            resp = api_get(server, path, headers=headers)
            assert resp.status_code == 401 and "message" in resp.json(), (path, headers)
        assert api_get(server, path).status_code == 200
        assert api_get(server, path, auth=("anyone", TOKEN)).status_code == 200
        assert api_get(server, path, auth=(TOKEN, "not-it")).status_code == 401
    assert requests.get(f"{server.url}/api/v1/user", timeout=10).status_code == 401
    # the rejected requests were counted and logged, with what they carried
    log = [e for e in server.request_log if e["status"] == 401]
    assert any(e["auth"] == "Bearer wrong" and e["has_auth"] for e in log)
    assert any(e["auth"] is None and not e["has_auth"] for e in log)


def test_server_without_token_accepts_anything(make_server, repo_dir):
    srv = make_server(repo_dir)
    assert requests.get(f"{srv.url}/api/v1/user", timeout=10).json()["login"] == "user"
    assert api_get(srv, "raw/main/README.md", headers={"Authorization": "Bearer whatever"}).content == b"# test repo\n"


# --- security ----------------------------------------------------------------------------------------------------


@pytest.fixture
def hostile_tree(tmp_path, repo_dir):
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    os.symlink(tmp_path / "secret.txt", repo_dir / "link_out.txt")
    os.symlink(tmp_path / "outside", repo_dir / "dir_out")
    os.symlink(repo_dir / "README.md", repo_dir / "link_in.md")
    (repo_dir / ".git").mkdir()
    (repo_dir / ".git" / "config").write_bytes(SECRET)
    return repo_dir


@pytest.mark.parametrize(
    "target",
    [
        "raw/main/../secret.txt",
        "raw/main/data/../../secret.txt",
        "raw/main/%2e%2e/secret.txt",
        "raw/main/%2E%2E%2Fsecret.txt",
        "raw/main/data%2f..%2f..%2fsecret.txt",
        "raw/main/data%5c..%5c..%5csecret.txt",
        "raw/main//%2Fsecret.txt",
        "raw/main/%2F" + "%2F".join(["tmp", "secret.txt"]),
        "raw/main/README.md%00.txt",
        "raw/main/link_out.txt",
        "raw/main/dir_out/secret.txt",
        "raw/main/.git/config",
        "raw/main/data/./../../secret.txt",
        "content/main/dir_out",
        "content/main/..",
        "content/main/.git",
    ],
)
def test_traversal_attempts_never_leak(server, hostile_tree, target):
    status, body = raw_request(server, f"/api/v1/repos/user/repo/{target}")
    assert status in (400, 404) and SECRET not in body


def test_listings_omit_links_out_and_git_but_serve_links_in(server, hostile_tree):
    names = [e["path"] for e in api_get(server, "content/main/").json()]
    assert names == ["README.md", "data", "link_in.md"]
    assert api_get(server, "raw/main/link_in.md").content == b"# test repo\n"
    # changes inside .git never move the branch
    sha = server.head_sha()
    (hostile_tree / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    assert server.head_sha() == sha


def test_refuses_to_serve_a_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError):
        DagsHubServer(str(tmp_path / "nope"))


# --- faults ------------------------------------------------------------------------------------------------------


def test_latency_delays_every_request(server):
    server.faults.latency = 0.2
    started = time.monotonic()
    assert api_get(server, "content/main/").status_code == 200
    assert time.monotonic() - started >= 0.2
    server.faults.latency = 0.0


def test_concurrent_requests_are_not_serialized(server):
    server.faults.latency = 0.2
    started = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda i: api_get(server, f"raw/main/data/{i % 4:04d}.jpg").status_code, range(64)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 64
    assert elapsed < 5.0, f"64 requests with 0.2 s latency took {elapsed:.1f} s: the server serializes them"
    assert server.request_count(kind="raw") == 64


def test_error_rate_hits_only_the_chosen_kinds(server):
    server.faults.error_rate = 1.0
    assert {api_get(server, "raw/main/README.md").status_code for _ in range(10)} <= {500, 502, 503}
    assert api_get(server, "content/main/").status_code == 200
    server.faults.apply_to = ("raw", "content")
    assert api_get(server, "content/main/").status_code in (500, 502, 503)
    assert api_get(server, "branches/main").status_code == 200


def test_random_rates_are_reproducible_with_a_seed(make_server, repo_dir):
    def statuses(seed):
        srv = make_server(repo_dir, faults=ServerFaults(error_rate=0.3, throttle_rate=0.3, seed=seed))
        return [api_get(srv, "raw/main/README.md").status_code for _ in range(40)]

    first = statuses(1)
    assert first == statuses(1)
    assert {200, 429} <= set(first) and set(first) & {500, 502, 503}


@pytest.mark.parametrize("retry_after, header", [(2, "2"), (2.0, "2"), (0.5, "0.5"), (0, "0")])
def test_throttle_answers_429_with_retry_after(server, retry_after, header):
    server.faults.throttle_rate = 1.0
    server.faults.retry_after = retry_after
    resp = api_get(server, "raw/main/README.md")
    assert resp.status_code == 429 and resp.headers["Retry-After"] == header


def test_drop_sends_half_the_body_then_closes(server, repo_dir):
    server.faults.drop_rate = 1.0
    content = (repo_dir / "data" / "0000.jpg").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/api/v1/repos/user/repo/raw/main/data/0000.jpg", headers=AUTH)
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(content)
    with pytest.raises(http.client.IncompleteRead) as caught:
        resp.read()
    assert caught.value.partial == content[: len(content) // 2]
    assert server.request_log[-1]["fault"] == "drop"
    conn.close()
    with pytest.raises(requests.exceptions.RequestException):
        api_get(server, "raw/main/data/0000.jpg")
    # HEAD and listings are not dropped
    assert requests.head(f"{server.api_url}/raw/main/data/0000.jpg", headers=AUTH, timeout=10).status_code == 200
    assert api_get(server, "content/main/data").status_code == 200


@pytest.mark.parametrize("dagshub_like", [False, True])
def test_drip_sends_the_body_one_byte_at_a_time_in_both_modes(repo_dir, make_server, dagshub_like):
    srv = make_server(repo_dir, token=TOKEN, dagshub_like=dagshub_like,
                      faults=ServerFaults(drip_rate=1.0, drip_interval=0.02))
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/api/v1/repos/user/repo/raw/main/README.md", headers=AUTH)  # git-tracked in both modes
    resp = conn.getresponse()
    started = time.monotonic()
    pieces = []
    while True:
        piece = resp.read1(64)
        if not piece:
            break
        pieces.append(piece)
    elapsed = time.monotonic() - started
    conn.close()
    assert b"".join(pieces) == b"# test repo\n" and resp.status == 200
    assert len(pieces) >= 6 and elapsed >= 0.1, (pieces, elapsed)  # 12 bytes, 20 ms apart: no single write
    assert srv.request_log[-1]["fault"] == "drip"


def test_fail_paths_and_fail_first(server):
    server.faults.fail_paths = {"data/0001.jpg": 500, "README.md": 404}
    assert [api_get(server, "raw/main/data/0001.jpg").status_code for _ in range(3)] == [500, 500, 500]
    assert api_get(server, "raw/main/README.md").status_code == 404
    assert api_get(server, "raw/main/data/0002.jpg").status_code == 200
    server.faults.fail_first = {"data/0000.jpg": 2}
    assert [api_get(server, "raw/main/data/0000.jpg").status_code for _ in range(3)] == [503, 503, 200]
    server.faults.fail_first = {"data/0000.jpg": 1}  # a new dict re-arms
    assert [api_get(server, "raw/main/data/0000.jpg").status_code for _ in range(2)] == [503, 200]
    server.reset_counts()  # so does reset_counts
    assert [api_get(server, "raw/main/data/0000.jpg").status_code for _ in range(2)] == [503, 200]
    assert server.request_count("data/0000.jpg", kind="raw") == 2
    assert [e["fault"] for e in server.request_log] == ["fail_first", None]


def test_redirect_sends_the_client_to_another_origin(server, make_server, repo_dir):
    other = make_server(repo_dir)  # another origin (different port), recording what it receives
    server.faults.redirect_raw_to = other.url
    resp = api_get(server, "raw/main/README.md?x=1", allow_redirects=False)
    assert resp.status_code == 307
    assert resp.headers["Location"] == f"{other.url}/api/v1/repos/user/repo/raw/main/README.md?x=1"
    assert api_get(server, "raw/main/README.md").content == b"# test repo\n"
    received = [e for e in other.request_log if e["kind"] == "raw"]
    assert len(received) == 1 and received[0]["auth"] is None  # requests drops the token across origins
    assert server.request_count("README.md", kind="raw") == 2


def test_fault_knobs_are_validated():
    with pytest.raises(ValueError):
        ServerFaults(error_rate=1.5)
    with pytest.raises(ValueError):
        ServerFaults(error_rate=0.6, throttle_rate=0.6)
    with pytest.raises(ValueError):
        ServerFaults(apply_to=("nonsense",))
    faults = ServerFaults()
    with pytest.raises(ValueError):
        faults.update({"latency": -1})
    assert faults.latency == 0.0  # rolled back
    with pytest.raises(ValueError):
        faults.update({"no_such_knob": 1})


# --- counters and admin --------------------------------------------------------------------------------------------


def test_counts_and_request_log(server):
    api_get(server, "raw/main/data/0000.jpg", headers={**AUTH, "Range": "bytes=0-3"})
    api_get(server, "raw/main/data/0000.jpg")
    api_get(server, "content/main/data")
    api_get(server, "branches/main")
    assert server.request_count("data/0000.jpg", kind="raw") == 2
    assert server.request_count("data/0000.jpg") == 2
    assert server.request_count(kind="content") == 1 and server.request_count() == 4
    assert server.get_counts("raw") == {"data/0000.jpg": 2}
    assert server.get_counts("branches") == {"main": 1}
    api_get(server, "content/main/data/")  # one directory, one key
    assert server.get_counts("content") == {"data": 2}
    server.request_log.clear()  # a copy: the server's own log is untouched
    entry = server.request_log[0]
    assert entry.pop("in_flight") == 1 and entry.pop("started") > 0
    assert entry == {"method": "GET", "kind": "raw", "path": "data/0000.jpg", "status": 206, "range": "bytes=0-3",
                     "has_auth": True, "auth": f"Bearer {TOKEN}", "query": "", "fault": None}
    server.reset_counts()
    assert server.request_count() == 0 and server.request_log == []


def test_admin_endpoints(server):
    api_get(server, "raw/main/README.md")
    admin = f"{server.url}/_streamloader"
    assert requests.get(f"{admin}/counts", timeout=10).json() == {"counts": {"raw": {"README.md": 1}}}
    assert requests.get(f"{admin}/head", timeout=10).json() == {"sha": server.head_sha()}
    resp = requests.post(f"{admin}/faults", json={"fail_paths": {"README.md": 502}, "latency": 0.01}, timeout=10)
    assert resp.status_code == 200 and server.faults.fail_paths == {"README.md": 502}
    assert api_get(server, "raw/main/README.md").status_code == 502
    assert requests.post(f"{admin}/faults", json={"bogus": 1}, timeout=10).status_code == 400
    assert requests.post(f"{admin}/faults", json={"_replace": True}, timeout=10).status_code == 200
    assert server.faults == ServerFaults()
    assert requests.post(f"{admin}/reset", timeout=10).status_code == 200 and server.request_count() == 0
    assert requests.get(f"{admin}/log", timeout=10).json() == {"log": []}


def test_admin_endpoints_can_be_disabled(make_server, repo_dir):
    srv = make_server(repo_dir, test_knobs=False)
    assert requests.get(f"{srv.url}/_streamloader/counts", timeout=10).status_code == 404


def test_unknown_endpoints_are_json_404(server):
    resp = requests.get(f"{server.url}/api/v1/nothing/here", headers=AUTH, timeout=10)
    assert resp.status_code == 404 and "message" in resp.json()
    assert server.request_count(kind="other") == 1


# --- HTTP behaviour ------------------------------------------------------------------------------------------------


def test_keep_alive_and_stop_closes_idle_connections(make_server, repo_dir):
    srv = make_server(repo_dir, token=TOKEN)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    for _ in range(3):  # three requests over one connection
        conn.request("GET", "/api/v1/repos/user/repo/raw/main/README.md", headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"# test repo\n"
    srv.stop()
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/api/v1/repos/user/repo/raw/main/README.md", headers=AUTH)
        conn.getresponse().read()
    conn.close()
    with pytest.raises(requests.ConnectionError):
        api_get(srv, "raw/main/README.md")


def test_large_file_streams_intact(server, repo_dir):
    big = os.urandom(3 * 1024 * 1024 + 17)
    (repo_dir / "big.bin").write_bytes(big)
    assert api_get(server, "raw/main/big.bin").content == big
    tail = api_get(server, "raw/main/big.bin", headers={**AUTH, "Range": "bytes=1048576-"}).content
    assert tail == big[1048576:]


# --- OAuth ---------------------------------------------------------------------------------------------------------


def test_oauth_middleman_flow(server):
    oauth = f"{server.url}/login/oauth"
    page = requests.get(f"{oauth}/authorize", params={"state": "s", "client_id": "c", "middleman_request_id": "r1"},
                        timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    code = requests.post(f"{oauth}/middleman", data={"request_id": "r1"}, timeout=10).json()
    assert isinstance(code, str) and code
    token = requests.post(f"{oauth}/access_token", data={"client_id": "c", "code": code, "state": "s"}, timeout=10)
    assert token.json()["access_token"] == TOKEN and token.json()["token_type"] == "bearer"
    again = requests.post(f"{oauth}/access_token", data={"client_id": "c", "code": code, "state": "s"}, timeout=10)
    assert again.status_code == 400  # codes are single-use
    assert server.request_count(kind="oauth") == 4


def test_oauth_middleman_waits_for_approval_but_not_forever(make_server, repo_dir):
    srv = make_server(repo_dir, token=TOKEN, oauth_wait=0.3)
    resp = requests.post(f"{srv.url}/login/oauth/middleman", data={"request_id": "never-approved"}, timeout=10)
    assert resp.status_code == 400 and "message" in resp.json()
    # approval that arrives while the client waits releases it
    srv.oauth.wait_s = 10
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, f"{srv.url}/login/oauth/middleman", data={"request_id": "r2"}, timeout=20)
        time.sleep(0.2)
        requests.get(f"{srv.url}/login/oauth/authorize", params={"middleman_request_id": "r2"}, timeout=10)
        assert pending.result().status_code == 200


def test_oauth_without_server_token_issues_a_usable_one(make_server, repo_dir):
    srv = make_server(repo_dir)
    requests.get(f"{srv.url}/login/oauth/authorize", params={"middleman_request_id": "r"}, timeout=10)
    code = requests.post(f"{srv.url}/login/oauth/middleman", data={"request_id": "r"}, timeout=10).json()
    token = requests.post(f"{srv.url}/login/oauth/access_token", data={"code": code}, timeout=10).json()
    assert token["access_token"].startswith("sl-oauth-")
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    assert requests.get(f"{srv.url}/api/v1/user", headers=headers, timeout=10).status_code == 200


# --- subprocess mode -------------------------------------------------------------------------------------------------


def test_server_process_with_admin_endpoints(make_server_process, repo_dir):
    proc = make_server_process(repo_dir, token=TOKEN, faults=ServerFaults(fail_first={"README.md": 1}))
    with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
        assert TOKEN.encode() not in fh.read()  # the token travels in the environment, not the arguments
    assert proc.repo_url == f"{proc.url}/user/repo" and proc.url.startswith("http://127.0.0.1:")
    api = f"{proc.url}/api/v1/repos/user/repo"
    assert requests.get(f"{api}/raw/main/README.md", timeout=10).status_code == 401
    assert requests.get(f"{api}/raw/main/README.md", headers=AUTH, timeout=10).status_code == 503
    assert requests.get(f"{api}/raw/main/README.md", headers=AUTH, timeout=10).content == b"# test repo\n"
    assert proc.request_count("README.md", kind="raw") == 3 and proc.get_counts("raw") == {"README.md": 3}
    assert [e["status"] for e in proc.request_log] == [401, 503, 200]
    proc.set_faults(fail_paths={"README.md": 500})
    assert requests.get(f"{api}/raw/main/README.md", headers=AUTH, timeout=10).status_code == 500
    assert proc.get_faults().fail_paths == {"README.md": 500}
    proc.clear_faults()
    proc.reset_counts()
    assert proc.request_count() == 0
    assert proc.head_sha() == requests.get(f"{api}/branches/main", headers=AUTH, timeout=10).json()["commit"]["id"]
    with pytest.raises(ValueError):
        proc.set_faults(error_rate=2)
    url = proc.url
    proc.stop()
    assert proc.pid is None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/api/v1/user", timeout=5)


def test_server_process_without_admin_takes_rates_from_the_cli(repo_dir):
    with pytest.raises(ValueError):
        ServerProcess(str(repo_dir), test_knobs=False, faults=ServerFaults(fail_paths={"README.md": 500}))
    with ServerProcess(str(repo_dir), test_knobs=False, faults=ServerFaults(throttle_rate=1.0, retry_after=1)) as proc:
        resp = requests.get(f"{proc.api_url}/raw/main/README.md", timeout=10)
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
        assert requests.get(f"{proc.url}/_streamloader/counts", timeout=10).status_code == 404


def test_cli_banner_knobs_and_clean_exit_on_sigint(repo_dir):
    env = {k: v for k, v in os.environ.items() if k != "STREAMLOADER_SERVER_TOKEN"}
    cmd = [sys.executable, "-m", "streamloader", "serve", str(repo_dir), "--port", "0", "--owner", "me",
           "--repo", "ds", "--throttle-rate", "1", "--retry-after", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        banner = proc.stdout.readline().strip()
        url = banner.split(" at ", 1)[1].split(" ")[0]
        assert banner == f"Serving {repo_dir} as me/ds at {url} (repo URL: {url}/me/ds)"
        resp = requests.get(f"{url}/api/v1/repos/me/ds/raw/main/README.md", timeout=10)
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"
        assert requests.get(f"{url}/_streamloader/counts", timeout=10).status_code == 404  # no --test-knobs
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_cli_rejects_a_missing_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "streamloader", "serve", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a directory" in out.stderr and not out.stdout


def test_make_jpeg_is_deterministic_and_decodable(tmp_path):
    from PIL import Image

    a = make_jpeg(tmp_path / "a.jpg", seed=3)
    assert make_jpeg(tmp_path / "b.jpg", seed=3) == a != make_jpeg(tmp_path / "c.jpg", seed=4)
    with Image.open(tmp_path / "a.jpg") as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    assert len(LABEL_ROWS[1][1].split("\t")) == 2  # the fixture repo's tab-in-caption row


def test_served_bytes_equal_source_for_every_file(server, repo_dir):
    files = sorted(p for p in repo_dir.rglob("*") if p.is_file())
    with requests.Session() as session:
        session.headers.update(AUTH)
        for path in files:
            rel = path.relative_to(repo_dir).as_posix()
            assert session.get(f"{server.api_url}/raw/main/{rel}", timeout=10).content == path.read_bytes()
    assert json.loads(json.dumps(server.get_counts("raw"))) == {
        p.relative_to(repo_dir).as_posix(): 1 for p in files}
