"""The thread path's blocking HTTP/1.1 client (streamloader/remote/leansync.py) against a raw TCP server on 127.0.0.1
that sends exactly the bytes each test scripts (tests/canned.py): bodies streamed in pieces, answers it must refuse or
leave to urllib3, requests it must not send, time limits, and keep-alive done right (a connection reused only after
a clean answer, dropped when the server closed it, replaced once when the server drops a request on it)."""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from typing import List, Optional

import pytest

from canned import ok, self_signed
from streamloader.remote.leanhttp import MAX_HEADER_BYTES, ExchangeError, ExchangeTimeout, Unsupported
from streamloader.remote.leansync import BlockingPool


def _pool(server, read_timeout: float = 5.0, tls=None) -> BlockingPool:
    scheme = "https" if server.url.startswith("https") else "http"
    return BlockingPool(scheme, "127.0.0.1", server.port, tls, 5.0, read_timeout)


def _get(pool: BlockingPool, target: str, headers: Optional[dict] = None, size: int = 1 << 20):
    """(status, headers, body pieces) of one GET, or the exception it raised."""
    try:
        answer = pool.get(target, f"127.0.0.1:{pool.port}", headers or {"Accept": "*/*"})
    except ExchangeError as exc:
        return exc
    try:
        return answer.status, answer.headers, list(answer.chunks(size))
    except ExchangeError as exc:
        return exc
    finally:
        answer.close()


def test_bodies_stream_in_pieces_and_one_connection_serves_every_answer(canned):
    server = canned(lambda n, req: (ok(b"%d" % n * 5000, b"X-Twice: a\r\nx-twice: b\r\n"), False))
    pool = _pool(server)
    got = [_get(pool, f"/f{i}?v=1", size=1024) for i in range(4)]
    for i, (status, headers, pieces) in enumerate(got):
        assert status == 200 and b"".join(pieces) == b"%d" % i * 5000 and max(map(len, pieces)) <= 1024
    assert got[0][1]["x-twice"] == "a, b" and got[0][1]["Content-Length"] == "5000"
    assert server.connections == 1
    first = server.requests[0].split(b"\r\n")
    assert first[0] == b"GET /f0?v=1 HTTP/1.1" and f"Host: 127.0.0.1:{server.port}".encode() in first


def test_a_chunked_body_is_decoded_and_its_connection_kept(canned):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    server = canned(lambda n, req: (chunked, False))
    pool = _pool(server)
    assert [b"".join(_get(pool, p)[2]) for p in ("/a", "/b")] == [b"hello world"] * 2 and server.connections == 1


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", "cut short"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello", "conflicting lengths"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "length and chunked"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nhello", "a bad length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n", "a bad chunk size"),
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "a bad status line"),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", "not HTTP"),
])
def test_malformed_answers_fail_as_answered_and_their_connection_is_dropped(canned, answer, why):
    server = canned(lambda n, req: (answer, True) if n == 0 else (ok(b"fine"), False))
    pool = _pool(server)
    got = _get(pool, "/x")
    assert isinstance(got, ExchangeError) and got.answered and not isinstance(got, Unsupported), (why, got)
    assert b"".join(_get(pool, "/y")[2]) == b"fine" and server.connections == 2


def test_a_bad_length_is_named_in_the_error(canned):
    server = canned(lambda n, req: (b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nhello", True))
    got = _get(_pool(server), "/x")
    assert isinstance(got, ExchangeError) and "Content-Length" in str(got)


def test_bytes_beyond_the_framing_are_not_read_as_the_next_answer(canned):
    smuggled = ok(b"abc") + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nforged"
    server = canned(lambda n, req: (smuggled, False) if n == 0 else (ok(b"honest"), False))
    pool = _pool(server)
    assert b"".join(_get(pool, "/x")[2]) == b"abc"
    assert b"".join(_get(pool, "/y")[2]) == b"honest" and server.connections == 2


def test_bytes_that_arrive_on_an_idle_connection_retire_it(canned):
    # the answer, then (later, while the connection idles) bytes nobody asked for: never read as an answer
    server = canned(lambda n, req: ([(0.0, ok(b"first")), (0.2, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")],
                                    False) if n == 0 else (ok(b"second"), False))
    pool = _pool(server)
    assert b"".join(_get(pool, "/a")[2]) == b"first"
    time.sleep(0.5)
    assert b"".join(_get(pool, "/b")[2]) == b"second" and server.connections == 2


def test_headers_past_the_cap_end_the_exchange_early(canned):
    endless = [(0.0, b"HTTP/1.1 200 OK\r\n")] + [(0.0, b"X-Pad: " + b"p" * 1000 + b"\r\n")] * 200
    server = canned(lambda n, req: (endless, True))
    got = _get(_pool(server), "/x")
    assert isinstance(got, ExchangeError) and "headers" in str(got) and 200 * 1000 > MAX_HEADER_BYTES


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n\r\nthe body ends when the connection closes",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nzzzz",
])
def test_answers_left_to_urllib3_are_unsupported_once_the_head_tells(canned, answer):
    server = canned(lambda n, req: (answer, True))
    got = _get(_pool(server), "/x")
    assert isinstance(got, Unsupported) and got.answered, got


@pytest.mark.parametrize("target, headers", [
    ("/a b", None),
    ("/x\r\nX-Injected: 1", None),
    ("/x", {"Authorization": "Bearer t\r\nX-Injected: 1"}),
    ("/caf\u00e9", None),
])
def test_requests_that_would_need_quoting_are_never_sent(canned, target, headers):
    server = canned(lambda n, req: (ok(b"x"), False))
    got = _get(_pool(server), target, headers)
    assert isinstance(got, Unsupported) and not got.answered and server.requests == []


def test_a_connection_the_server_closed_while_idle_is_not_used_again(canned):
    server = canned(lambda n, req: (ok(b"answer %d" % n), True))  # answers, then closes without saying so
    pool = _pool(server)
    assert b"".join(_get(pool, "/a")[2]) == b"answer 0"
    time.sleep(0.2)
    assert b"".join(_get(pool, "/b")[2]) == b"answer 1"
    assert server.connections == 2 and len(server.requests) == 2  # no request was lost on the closed one


def test_a_reused_connection_the_server_drops_unanswered_is_replaced_once(canned):
    server = canned(lambda n, req: (b"", True) if n == 1 else (ok(b"answer %d" % n), False))
    pool = _pool(server)
    assert b"".join(_get(pool, "/a")[2]) == b"answer 0"
    assert b"".join(_get(pool, "/b")[2]) == b"answer 2" and server.connections == 2


def test_a_fresh_connection_dropped_unanswered_is_not_tried_again(canned):
    server = canned(lambda n, req: (b"", True))
    got = _get(_pool(server), "/a")
    assert isinstance(got, ExchangeError) and not got.answered and len(server.requests) == 1


def test_connection_close_and_http_1_0_answers_are_not_reused(canned):
    server = canned(lambda n, req: (ok(b"bye", b"Connection: close\r\n") if n % 2 == 0 else
                                    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye", False))
    pool = _pool(server)
    assert [b"".join(_get(pool, p)[2]) for p in ("/a", "/b", "/c")] == [b"bye"] * 3 and server.connections == 3


def test_a_short_error_page_is_read_out_and_its_connection_reused_but_a_half_read_body_is_not(canned):
    def script(n, req):
        if n == 0:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\n\r\n" + b"n" * 20, False
        whole = ok(b"x" * 100_000)
        return [(0.0, whole[:50_000]), (0.3, whole[50_000:])], False  # (the first read cannot get it all)

    server = canned(script)
    pool = _pool(server)
    missing = pool.get("/gone", "127.0.0.1", {})
    assert missing.status == 404
    missing.close()  # never read: read out here, the connection kept
    big = pool.get("/big", "127.0.0.1", {})
    assert big.status == 200 and len(next(big.chunks(1000))) == 1000
    big.close()  # half read: the connection goes
    assert b"".join(_get(pool, "/again")[2]) == b"x" * 100_000
    assert server.connections == 2


def test_a_refused_connection_is_not_an_answer():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    got = _get(BlockingPool("http", "127.0.0.1", port, None, 5.0, 5.0), "/x")
    assert isinstance(got, ExchangeError) and not got.answered


def test_a_head_that_drips_is_cut_at_the_read_timeout_and_a_stalled_body_too(canned):
    drip_head = [(0.0, b"HTTP/1.1 200 OK\r\n")] + [(0.1, b"X-A: b\r\n")] * 60
    stalled_body = [(0.0, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), (3.0, b"defghij")]
    server = canned(lambda n, req: (drip_head, True) if n == 0 else (stalled_body, True))
    pool = _pool(server, read_timeout=0.5)
    started = time.monotonic()
    got = _get(pool, "/slow-head")
    assert isinstance(got, ExchangeTimeout) and got.answered and time.monotonic() - started < 2
    started = time.monotonic()
    got = _get(pool, "/slow-body")
    assert isinstance(got, ExchangeTimeout) and got.answered and time.monotonic() - started < 2


def test_threads_share_the_pool_and_each_gets_its_own_answer(canned):
    server = canned(lambda n, req: (ok(req.split(b" ")[1] * 1000), False))
    pool = _pool(server)
    results: List[bool] = []

    def work(i: int) -> None:
        for j in range(20):
            target = f"/t{i}-{j}"
            results.append(b"".join(_get(pool, target)[2]) == target.encode() * 1000)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 160 and all(results) and server.connections <= 8


def test_https_is_verified_with_settings_made_at_the_first_connection(canned, tmp_path):
    key_file, cert_file = self_signed(tmp_path)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert_file, key_file)
    server = canned(lambda n, req: (ok(b"secret %d" % n), False), tls=served)
    made: List[int] = []

    def trusting() -> ssl.SSLContext:
        made.append(1)
        return ssl.create_default_context(cafile=cert_file)

    pool = _pool(server, tls=trusting)
    assert made == []
    assert [b"".join(_get(pool, p)[2]) for p in ("/a", "/b")] == [b"secret 0", b"secret 1"]
    assert made == [1] and server.connections == 1
    for system in (ssl.create_default_context(), None):  # the system's authorities never signed it
        refused = _get(_pool(server, tls=system), "/c")
        assert isinstance(refused, ExchangeError) and not refused.answered
    assert len(server.requests) == 2  # nothing was sent over a refused connection
    assert b"".join(_get(_pool(server, tls=False), "/d")[2]) == b"secret 2"  # verify=False: no checks
    broken = _get(_pool(server, tls=lambda: ssl.create_default_context(cafile=str(tmp_path / "none.pem"))), "/e")
    assert isinstance(broken, Unsupported) and not broken.answered and len(server.requests) == 3


def test_connections_are_reused_in_a_process_with_descriptors_past_select_limit(canned):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if soft < wanted + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted + 256), hard))
    held = []
    try:
        while len(held) < wanted:  # a busy training process: the sockets now get numbers past FD_SETSIZE (1024)
            held.append(os.open(os.devnull, os.O_RDONLY))
        server = canned(lambda n, req: (ok(b"answer %d" % n), False))
        pool = _pool(server)
        assert [b"".join(_get(pool, f"/{i}")[2]) for i in range(5)] == [b"answer %d" % i for i in range(5)]
        assert server.connections == 1
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
