"""The local server's dagshub-like mode (streamloader/server/mode.py, dagshub_like.py, presigned.py, synth.py):
one test or more per behaviour of dagshub.com it reproduces, over real HTTP; plus public/private repos.
"""
from __future__ import annotations

import email.utils
import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from _helpers import git_blob_sha1
from conftest import AUTH, TOKEN, api_get, official_hooks_script, run_official
from streamloader.server import DagsHubLike, ServerProcess, SyntheticFolder, write_synthetic_labels
from streamloader.server.dvc import dvc_md5_bytes, istextblock


@pytest.fixture
def like(repo_dir, make_server):
    """A dagshub-like server (every default) over the standard repo, token required."""
    return make_server(repo_dir, token=TOKEN, dagshub_like=True)


def by_path(listing):
    return {e["path"]: e for e in listing}


# --- 1. listings are not paged ------------------------------------------------------------------------------------


def test_folder_listing_is_one_unpaged_array(like):
    full = api_get(like, "content/main/data").json()
    assert isinstance(full, list) and len(full) == 7
    for params in ({"paging": "true", "limit": "2"}, {"limit": "3"}, {"paging": "true", "from_token": "4"}):
        assert api_get(like, "content/main/data", params=params).json() == full
    like.dagshub_like.unpaged_listings = False  # the knob: our server's paging comes back
    page = api_get(like, "content/main/data", params={"paging": "true", "limit": "3"}).json()
    assert page["entries"] == full[:3] and page["next_token"] == "3"


# --- 2. sizes need include_size, which costs time per entry -------------------------------------------------------


def test_sizes_are_zero_unless_include_size_which_costs_per_entry(like, repo_dir):
    listing = api_get(like, "content/main/data").json()
    assert {e["size"] for e in listing} == {0}
    like.dagshub_like.size_cost_per_entry = 0.05
    started = time.monotonic()
    sized = by_path(api_get(like, "content/main/data", params={"include_size": "true"}).json())
    assert time.monotonic() - started >= 7 * 0.05
    assert sized["data/labels.tsv"]["size"] == (repo_dir / "data" / "labels.tsv").stat().st_size
    assert sized["data/emb"]["size"] == 0
    like.dagshub_like.sizes_need_include_size = False
    assert by_path(api_get(like, "content/main/data").json())["data/0000.jpg"]["size"] > 0


# --- 3. content of a file is one object ---------------------------------------------------------------------------


def test_content_of_a_file_is_one_object(like, repo_dir):
    entry = api_get(like, "content/main/data/labels.tsv").json()
    assert isinstance(entry, dict) and entry["path"] == "data/labels.tsv" and entry["type"] == "file"
    assert entry["size"] == 0 and entry["hash"] == dvc_md5_bytes((repo_dir / "data" / "labels.tsv").read_bytes())
    sized = api_get(like, "content/main/README.md", params={"include_size": "true"}).json()
    assert (sized["size"], sized["hash"], sized["versioning"]) == (12, git_blob_sha1(b"# test repo\n"), "git")
    assert api_get(like, "content/main/data/missing.tsv").status_code == 404
    like.dagshub_like.file_content_object = False
    assert api_get(like, "content/main/README.md").status_code == 404


# --- 4. the root lists connected buckets --------------------------------------------------------------------------


def test_root_lists_a_connected_bucket_the_way_the_official_client_parses_it(like):
    dacite = pytest.importorskip("dacite")
    from dagshub.common.api.responses import ContentAPIEntry, StorageAPIEntry

    root = api_get(like, "content/main/").json()
    buckets = [e for e in root if e["type"] == "storage"]
    assert [(e["path"], e["versioning"]) for e in buckets] == [("s3/streamloader-bucket", "bucket")]
    assert buckets[0]["content_url"] == f"{like.api_url}/storage/content/s3/streamloader-bucket"
    for entry in root:
        dacite.from_dict(ContentAPIEntry, entry)  # every entry has the fields (and types) the client needs
    storages = [dacite.from_dict(StorageAPIEntry, s) for s in api_get(like, "storage").json()]
    assert [str(s.path_in_mount) for s in storages] == [".dagshub/storage/s3/streamloader-bucket"]
    assert [e["type"] for e in api_get(like, "content/main/data").json()].count("storage") == 0  # root only
    like.dagshub_like.storage_buckets = ()
    root_types = {e["type"] for e in api_get(like, "content/main/").json()}
    assert api_get(like, "storage").json() == [] and "storage" not in root_types


# --- 5. DVC entries: md5 (dos2unix for text), git entries: blob sha1 ----------------------------------------------


def test_dvc_entries_have_md5_dos2unix_and_git_entries_the_blob_sha(like, repo_dir):
    crlf = b"name\tcaption\r\nx.jpg\ta cat\r\n"
    binary = b"\x00\x01\r\n" * 100
    (repo_dir / "data" / "crlf.tsv").write_bytes(crlf)
    (repo_dir / "data" / "blob.bin").write_bytes(binary)
    (repo_dir / "notes.txt").write_bytes(b"git\r\n")
    data = by_path(api_get(like, "content/main/data").json())
    assert data["data/crlf.tsv"]["versioning"] == "dvc"
    assert data["data/crlf.tsv"]["hash"] == hashlib.md5(crlf.replace(b"\r\n", b"\n")).hexdigest()
    assert data["data/crlf.tsv"]["hash"] != hashlib.md5(crlf).hexdigest()
    assert data["data/blob.bin"]["hash"] == hashlib.md5(binary).hexdigest()  # binary: no conversion
    assert data["data/emb"]["versioning"] == "dvc" and data["data/emb"]["hash"].endswith(".dir")
    root = by_path(api_get(like, "content/main/").json())
    assert root["notes.txt"]["hash"] == git_blob_sha1(b"git\r\n") and root["notes.txt"]["versioning"] == "git"
    assert root["data"]["versioning"] == "git"  # data/ itself is not below data/
    like.dagshub_like.dvc_paths = ()
    assert {e["versioning"] for e in api_get(like, "content/main/data").json()} == {"git"}


def test_dvc_text_rule_follows_dvc_2():
    assert istextblock(b"") and istextblock(b"plain text\r\n") and not istextblock(b"text\x00")
    assert istextblock(b"a" * 70 + b"\xff" * 30) and not istextblock(b"a" * 69 + b"\xff" * 31)  # 30% non-text
    # only the first 512 bytes decide; a CRLF split across DVC's 1 MiB chunks is not converted
    late_nul = b"a\r\n" * 200 + b"\x00"
    assert dvc_md5_bytes(late_nul) == hashlib.md5(late_nul.replace(b"\r\n", b"\n")).hexdigest()
    split = b"x" * (2**20 - 1) + b"\r\n"
    assert dvc_md5_bytes(split) == hashlib.md5(split).hexdigest()


# --- 6. raw of a DVC file redirects to a presigned URL on another origin ------------------------------------------


def test_dvc_raw_redirects_to_a_presigned_origin_that_needs_no_token(like, repo_dir):
    content = (repo_dir / "data" / "labels.tsv").read_bytes()
    resp = api_get(like, "raw/main/data/labels.tsv", allow_redirects=False)
    assert resp.status_code == 302
    location = resp.headers["Location"]
    target = urlsplit(location)
    assert f"{target.scheme}://{target.netloc}" == like.presigned_origin != like.url
    assert target.path.startswith("/presigned/") and {"X-Expires", "X-Signature"} <= set(
        p.split("=")[0] for p in target.query.split("&"))
    assert requests.get(location, timeout=10).content == content  # no token needed
    forwarded = requests.get(location, headers=AUTH, timeout=10)  # S3 refuses a second auth mechanism
    assert forwarded.status_code == 400 and b"<Code>InvalidArgument</Code>" in forwarded.content
    tampered = location[:-4] + ("0000" if not location.endswith("0000") else "1111")
    assert requests.get(tampered, timeout=10).status_code == 403
    # requests drops the token at the other origin, so following the redirect just works
    assert api_get(like, "raw/main/data/labels.tsv").content == content
    assert like.get_counts("presigned") == {"data/labels.tsv": 4}
    assert like.request_count("data/labels.tsv", kind="raw") == 2
    presigned_log = [e for e in like.request_log if e["kind"] == "presigned"]
    assert [e["status"] for e in presigned_log] == [200, 400, 403, 200]
    assert presigned_log[-1]["auth"] is None
    # the presigned URL names the host the client used (a server bound to 0.0.0.0 stays reachable)
    aliased = api_get(like, "raw/main/data/labels.tsv", allow_redirects=False,
                  headers={**AUTH, "Host": f"localhost:{like.port}"}).headers["Location"]
    assert aliased.startswith(f"http://localhost:{urlsplit(like.presigned_origin).port}/presigned/")
    # git files are served directly
    readme = api_get(like, "raw/main/README.md", allow_redirects=False)
    assert readme.status_code == 200 and readme.content == b"# test repo\n"
    like.dagshub_like.presign_dvc_raw = False
    assert api_get(like, "raw/main/data/labels.tsv", allow_redirects=False).content == content


def test_presigned_urls_expire(like, repo_dir):
    like.dagshub_like.expire_first = 1
    first = api_get(like, "raw/main/data/0000.jpg", allow_redirects=False).headers["Location"]
    second = api_get(like, "raw/main/data/0000.jpg", allow_redirects=False).headers["Location"]
    expired = requests.get(first, timeout=10)
    assert expired.status_code == 403 and b"expired" in expired.content
    assert requests.get(second, timeout=10).content == (repo_dir / "data" / "0000.jpg").read_bytes()
    like.reset_counts()  # re-arms expire_first
    assert requests.get(api_get(like, "raw/main/data/0000.jpg", allow_redirects=False).headers["Location"],
                        timeout=10).status_code == 403
    like.dagshub_like.presigned_ttl = 0  # the TTL: a URL valid for 0 s is expired by the time it is used
    url = api_get(like, "raw/main/data/0000.jpg", allow_redirects=False).headers["Location"]
    time.sleep(0.05)
    assert requests.get(url, timeout=10).status_code == 403
    like.stop()
    with pytest.raises(requests.ConnectionError):  # the presigned origin stops with the server
        requests.get(second, timeout=5)


# --- 7. Range is ignored --------------------------------------------------------------------------------------------


def test_range_is_ignored_on_raw_and_presigned_downloads(like, repo_dir):
    for path in ("README.md", "data/labels.tsv"):  # a git file (raw) and a DVC file (presigned)
        content = (repo_dir / path).read_bytes()
        resp = api_get(like, f"raw/main/{path}", headers={**AUTH, "Range": "bytes=2-5"})
        assert resp.status_code == 200 and resp.content == content and "Content-Range" not in resp.headers
    like.dagshub_like.ignore_range = False
    for path in ("README.md", "data/labels.tsv"):
        resp = api_get(like, f"raw/main/{path}", headers={**AUTH, "Range": "bytes=2-5"})
        assert resp.status_code == 206 and resp.content == (repo_dir / path).read_bytes()[2:6]


# --- 8. rate limits -------------------------------------------------------------------------------------------------


def test_rate_limit_first_answers_429_with_an_http_date(like):
    like.dagshub_like.rate_limit_first = 2
    like.dagshub_like.retry_after = 3
    responses = [api_get(like, "branches/main") for _ in range(3)]
    assert [r.status_code for r in responses] == [429, 429, 200]
    when = email.utils.parsedate_to_datetime(responses[0].headers["Retry-After"]).timestamp()
    assert time.time() + 1.5 <= when <= time.time() + 5
    assert [e["fault"] for e in like.request_log] == ["rate_limit", "rate_limit", None]
    like.dagshub_like.update({"rate_limit_first": 1, "retry_after_format": "seconds"})  # assigning re-arms
    assert api_get(like, "raw/main/README.md").headers["Retry-After"] == "3"


def test_max_in_flight_answers_429_above_the_limit(like):
    like.dagshub_like.max_in_flight = 2
    like.faults.latency = 1.0
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: api_get(like, "raw/main/README.md").status_code, range(6)))
    assert 1 <= statuses.count(200) <= 4 and statuses.count(429) >= 2 and set(statuses) == {200, 429}
    like.dagshub_like.max_in_flight = 0  # off
    like.faults.latency = 0.3
    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(lambda _: api_get(like, "raw/main/README.md").status_code, range(6))) == {200}


# --- 9. synthetic folders -------------------------------------------------------------------------------------------


def test_synthetic_files_are_listed_hashed_and_served_next_to_real_ones(repo_dir, make_server):
    from PIL import Image

    (repo_dir / "data" / "000000003.jpg").write_bytes(b"a real file wins over its synthetic namesake")
    srv = make_server(repo_dir, token=TOKEN, dagshub_like=DagsHubLike(synthetic={"data": 50, "virtual/imgs": 2}))
    data = api_get(srv, "content/main/data").json()
    names = [e["path"] for e in data]
    assert names == sorted(names) and len(names) == 7 + 1 + 49
    assert {"data/labels.tsv", "data/000000000.jpg", "data/000000049.jpg"} <= set(names)
    entries = by_path(data)
    body = SyntheticFolder.body(7)
    assert entries["data/000000007.jpg"]["hash"] == hashlib.md5(body).hexdigest() == SyntheticFolder.md5(7)
    assert entries["data/000000003.jpg"]["hash"] == dvc_md5_bytes((repo_dir / "data" / "000000003.jpg").read_bytes())
    seven = api_get(srv, "raw/main/data/000000007.jpg").content
    eight = api_get(srv, "raw/main/data/000000008.jpg").content
    assert seven == body != eight and len(seven) == SyntheticFolder.size
    with Image.open(io.BytesIO(seven)) as img:
        img.load()
        assert img.size == (32, 32)
    assert api_get(srv, "raw/main/data/000000003.jpg").content.startswith(b"a real file")
    assert api_get(srv, "raw/main/data/000000050.jpg").status_code == 404
    assert api_get(srv, "raw/main/data/labels.tsv").content.startswith(b"0000.jpg")
    # a folder that exists only through synthetic files; git-tracked outside data/
    assert "virtual" in {e["path"] for e in api_get(srv, "content/main/").json()}
    virtual = api_get(srv, "content/main/virtual/imgs", params={"include_size": "true"}).json()
    assert [(e["path"], e["size"], e["hash"]) for e in virtual] == [
        (f"virtual/imgs/{SyntheticFolder.name(i)}", SyntheticFolder.size, git_blob_sha1(SyntheticFolder.body(i)))
        for i in range(2)]
    assert api_get(srv, "raw/main/virtual/imgs/000000001.jpg", allow_redirects=False).content == SyntheticFolder.body(1)
    # the commit moves when the synthetic data changes
    sha = srv.head_sha()
    srv.dagshub_like.synthetic = {"data": 51}
    assert srv.head_sha() != sha and len(api_get(srv, "content/main/data").json()) == 58


def test_synthetic_labels_name_the_synthetic_files(repo_dir, make_server, tmp_path):
    from PIL import Image

    from streamloader.data.filters import filter_labels

    n_squirrel = write_synthetic_labels(repo_dir / "data" / "labels.tsv", 10_000)
    srv = make_server(repo_dir, token=TOKEN, dagshub_like=DagsHubLike(synthetic={"data": 10_000}))
    (tmp_path / "labels.tsv").write_bytes(api_get(srv, "raw/main/data/labels.tsv").content)  # via the presigned URL
    result = filter_labels(tmp_path / "labels.tsv", "squirrel")
    assert result.matched == n_squirrel == 3 and result.scanned == 10_000
    for row in result.rows:
        with Image.open(io.BytesIO(api_get(srv, f"raw/main/data/{row.file}").content)) as img:
            img.load()


def test_540k_synthetic_listing_streams_fast_with_little_memory(tmp_path):
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "labels.tsv").write_bytes(b"000000000.jpg\ta squirrel\t7\thttp://x\n")
    mode = DagsHubLike(synthetic={"data": 540_000})
    with ServerProcess(str(tmp_path / "repo"), token=TOKEN, dagshub_like=mode) as proc:
        started = time.monotonic()
        count, tail, first_byte_s = 0, b"", None
        needle = b'"path": '
        with requests.get(f"{proc.api_url}/content/main/data", headers=AUTH, stream=True, timeout=60) as resp:
            assert resp.status_code == 200 and resp.headers.get("Transfer-Encoding") == "chunked"
            for chunk in resp.iter_content(1 << 20):
                if first_byte_s is None:
                    first_byte_s = time.monotonic() - started
                data = tail + chunk
                count += data.count(needle)
                tail = data[-(len(needle) - 1):]  # a needle cut in two is counted once, with the next chunk
                size_tail = data[-200:]
        elapsed = time.monotonic() - started
        with open(f"/proc/{proc.pid}/status") as fh:
            peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    assert count == 540_001 and size_tail.endswith(b"}]")
    assert first_byte_s < 3.0 and elapsed < 20.0, (first_byte_s, elapsed)
    assert peak_kb < 250_000, f"server peaked at {peak_kb / 1024:.0f} MB for a streamed listing"


# --- 10. public and private repos -----------------------------------------------------------------------------------


def test_public_repo_reads_without_a_token_but_not_with_a_wrong_one(repo_dir, make_server):
    srv = make_server(repo_dir, token=TOKEN, anonymous_read=True)
    for path in ("", "branches/main", "content/main/data", "raw/main/README.md", "storage"):
        assert api_get(srv, path, headers={}).status_code == 200, path
        assert api_get(srv, path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert api_get(srv, "", headers={}).json()["private"] is False
    assert requests.get(f"{srv.url}/api/v1/user", timeout=10).status_code == 401  # no user without a token


@pytest.mark.parametrize("status", [401, 404])
def test_private_repo_answers_anonymous_requests_401_or_404(repo_dir, make_server, status):
    srv = make_server(repo_dir, token=TOKEN, anonymous_status=status)
    for path in ("", "content/main/data", "raw/main/README.md"):
        assert api_get(srv, path, headers={}).status_code == status, path
        assert api_get(srv, path).status_code == 200
    assert api_get(srv, "").json()["private"] is True
    assert requests.get(f"{srv.url}/api/v1/user", timeout=10).status_code == 401


# --- knobs: validation, admin endpoint, CLI -------------------------------------------------------------------------


def test_knobs_are_validated_and_settable_over_the_admin_endpoint(server):
    with pytest.raises(ValueError):
        DagsHubLike(retry_after_format="minutes")
    with pytest.raises(ValueError):
        DagsHubLike(storage_buckets=("no-protocol",))
    with pytest.raises(ValueError):
        DagsHubLike(synthetic={"../up": 3})
    mode = DagsHubLike()
    with pytest.raises(ValueError):
        mode.update({"max_in_flight": -1})
    assert mode.max_in_flight == 64  # rolled back
    admin = f"{server.url}/_streamloader/dagshub_like"
    assert requests.get(admin, timeout=10).json() is None and isinstance(api_get(server, "content/main/data/").json(),
                                                                          list)
    assert api_get(server, "content/main/README.md").json()["size"] == 12  # default mode: sizes without asking
    assert requests.post(admin, json={"bogus": 1}, timeout=10).status_code == 400
    on = requests.post(admin, json={"synthetic": {"data": 2}}, timeout=10).json()
    assert on["synthetic"] == {"data": 2} and server.dagshub_like.max_in_flight == 64
    assert api_get(server, "content/main/README.md").json()["path"] == "README.md"
    assert requests.post(admin, json={"_off": True}, timeout=10).json() is None and server.dagshub_like is None


def test_cli_serves_the_mode_publicly(repo_dir):
    mode = DagsHubLike(synthetic={"data": 3}, max_in_flight=0, storage_buckets=())
    with ServerProcess(str(repo_dir), token=TOKEN, dagshub_like=mode, anonymous_read=True) as proc:
        assert "--dagshub-like" in proc.command() and "--public" in proc.command()
        listing = requests.get(f"{proc.api_url}/content/main/data", timeout=10).json()  # anonymous: public
        assert len(listing) == 10 and listing[0]["size"] == 0
        assert proc.get_dagshub_like() == mode
        proc.set_dagshub_like(rate_limit_first=1)
        assert requests.get(f"{proc.api_url}/content/main/", timeout=10).status_code == 429
        raw = requests.get(f"{proc.api_url}/raw/main/data/000000001.jpg", timeout=10)
        assert raw.content == SyntheticFolder.body(1) and proc.get_counts("presigned") == {"data/000000001.jpg": 1}


# --- the official client still works ----------------------------------------------------------------------------------

OFFICIAL_SCRIPT = official_hooks_script("""
    res["root"] = sorted(os.listdir(mount))
    with open(os.path.join(mount, "README.md")) as f:
        res["git"] = f.read()
    with open(os.path.join(mount, "data", "labels.tsv"), "rb") as f:
        res["dvc_sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(mount, "data", "000000001.jpg"), "rb") as f:
        res["synthetic_sha256"] = hashlib.sha256(f.read()).hexdigest()
    """)


def test_official_client_reads_git_and_dvc_files_through_the_presigned_redirect(repo_dir, make_server, tmp_path):
    pytest.importorskip("dagshub")
    srv = make_server(repo_dir, token=TOKEN, dagshub_like=DagsHubLike(synthetic={"data": 5}))
    (tmp_path / "mount").mkdir()
    env = {"DAGSHUB_CLIENT_HOST": srv.url, "DAGSHUB_USER_TOKEN": TOKEN}
    res = run_official(OFFICIAL_SCRIPT, [srv.repo_url, tmp_path / "mount"], env, tmp_path, "official_like")
    assert {"README.md", "data"} <= set(res["root"]) and "s3" not in res["root"]  # bucket entries are skipped
    assert res["git"] == "# test repo\n"
    assert res["dvc_sha256"] == hashlib.sha256((repo_dir / "data" / "labels.tsv").read_bytes()).hexdigest()
    assert res["synthetic_sha256"] == hashlib.sha256(SyntheticFolder.body(1)).hexdigest()
    assert srv.get_counts("presigned") == {"data/labels.tsv": 1, "data/000000001.jpg": 1}
    assert all(e["auth"] is None for e in srv.request_log if e["kind"] == "presigned")  # the token did not follow
    assert srv.request_count("README.md", kind="raw") == 1 and srv.request_count(kind="presigned") == 2
