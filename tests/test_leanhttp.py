"""The event-loop engine's HTTP/1.1 client (streamloader/remote/leanhttp.py) against a raw TCP server on 127.0.0.1
that sends exactly the bytes each test scripts: framing it must honour (Content-Length, chunked), answers it must
refuse (bad framing, conflicting lengths, oversized headers or bodies, upgrades, bodies that end at close), requests
it must not send (CR/LF or spaces that would need quoting, credentials in the URL), and keep-alive done right (a
connection reused only after a clean answer, and replaced once when the server closed it while idle)."""
from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any, List, Optional

import pytest

from canned import ok as _ok, self_signed as _self_signed
from streamloader.remote.leanhttp import (MAX_HEADER_BYTES, BodyTooLarge, ConnectionPool, ExchangeError,
                                          ExchangeTimeout, Unsupported)

async def _resolve(host: str, port: int):
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


def _gets(urls: List[str], limit: int = 1 << 20, headers: Optional[dict] = None, timeout: float = 10.0,
          tls: Any = None):
    """GET each URL in turn on one pool (``tls``: its SSL context): a list of Response or exception."""

    async def main():
        pool = ConnectionPool(tls, 5.0, _resolve)
        out = []
        try:
            for url in urls:
                try:
                    out.append(await asyncio.wait_for(pool.get(url, headers or {"Accept": "*/*"}, limit), timeout))
                except (ExchangeError, asyncio.TimeoutError) as exc:
                    out.append(exc)
        finally:
            pool.close()
        return out

    return asyncio.run(main())


def test_answers_come_whole_and_one_connection_serves_them_all(canned):
    server = canned(lambda n, req: (_ok(b"body %d" % n, b"X-Twice: a\r\nx-twice: b\r\n"), False))
    got = _gets([f"{server.url}/f{i}?v=1" for i in range(5)])
    assert [r.body for r in got] == [b"body %d" % i for i in range(5)]
    assert got[0].status == 200 and got[0].headers["x-twice"] == got[0].headers.get("X-Twice") == "a, b"
    assert "CONTENT-length" in got[0].headers and got[0].headers["Content-Length"] == "6"
    assert server.connections == 1
    first = server.requests[0].split(b"\r\n")
    assert first[0] == b"GET /f0?v=1 HTTP/1.1" and f"Host: 127.0.0.1:{server.port}".encode() in first


def test_a_chunked_body_is_decoded(canned):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    server = canned(lambda n, req: (chunked, False))
    got = _gets([f"{server.url}/a", f"{server.url}/b"])
    assert [r.body for r in got] == [b"hello world"] * 2 and server.connections == 1


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", "cut short"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello", "conflicting lengths"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "length and chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n", "a bad chunk size"),
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "a bad status line"),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nBad Header\r\n\r\nhello", "a header without a colon"),
])
def test_malformed_answers_fail_as_answered_and_the_connection_is_dropped(canned, answer, why):
    server = canned(lambda n, req: (answer, True) if n == 0 else (_ok(b"fine"), False))
    got = _gets([f"{server.url}/x", f"{server.url}/y"])
    assert isinstance(got[0], ExchangeError) and got[0].answered, (why, got[0])
    assert got[1].body == b"fine" and server.connections == 2


def test_bytes_beyond_the_framing_are_not_read_as_the_next_answer(canned):
    # a Content-Length smaller than the body sent: the rest (here a forged answer's start) must not become part
    # of the answer to the next request
    smuggled = _ok(b"abc") + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nforged"
    server = canned(lambda n, req: (smuggled, False) if n == 0 else (_ok(b"honest"), False))
    got = _gets([f"{server.url}/x", f"{server.url}/y"])
    assert got[0].body == b"abc"
    assert got[1].body == b"honest" and server.connections == 2


def test_headers_past_the_cap_end_the_exchange_early(canned):
    endless = [(0.0, b"HTTP/1.1 200 OK\r\n")] + [(0.0, b"X-Pad: " + b"p" * 1000 + b"\r\n")] * 200
    server = canned(lambda n, req: (endless, True))
    got = _gets([f"{server.url}/x"])
    assert isinstance(got[0], ExchangeError) and "headers" in str(got[0])
    assert 200 * 1000 > MAX_HEADER_BYTES


def test_a_body_over_the_limit_is_refused(canned):
    server = canned(lambda n, req: (_ok(b"x" * 5000), False))
    got = _gets([f"{server.url}/x"], limit=4096)
    assert isinstance(got[0], BodyTooLarge)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n\r\nthe body ends when the connection closes",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
])
def test_answers_this_client_leaves_to_the_full_one_are_unsupported(canned, answer):
    server = canned(lambda n, req: (answer, True))
    got = _gets([f"{server.url}/x"])
    assert isinstance(got[0], ExchangeError), got[0]
    assert isinstance(got[0], Unsupported) and got[0].answered


_NEEDS_QUOTING = [  # requests on a plain http origin that a GET could only send quoted or encoded
    ("http://127.0.0.1:{port}/a b", None),
    ("http://127.0.0.1:{port}/x\r\nX-Injected: 1", None),
    ("http://127.0.0.1:{port}/x", {"Authorization": "Bearer t\r\nX-Injected: 1"}),
    ("http://127.0.0.1:{port}/caf\u00e9", None),
]


@pytest.mark.parametrize("url, headers", [("http://user:pw@127.0.0.1:{port}/x", None), *_NEEDS_QUOTING,
                                          ("ftp://127.0.0.1:{port}/x", None)])
def test_requests_that_would_need_quoting_are_never_sent(canned, url, headers):
    server = canned(lambda n, req: (_ok(b"x"), False))
    got = _gets([url.format(port=server.port)], headers=headers)
    assert isinstance(got[0], Unsupported) and not got[0].answered
    assert server.requests == []


@pytest.mark.parametrize("url, headers", _NEEDS_QUOTING)
def test_a_known_origin_still_checks_every_request_of_it(canned, url, headers):
    # the first GET makes the origin known (its URLs are then split by prefix, its header block kept): a later
    # request on it that would need quoting is refused all the same, and never sent
    server = canned(lambda n, req: (_ok(b"x"), False))
    good = f"http://127.0.0.1:{server.port}/ok"

    async def main():
        pool = ConnectionPool(None, 5.0, _resolve)
        try:
            first = await pool.get(good, {"Accept": "*/*"}, 1 << 20)
            with pytest.raises(Unsupported) as refused:
                await pool.get(url.format(port=server.port), headers or {"Accept": "*/*"}, 1 << 20)
            return first, refused.value
        finally:
            pool.close()

    first, refused = asyncio.run(main())
    assert first.status == 200 and not refused.answered
    assert len(server.requests) == 1


def test_urls_of_a_known_origin_ask_for_what_a_full_parse_gives(canned):
    server = canned(lambda n, req: (_ok(b"x"), False))
    base = f"http://127.0.0.1:{server.port}"
    got = _gets([f"{base}/a", f"{base}/b%20c?x=1&y=%2F", f"{base}/d?q#fragment", f"HTTP://127.0.0.1:{server.port}/e",
                 f"{base}/f/"])
    assert all(r.status == 200 for r in got)
    assert [req.split(b"\r\n")[0] for req in server.requests] == [
        b"GET /a HTTP/1.1", b"GET /b%20c?x=1&y=%2F HTTP/1.1", b"GET /d?q HTTP/1.1", b"GET /e HTTP/1.1",
        b"GET /f/ HTTP/1.1"]
    assert server.connections == 1  # one origin, whatever the scheme's case


def test_a_reused_connection_the_server_drops_unanswered_is_replaced_once(canned):
    # a keep-alive answer; then the server closes that connection as the next request arrives (the race a
    # keep-alive client must expect, a server's idle timeout): the GET still gets its answer, on a new connection
    def script(n, req):
        if n == 1:
            return b"", True  # read the request, answer nothing, close
        return _ok(b"answer %d" % n), False

    server = canned(script)

    async def main():
        pool = ConnectionPool(None, 5.0, _resolve)
        try:
            first = await pool.get(f"{server.url}/a", {}, 1 << 20)
            second = await pool.get(f"{server.url}/b", {}, 1 << 20)  # dropped unanswered: once more, anew
            return first.body, second.body
        finally:
            pool.close()

    assert asyncio.run(main()) == (b"answer 0", b"answer 2")
    assert server.connections == 2


def test_a_fresh_connection_dropped_unanswered_is_not_tried_again(canned):
    server = canned(lambda n, req: (b"", True))
    got = _gets([f"{server.url}/a"])
    assert isinstance(got[0], ExchangeError) and not got[0].answered and len(server.requests) == 1


def test_connection_close_answers_are_not_reused(canned):
    server = canned(lambda n, req: (_ok(b"bye", b"Connection: close\r\n"), True))
    got = _gets([f"{server.url}/a", f"{server.url}/b"])
    assert [r.body for r in got] == [b"bye", b"bye"] and server.connections == 2


def test_a_connection_not_kept_alive_is_closed_by_the_client_at_once(canned):
    server = canned(lambda n, req: (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False))  # (left open)

    async def main():
        pool = ConnectionPool(None, 5.0, _resolve)
        try:
            body = (await pool.get(f"{server.url}/a", {}, 1024)).body
            for _ in range(100):
                if server.closed_by_client:
                    break
                await asyncio.sleep(0.01)
            return body, server.closed_by_client
        finally:
            pool.close()

    assert asyncio.run(main()) == (b"ok", 1)


def test_a_refused_connection_is_not_an_answer():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    got = _gets([f"http://127.0.0.1:{port}/x"])
    assert isinstance(got[0], ExchangeError) and not got[0].answered


def test_a_dripping_answer_is_cut_by_the_callers_time_limit_and_its_connection_dropped(canned):
    drip = [(0.0, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")] + [(0.1, b"x")] * 50
    server = canned(lambda n, req: (drip, True) if n == 0 else (_ok(b"quick"), False))
    started = time.monotonic()
    got = _gets([f"{server.url}/slow", f"{server.url}/fast"], timeout=0.5)
    assert isinstance(got[0], asyncio.TimeoutError) and time.monotonic() - started < 3
    assert got[1].body == b"quick" and server.connections == 2


def test_https_is_verified_against_the_given_authorities_and_kept_alive(canned, tmp_path):
    key_file, cert_file = _self_signed(tmp_path)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert_file, key_file)
    server = canned(lambda n, req: (_ok(b"secret %d" % n), False), tls=served)
    urls = [f"{server.url}/a", f"{server.url}/b"]
    trusting = ssl.create_default_context(cafile=cert_file)
    assert [r.body for r in _gets(urls, tls=trusting)] == [b"secret 0", b"secret 1"]
    assert server.connections == 1
    for system in (ssl.create_default_context(), None):  # the system's authorities never signed it
        refused = _gets(urls[:1], tls=system)
        assert isinstance(refused[0], ExchangeError) and not refused[0].answered
    assert len(server.requests) == 2  # nothing was sent over the refused connection
    assert [r.body for r in _gets(urls[:1], tls=False)] == [b"secret 2"]  # verify=False: no checks at all


def test_tls_settings_given_as_a_function_are_made_at_the_first_https_connection_only(canned, tmp_path):
    key_file, cert_file = _self_signed(tmp_path)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert_file, key_file)
    secure = canned(lambda n, req: (_ok(b"tls %d" % n), n == 0), tls=served)  # (the first answer closes: reconnect)
    plain = canned(lambda n, req: (_ok(b"plain"), False))
    made: List[int] = []

    def settings() -> ssl.SSLContext:
        made.append(1)
        return ssl.create_default_context(cafile=cert_file)

    assert [r.body for r in _gets([f"{plain.url}/a", f"{plain.url}/b"], tls=settings)] == [b"plain", b"plain"]
    assert made == []  # plain http never loads a CA bundle
    got = _gets([f"{plain.url}/c", f"{secure.url}/a", f"{secure.url}/b"], tls=settings)
    assert [r.body for r in got] == [b"plain", b"tls 0", b"tls 1"] and secure.connections == 2
    assert made == [1]  # made once, for both https connections

    def broken() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(tmp_path / "no-such-bundle.pem"))

    refused = _gets([f"{secure.url}/c", f"{plain.url}/d"], tls=broken)
    # settings that cannot be made are the full client's to report (Unsupported), not an outage of the host
    assert isinstance(refused[0], Unsupported) and not refused[0].answered and "no TLS settings" in str(refused[0])
    assert refused[1].body == b"plain" and len(secure.requests) == 2


def test_a_deadline_ends_the_exchange_as_a_timeout_that_says_whether_the_host_answered(canned):
    silent = canned(lambda n, req: ([(3.0, b"")], True))
    dripping = canned(lambda n, req: ([(0.0, b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")] + [(0.2, b"x")] * 50,
                                      True))

    async def main(url):
        pool = ConnectionPool(None, 5.0, _resolve)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await pool.get(url, {}, 1024, deadline=started + 0.4)
        except ExchangeTimeout as exc:
            return exc.answered, loop.time() - started, len(pool._open)
        finally:
            pool.close()

    for server, answered in ((silent, False), (dripping, True)):
        got, seconds, still_open = asyncio.run(main(server.url + "/x"))
        assert got is answered and 0.35 < seconds < 2 and still_open == 0
