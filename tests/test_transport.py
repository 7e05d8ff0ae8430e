"""RawTransport: raw downloads straight over urllib3 must keep what requests gave (proxies, fork safety, Range)."""
from __future__ import annotations

import http.server
import multiprocessing
import os
import threading
import time
import urllib.request

import pytest

from _helpers import held_by_another_thread
from streamloader.errors import RemoteError
from streamloader.remote.client import DagsHubClient, RetryPolicy

TOKEN = "sl-test-token-3f9a1c"
FAST = RetryPolicy(attempts=3, max_time=10, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    for i in range(12):
        (root / "data" / f"{i:02d}.bin").write_bytes(os.urandom(20_000 + i))
    return root


class _ForwardingProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP proxy: takes ``GET http://host/path``, fetches it directly, relays the answer; logs the URLs."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.seen.append(self.path)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "proxy-connection")}
                direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                content_range = None
                try:
                    with direct.open(urllib.request.Request(self.path, headers=headers)) as upstream:
                        body, status = upstream.read(), upstream.status
                        content_range = upstream.headers.get("Content-Range")
                except urllib.error.HTTPError as exc:
                    body, status = exc.read(), exc.code
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if content_range:  # a 206 means nothing without it
                    self.send_header("Content-Range", content_range)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_raw_downloads_go_through_a_configured_proxy(make_server, tree, monkeypatch):
    srv = make_server(str(tree), token=TOKEN)
    proxy = _ForwardingProxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
        assert client.read_bytes("data/03.bin") == (tree / "data" / "03.bin").read_bytes()
        assert client.read_bytes("data/04.bin", 10, 110) == (tree / "data" / "04.bin").read_bytes()[10:110]
        raw = [url for url in proxy.seen if "/raw/" in url]
        assert len(raw) == 2 and all(url.startswith(srv.url) for url in raw)
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_proxy_that_cannot_be_reached_is_an_error_not_a_bypass(make_server, tree, monkeypatch):
    srv = make_server(str(tree), token=TOKEN)
    sha = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST).revision
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # discard port: nothing listens
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
    client.pin(sha)  # no revision lookup: only the raw GET is in question
    with pytest.raises(RemoteError, match="ProxyError"):
        client.read_bytes("data/00.bin")
    assert srv.request_count(kind="raw") == 0


def _child_reads(client: DagsHubClient, names: list, out: "multiprocessing.Queue") -> None:
    out.put([client.read_bytes(f"data/{name}") for name in names])


def test_forked_child_and_parent_never_share_pooled_connections(make_server, tree):
    srv = make_server(str(tree), token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
    names = sorted(os.listdir(tree / "data"))
    expected = {name: (tree / "data" / name).read_bytes() for name in names}
    assert client.read_bytes(f"data/{names[0]}") == expected[names[0]]  # the parent now has a pooled socket
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    children = [ctx.Process(target=_child_reads, args=(client, names[i::3], out)) for i in range(3)]
    for child in children:
        child.start()
    for _ in range(3):  # the parent keeps reading while its children do
        for name in names:
            assert client.read_bytes(f"data/{name}") == expected[name]
    results = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    got = sorted(data for batch in results for data in batch)
    assert got == sorted(expected.values())


class _DrippingServer(http.server.ThreadingHTTPServer):
    """Answers every GET with a 200 whose 2000-byte body comes one byte every 0.2 s (each recv well within any
    read timeout)."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2000")
                self.end_headers()
                try:
                    for _ in range(2000):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_dripping_api_answer_is_cut_by_the_deadline_not_left_to_the_read_timeout():
    drip = _DrippingServer()
    try:
        client = DagsHubClient(f"http://127.0.0.1:{drip.server_address[1]}/o/r", token=TOKEN,
                               retry=RetryPolicy(attempts=2, initial_backoff=0.01, connect_timeout=1, read_timeout=1))
        started = time.monotonic()
        with pytest.raises(RemoteError, match="too slow"):
            client.resolve_revision()  # JSON through requests (not the raw fast path): the same deadline
        assert time.monotonic() - started < 6  # 2 attempts of ~1 s; the body alone would take 400 s
    finally:
        drip.shutdown()
        drip.server_close()


def test_keep_alive_is_fast_against_a_server_that_leaves_nagle_on(make_server, tree):
    """Headers and body in two writes + Nagle on the server + delayed ACKs on the client = ~40 ms more per request
    on a reused connection; the client acknowledges at once, so each GET costs the latency, not latency + 40 ms."""
    import statistics
    import time

    from streamloader.server import ServerFaults

    srv = make_server(str(tree), token=TOKEN, faults=ServerFaults(latency=0.02, nagle=True))
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
    client.read_bytes("data/00.bin")
    times = []
    for _ in range(3):
        for i in range(1, 6):
            started = time.perf_counter()
            client.read_bytes(f"data/{i:02d}.bin")
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.list_dir("data")
        times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.045, times  # 20 ms latency: ~22 ms each; with delayed ACKs ~62 ms


def _route(client: DagsHubClient):
    """(lean pool or None, urllib3 pool) the client's raw downloads to its API origin went through."""
    from streamloader.remote.transport import origin_of

    return client.session.raw_pools[origin_of(client.ref.host)]


def test_raw_downloads_go_over_the_lean_client_on_kept_alive_connections(make_server, tree):
    from streamloader.remote.leansync import BlockingPool

    srv = make_server(str(tree), token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
    for name in sorted(os.listdir(tree / "data")):
        assert client.read_bytes(f"data/{name}") == (tree / "data" / name).read_bytes()
    assert client.read_bytes("data/04.bin", 10, 110) == (tree / "data" / "04.bin").read_bytes()[10:110]
    lean, _pool = _route(client)
    assert isinstance(lean, BlockingPool)
    assert lean.connections_made == 1  # one sequential reader: one connection, kept alive throughout
    raw = [e for e in srv.request_log if e["kind"] == "raw"]
    assert len(raw) == 13 and all(e["has_auth"] for e in raw)


def test_answers_the_lean_client_leaves_out_still_arrive_through_urllib3(make_server, tree):
    import gzip

    from reliability.hostile import HostileProxy

    srv = make_server(str(tree), token=TOKEN)
    sha = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST).revision
    unframed = (tree / "data" / "05.bin").read_bytes()

    def intercept(path: str):
        if "/raw/" in path and path.endswith("/data/05.bin"):  # no Content-Length: the body ends at the close
            return 200, {"Content-Type": "application/octet-stream"}, unframed
        return None

    def compress(path, status, headers, body, asked):
        if path.endswith("/data/06.bin") and status == 200:
            body = gzip.compress(body)  # though the client asked for identity
            headers = {**headers, "Content-Encoding": "gzip", "Content-Length": str(len(body))}
        return status, headers, body

    with HostileProxy(srv.url, intercept=intercept, mutate_raw=compress) as proxy:
        client = DagsHubClient(f"{proxy.url}/user/repo", token=TOKEN, retry=FAST)
        client.pin(sha)
        for name in ("04.bin", "05.bin", "06.bin", "07.bin"):
            assert client.read_bytes(f"data/{name}") == (tree / "data" / name).read_bytes(), name
        raw = [p.rsplit("/", 1)[1] for p in proxy.paths if "/raw/" in p]
        # the lean client saw the unframed and the gzipped answers' heads and left them to urllib3 (asked again)
        assert sorted(raw) == ["04.bin", "05.bin", "05.bin", "06.bin", "06.bin", "07.bin"], raw
        assert _route(client)[0].connections_made >= 2  # (an unframed answer's connection is not reused)


def test_a_users_own_adapter_keeps_raw_downloads_on_urllib3(make_server, tree):
    from requests.adapters import HTTPAdapter

    srv = make_server(str(tree), token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
    seen = []

    class Counting(HTTPAdapter):  # e.g. one that sets its own TLS or socket options
        def get_connection_with_tls_context(self, *args, **kwargs):
            seen.append(1)
            return super().get_connection_with_tls_context(*args, **kwargs)

    client.session.mount("http://", Counting())
    assert client.read_bytes("data/02.bin") == (tree / "data" / "02.bin").read_bytes()
    lean, pool = _route(client)
    assert lean is None and pool.num_connections == 1 and seen


def test_a_redirect_page_is_read_out_so_that_the_api_connection_is_kept(canned):
    # dagshub.com answers a DVC file's raw GET with a redirect to presigned storage, every time: the lean client
    # must keep its connection to the API host (here the redirect's page arrives after its head)
    from canned import ok

    storage = canned(lambda n, req: (ok(b"bytes of %d" % n), False))
    page = b"<a href='...'>moved</a>" * 40

    def api(n, req):
        head = (b"HTTP/1.1 302 Found\r\nLocation: %s/blob/%d\r\nContent-Length: %d\r\n\r\n"
                % (storage.url.encode(), n, len(page)))
        return [(0.0, head), (0.05, page)], False

    server = canned(api)
    client = DagsHubClient(f"{server.url}/user/repo", token=TOKEN, retry=FAST)
    client.pin("ab" * 20)
    assert [client.read_bytes(f"data/{i}.bin") for i in range(3)] == [b"bytes of %d" % i for i in range(3)]
    assert server.connections == 1 and len(server.requests) == 3
    assert all(b"Authorization" not in req for req in storage.requests)  # the token stays with the API host


def test_https_raw_downloads_verify_with_requests_settings_and_keep_their_connection(canned, tmp_path, monkeypatch):
    import ssl

    from canned import ok, self_signed

    key_file, cert_file = self_signed(tmp_path)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert_file, key_file)
    server = canned(lambda n, req: (ok(b"tls body %d" % n), False), tls=served)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert_file)  # what requests itself would trust
    client = DagsHubClient(f"{server.url}/user/repo", token=TOKEN, retry=FAST)
    client.pin("cd" * 20)
    assert [client.read_bytes(f"data/{i}.bin") for i in range(3)] == [b"tls body %d" % i for i in range(3)]
    lean, _pool = _route(client)
    assert lean is not None and lean.connections_made == 1 and server.connections == 1
    assert all(f"Authorization: Bearer {TOKEN}".encode() in req for req in server.requests)
    # without that bundle the certificate is refused (never read without verification) and nothing is sent
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    untrusting = DagsHubClient(f"{server.url}/user/repo", token=TOKEN, retry=FAST)
    untrusting.pin("cd" * 20)
    with pytest.raises(RemoteError):
        untrusting.read_bytes("data/0.bin")
    assert len(server.requests) == 3


def _child_reads_once(client: DagsHubClient, out: "multiprocessing.Queue") -> None:
    out.put(client.read_bytes("data/01.bin"))


def test_a_child_forked_while_another_thread_holds_the_clients_locks_still_downloads(make_server, tree):
    # a DataLoader worker forked while a background thread makes the session or picks the raw route: those locks
    # stay held for good in the child unless they are renewed there
    srv = make_server(str(tree), token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=FAST)
    assert client.read_bytes("data/00.bin") == (tree / "data" / "00.bin").read_bytes()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_reads_once, args=(client, out))
    with held_by_another_thread(client._lock, client._session_lock, client.transport._lock):
        try:
            child.start()
            assert out.get(timeout=30) == (tree / "data" / "01.bin").read_bytes()
            child.join(timeout=30)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
