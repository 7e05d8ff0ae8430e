"""The bench's independent peer (benchmarks/peer.py, P15) answers as dagshub.com does, and stays apart from the library.

The quick bench run (test_bench.py) fetches through it with both clients; this checks its answers one by one.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from benchmarks.sides_fetch import fsspec_http_missing

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(fsspec_http_missing() is not None, reason="the peer's server is aiohttp's")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, token: str = "", **headers: str):
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_peer_answers_listings_and_bytes_as_dagshub_does(tmp_path):
    from benchmarks.peer import PeerProcess

    body = os.urandom(5000)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jpg").write_bytes(body)
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "b.jpg").write_bytes(b"bb")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "big.tar").write_bytes(b"not served")
    with PeerProcess(str(tmp_path), token="s3cret-tok", owner="o", repo="r", only=["data"]) as peer:
        with open(f"/proc/{peer.pid}/cmdline", "rb") as f:
            assert b"s3cret-tok" not in f.read()  # the token travels in the environment only
        base = f"{peer.url}/api/v1/repos/o/r"
        assert _get(f"{base}/content/main/data")[0] == 401
        assert _get(f"{base}/content/main/data", token="wrong")[0] == 401
        status, _, head = _get(f"{base}/branches/main", token="s3cret-tok")
        sha = json.loads(head)["commit"]["id"]
        assert status == 200 and len(sha) == 40
        assert _get(f"{base}/branches/dev", token="s3cret-tok")[0] == 404
        peer.set(latency=0.05)
        # one unpaged array; sizes 0 unless asked for; DVC rows carry the md5 of the bytes
        status, _, listing = _get(f"{base}/content/{sha}/data", token="s3cret-tok")
        rows = {row["path"]: row for row in json.loads(listing)}
        assert status == 200 and set(rows) == {"data/a.jpg", "data/sub"}
        assert rows["data/a.jpg"]["size"] == 0 and rows["data/sub"]["type"] == "dir"
        assert rows["data/a.jpg"]["versioning"] == "dvc"
        assert rows["data/a.jpg"]["hash"] == hashlib.md5(body).hexdigest()
        sized = {r["path"]: r for r in json.loads(_get(f"{base}/content/main/data?include_size=true",
                                                       token="s3cret-tok")[2])}
        assert sized["data/a.jpg"]["size"] == len(body)
        status, _, got = _get(rows["data/a.jpg"]["download_url"], token="s3cret-tok")
        assert (status, got) == (200, body)
        status, headers, got = _get(f"{base}/raw/main/data/a.jpg", token="s3cret-tok", Range="bytes=10-19")
        assert (status, got, headers["Content-Range"]) == (206, body[10:20], f"bytes 10-19/{len(body)}")
        assert _get(f"{base}/raw/main/data/a.jpg", token="s3cret-tok", Range="bytes=9000-")[0] == 416
        assert _get(f"{base}/raw/main/shards/big.tar", token="s3cret-tok")[0] == 404  # only data/ is served
        assert _get(f"{base}/raw/nosuchrev/data/a.jpg", token="s3cret-tok")[0] == 404
        stats = peer.stats()
        assert stats["raw_gets"] == 5 and stats["peak"] == 1 and stats["latency"] == 0.05
        peer.reset_counts()
        assert peer.stats()["raw_gets"] == 0
        pid = peer.pid
    assert not os.path.exists(f"/proc/{pid}")


def test_peer_is_written_apart_from_the_library():
    """An independent server: it imports nothing of streamloader's (so P15 measures against other code)."""
    text = (ROOT / "benchmarks" / "peer.py").read_text(encoding="utf-8")
    assert "import streamloader" not in text and "from streamloader" not in text
