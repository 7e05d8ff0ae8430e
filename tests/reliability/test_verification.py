"""Every byte checked on every read path: servers that lie about bodies, ranges and pages (a proxy in front of
the real server rewrites its answers)."""
from __future__ import annotations

import json
import re
import numpy as np
import pytest

from conftest import TOKEN
from reliability.conftest import FAST
from reliability.hostile import HostileProxy
from streamloader.errors import IntegrityError, RemoteError
from streamloader.remote.filesystem import DagsHubFileSystem

BIG = bytes(range(256)) * 20  # 5120 bytes


@pytest.fixture
def srv(tmp_path, make_server):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "big.bin").write_bytes(BIG)
    emb = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    np.save(root / "data" / "img_emb_0.npy", emb)
    return make_server(root, token=TOKEN)


def _fs(url: str, **kwargs) -> DagsHubFileSystem:
    return DagsHubFileSystem(host=url, token=TOKEN, skip_instance_cache=True, retry=FAST, **kwargs)


def _same(path: str, body: bytes) -> bytes:
    return body


def _raw_requests(proxy: HostileProxy, name: str) -> int:
    return sum(1 for p in proxy.paths if "/raw/" in p and p.split("?")[0].endswith(name))


def _cut(keep: int):
    def mutate(path, status, headers, body, rng):
        if path.endswith("big.bin"):
            body = body[:keep]
            headers["Content-Length"] = str(len(body))
        return status, headers, body
    return mutate


def _flip(path, status, headers, body, rng):
    if path.endswith("big.bin") and body:
        body = bytes([body[0] ^ 1]) + body[1:]
    return status, headers, body


def _oversized(path, status, headers, body, rng):
    if path.endswith("big.bin") and status == 200:
        body = body * 400  # 2 MB for a 5 KB file
        headers["Content-Length"] = str(len(body))
    return status, headers, body


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("mutate,expected", [(_cut(1000), RemoteError), (_flip, IntegrityError),
                                             (_oversized, RemoteError)])
def test_a_lying_body_is_never_returned(srv, use_cache, mutate, expected):
    with HostileProxy(srv.url, _same, mutate) as proxy:
        fs = _fs(proxy.url, use_cache=use_cache)
        assert len(fs.ls("user/repo/data")) == 2  # the listing knows each file's hash and size
        with pytest.raises(expected):
            fs.cat_file("user/repo/data/big.bin")
        with pytest.raises(expected):
            with fs.open("user/repo/data/big.bin") as f:
                f.read()
        # a size that the server keeps contradicting is not worth eight full downloads
        assert _raw_requests(proxy, "big.bin") <= 2 * FAST.attempts


def test_a_body_longer_than_expected_stops_early_and_is_not_retried_eight_times(srv):
    with HostileProxy(srv.url, _same, _oversized) as proxy:
        fs = _fs(proxy.url)
        fs.ls("user/repo/data")
        with pytest.raises(RemoteError, match="5120"):
            fs.cat_file("user/repo/data/big.bin")
        assert _raw_requests(proxy, "big.bin") <= 2


def _range_lie(kind: str):
    def mutate(path, status, headers, body, rng):
        if status != 206:
            return status, headers, body
        m = re.match(r"bytes (\d+)-(\d+)/(\d+)", headers["Content-Range"])
        first, last, total = map(int, m.groups())
        if kind == "offset":  # the right length from another offset
            headers["Content-Range"] = f"bytes {first + 1}-{last + 1}/{total}"
            body = BIG[first + 1:last + 2]
        elif kind == "short":
            body = body[:-3]
            headers["Content-Range"] = f"bytes {first}-{last - 3}/{total}"
        elif kind == "long":
            body = body + b"xyz"
            headers["Content-Range"] = f"bytes {first}-{last + 3}/{total}"
        elif kind == "mislabelled":  # Content-Range says one thing, the length another
            body = body[:-1]
        headers["Content-Length"] = str(len(body))
        return status, headers, body
    return mutate


@pytest.mark.parametrize("kind", ["offset", "short", "long", "mislabelled"])
def test_a_206_that_is_not_the_range_asked_for_is_refused(srv, kind):
    with HostileProxy(srv.url, _same, _range_lie(kind)) as proxy:
        fs = _fs(proxy.url, use_cache=False)
        with pytest.raises(RemoteError, match="206|short"):
            fs.cat_file("user/repo/data/big.bin", start=100, end=200)
        assert _raw_requests(proxy, "big.bin") == FAST.attempts  # retried, then a typed error


def test_a_server_that_ignores_range_is_sliced(srv):
    def whole(path, status, headers, body, rng):
        if status == 206:  # answer as a server that ignores Range would: 200 and the whole file
            rel = path.split("?")[0].split("/raw/", 1)[1].split("/", 1)[1]
            with open(srv.folder.resolve(rel), "rb") as f:
                body = f.read()
            headers.pop("Content-Range")
            headers["Content-Length"] = str(len(body))
            status = 200
        return status, headers, body

    with HostileProxy(srv.url, _same, whole) as proxy:
        fs = _fs(proxy.url, use_cache=False)
        assert fs.cat_file("user/repo/data/big.bin", start=100, end=200) == BIG[100:200]
        assert fs.cat_file("user/repo/data/big.bin", start=5000) == BIG[5000:]
        assert fs.cat_file("user/repo/data/big.bin", start=-10) == BIG[-10:]
        # range-read files (above whole_file_max): the real .npy embedding rows come back right
        fs2 = _fs(proxy.url, whole_file_max=64)
        with fs2.open("user/repo/data/img_emb_0.npy") as f:
            rows = np.load(f)
        assert rows.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


def _cycling_pages(token_for):
    def mutate(path, body):
        if "/content/" not in path or "/data" not in path.split("?")[0]:
            return body
        data = json.loads(body)
        items = data if isinstance(data, list) else data.get("entries", [])
        return json.dumps({"entries": items[:1], "next_token": token_for(path)}).encode()
    return mutate


@pytest.mark.parametrize("tokens", ["repeat", "cycle"])
def test_a_listing_whose_next_token_repeats_or_cycles_ends_with_an_error(srv, tokens):
    if tokens == "repeat":
        def token_for(path):
            return "1"
    else:
        def token_for(path):
            current = re.search(r"from_token=(\w+)", path)
            return {"1": "2", "2": "3", "3": "1"}.get(current.group(1) if current else "", "1")
    with HostileProxy(srv.url, _cycling_pages(token_for)) as proxy:
        fs = _fs(proxy.url)
        with pytest.raises(RemoteError, match="repeats its paging token"):
            fs.ls("user/repo/data")
        assert sum(1 for p in proxy.paths if "/content/" in p) <= 5


def test_a_gzip_bomb_listing_is_refused_with_bounded_memory(tmp_path):
    """A small gzip'ed answer that inflates to a 400 MB JSON value is cut off, not held in memory."""
    import gzip
    import resource
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    bomb = gzip.compress(b'[{"path": "' + b"a" * (400 << 20) + b'"}]', 9)
    sha = "a" * 40

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            if "/branches/" in self.path:
                body, extra = json.dumps({"name": "main", "commit": {"id": sha}}).encode(), {}
            else:
                body, extra = bomb, {"Content-Encoding": "gzip"}
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fs = _fs(f"http://127.0.0.1:{httpd.server_address[1]}", branch="main")
        with pytest.raises(RemoteError):
            fs.ls("user/repo/data")
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 150, grown_mb
    finally:
        httpd.shutdown()
        httpd.server_close()
