"""Streaming GETs of file bytes for the thread path: through a lean client where that is safe, else urllib3's pool,
else the requests Session.

Downloading a 30 KB file through requests costs the client about 1 ms of CPU, and even urllib3 alone ~0.5 ms (email-
based header parsing, URL re-encoding, per-request objects). For raw file bytes none of that does anything, so
:class:`RawTransport` sends those GETs through :mod:`streamloader.remote.leansync` (keep-alive sockets, answers
parsed by llhttp: ~0.1 ms a GET), with the Session's TLS settings, when the Session's own adapter serves the origin
(one a user mounts keeps them: it may configure TLS or sockets its way) and no client certificate applies. What the
lean client leaves out (a compressed or unframed body, an interim answer, a target that needs quoting) goes to
urllib3, on the very connection pool the Session's adapter would use; and whenever something needs requests' logic
(a proxy applies to the origin, or the installed requests lacks the adapter API used here) to the Session. A
redirect is always followed through the Session. Either way callers get a :class:`Body`.

Every body is read under a deadline: the read timeout bounds each wait for bytes, and the whole request must keep
up a throughput floor after a grace period (``timeout + received / min_rate`` seconds in all), so a server that
drips a byte now and then cannot hold a request for hours; breaking it is a :class:`TransportError`.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
import zlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy

from streamloader import _forksafe
from streamloader.errors import RemoteError
from streamloader.remote.leanhttp import _QUICKACK, ExchangeError, ExchangeTimeout, Unsupported, httptools, quick_ack
from streamloader.remote.leansync import BlockingPool, StreamedAnswer

log = logging.getLogger(__name__)

__all__ = ["Body", "RawTransport", "Session", "TransportError", "origin_of", "pace", "proxy_applies", "quick_ack",
           "request_error", "requests_settings", "tls_context", "MIN_RATE", "REDIRECT_STATUSES"]

_NO_FAST = object()  # cache marker: this origin goes through the Session
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: bytes/s a body must average once the grace period (the read timeout) is over
MIN_RATE = 32 * 1024


class TransportError(Exception):
    """The connection failed, dropped or was too slow (retryable). ``outcome`` is "unreachable" when the host gave
    no usable answer (refused, reset before an answer, timed out, too slow), "answered" when it dropped mid-body."""

    def __init__(self, message: str, outcome: str = "unreachable"):
        super().__init__(message)
        self.outcome = outcome


class Body:
    """An HTTP response being streamed: ``status``, case-insensitive ``headers``, ``chunks()``, ``close()``."""

    def __init__(self, status: int, headers: Mapping[str, str], chunks: Callable[[int], Iterator[bytes]],
                 close: Callable[[], None], url: str = ""):
        self.status, self.headers, self.url = status, headers, url  # url: where the answer came from (redirects)
        self._chunks, self._close = chunks, close

    def chunks(self, size: int) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes; :class:`TransportError` if the connection drops."""
        return self._chunks(size)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Body":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stream(raw: Any, size: int, started: float, grace: float, min_rate: float,
            decode: bool = True) -> Iterator[bytes]:
    """The decoded body of a urllib3 response in pieces of at most ``size`` bytes, each one as soon as it arrives
    (``read1``: one receive), failing once the body falls behind ``grace + received / min_rate`` seconds. A gzip or
    deflate body is decoded by :func:`_inflate` (``decode=False``: the bytes as they came)."""
    if decode and str(raw.headers.get("Content-Encoding") or "identity").strip().lower() in _INFLATED:
        yield from _inflate(_stream(raw, size, started, grace, min_rate, decode=False), size,
                            raw.headers["Content-Encoding"].strip().lower())
        return
    received = 0
    read1 = getattr(raw, "read1", None)
    try:
        if read1 is None:  # urllib3 < 2: whole pieces, the deadline checked between them
            for chunk in raw.stream(size, decode_content=decode):
                received += len(chunk)
                _check_pace(received, started, grace, min_rate)
                yield chunk
            return
        while True:
            chunk = read1(size, decode_content=decode)
            if not chunk:
                return
            received += len(chunk)
            _check_pace(received, started, grace, min_rate)
            yield chunk
    except urllib3.exceptions.ReadTimeoutError:
        raise TransportError(f"read timed out after {received} bytes") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # a dropped or garbled body (protocol, decoding...)
        raise TransportError(f"connection dropped after {received} bytes: {type(exc).__name__}", "answered") from None


_INFLATED = ("gzip", "x-gzip", "deflate")


def _inflate(compressed: Iterator[bytes], size: int, encoding: str) -> Iterator[bytes]:
    """A gzip or deflate body (asked for as identity, sent compressed anyway) decoded here, so that a stream cut
    short (urllib3's decoder takes a missing end for the end) is a dropped body, not a shorter file; pieces of at
    most ``size`` decoded bytes, so a small bomb is read no further than the caller wants."""
    inflater = zlib.decompressobj(47 if encoding != "deflate" else 15)  # 47: a gzip or zlib header
    raw_deflate = encoding == "deflate"  # a "deflate" body may lack the zlib header it should have (RFC 9110)
    received = 0
    try:
        for chunk in compressed:
            received += len(chunk)
            if raw_deflate:
                raw_deflate = False
                try:
                    out = inflater.decompress(chunk, size)
                except zlib.error:
                    inflater = zlib.decompressobj(-15)
                    out = inflater.decompress(chunk, size)
            else:
                out = inflater.decompress(chunk, size)
            while out:
                yield out
                out = inflater.decompress(inflater.unconsumed_tail, size) if inflater.unconsumed_tail else b""
    except zlib.error as exc:
        raise TransportError(f"a garbled {encoding} body: {exc}", "answered") from None
    if not inflater.eof:
        raise TransportError(f"the {encoding} body ends before its compressed stream does ({received} bytes)",
                             "answered")


def _check_pace(received: int, started: float, grace: float, min_rate: float) -> None:
    elapsed = time.monotonic() - started
    if elapsed > grace + received / min_rate:
        raise TransportError(f"too slow: {received} bytes in {elapsed:.1f} s (the floor is {min_rate / 1024:g} KB/s "
                             f"after {grace:g} s)")


class _PacedRaw:
    """A requests response's urllib3 body whose ``stream()`` (what ``iter_content``, ``content`` and ``json()``
    read through) keeps the deadline; anything else is the wrapped response's."""

    def __init__(self, raw: Any, started: float, grace: float, min_rate: float):
        self._raw, self._pace = raw, (started, grace, min_rate)

    def stream(self, amt: int = 1 << 16, decode_content: Optional[bool] = None) -> Iterator[bytes]:
        return _stream(self._raw, amt, *self._pace)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def pace(resp: requests.Response, timeout: float, min_rate: float = MIN_RATE, started: Optional[float] = None) -> None:
    """Make every later read of ``resp``'s body (``stream=True``) keep the deadline of the module docstring, counted
    from ``started`` (default now): :class:`TransportError` when it drops or falls behind."""
    if not isinstance(resp.raw, _PacedRaw) and hasattr(resp.raw, "stream"):
        resp.raw = _PacedRaw(resp.raw, time.monotonic() if started is None else started, timeout, min_rate)


def _requests_body(resp: requests.Response, started: float, grace: float, min_rate: float) -> Body:
    def chunks(size: int) -> Iterator[bytes]:
        return _stream(resp.raw, size, started, grace, min_rate)

    return Body(resp.status_code, resp.headers, chunks, resp.close, resp.url)


def _urllib3_body(resp: Any, url: str, started: float, grace: float, min_rate: float) -> Body:
    state = {"finished": False, "broken": False}

    def chunks(size: int) -> Iterator[bytes]:
        try:
            yield from _stream(resp, size, started, grace, min_rate)
        except TransportError:
            state["broken"] = True
            raise
        state["finished"] = True

    def close() -> None:
        if not state["finished"]:
            if resp.status >= 400 and not state["broken"]:
                try:
                    resp.drain_conn()  # a short error page: keep the connection for the retry
                except Exception:  # noqa: BLE001 - urllib3 closes the connection itself when draining fails
                    pass
            else:
                resp.close()  # half-read or broken: this connection must not serve another request
        resp.release_conn()

    return Body(resp.status, resp.headers, chunks, close, url)


class Session(requests.Session):
    """A Session that reads proxy and CA-bundle settings from the environment once per origin, not per request.

    requests re-scans the whole environment on every request (``merge_environment_settings``, ~0.1 ms of CPU, a
    tenth of what downloading a 30 KB file costs us); the answer depends only on the origin and on an environment
    that a training process does not change mid-run. Each new client (and each process) reads it afresh.
    ``raw_pools`` holds :class:`RawTransport`'s connection pool per origin: it lives and dies with the Session
    (clients build a new Session in each process, so a forked child never reuses its parent's sockets).
    """

    def __init__(self) -> None:
        super().__init__()
        self._env_settings: Dict[Any, Dict[str, Any]] = {}
        self.raw_pools: Dict[str, Any] = {}

    def close(self) -> None:
        for route in list(self.raw_pools.values()):
            if isinstance(route, tuple) and route[0] is not None:
                route[0].close()  # the lean client's connections (urllib3's pools are the adapters')
        self.raw_pools.clear()
        super().close()

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Dict[str, Any]:
        if proxies or not self.trust_env:  # explicit per-request proxies: requests' own logic, uncached
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        key = (origin_of(url), stream, verify, cert)
        settings = self._env_settings.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            self._env_settings[key] = settings
        return {**settings, "proxies": dict(settings["proxies"])}


class _HeadWatch:
    """Ends a connection whose answer's head (status line and headers) has not come within its read timeout.

    The socket's timeout bounds each receive, not the head: a server that drips a byte of it a second would hold
    a JSON request for ever (a listing, a branch lookup; raw downloads go through clients that bound the head
    themselves). One daemon thread per process keeps the deadlines; when one passes, the socket is shut down and
    the waiting read fails at once (a dropped connection: retried, then a RemoteError)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: Dict[int, Tuple[float, Any]] = {}
        self._next = 0
        self._pid = -1

    def arm(self, sock: Any, seconds: float) -> int:
        with self._cond:
            if self._pid != os.getpid():  # first use, or a forked child: the thread is not there
                self._pid = os.getpid()
                self._armed.clear()
                threading.Thread(target=self._run, name="streamloader-head-watch", daemon=True).start()
            self._next += 1
            self._armed[self._next] = (time.monotonic() + seconds, sock)
            self._cond.notify()
            return self._next

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        pid = os.getpid()
        with self._cond:
            while self._pid == pid:
                now = time.monotonic()
                late = [token for token, (due, _sock) in self._armed.items() if due <= now]
                for token in late:
                    _due, sock = self._armed.pop(token)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                due = min((d for d, _s in self._armed.values()), default=now + 60.0)
                self._cond.wait(max(0.01, due - now))


_HEAD_WATCH = _HeadWatch()


def _renew_head_watch() -> None:
    """In a forked child: the parent's watch thread is gone, and its lock may have been held at the fork."""
    _HEAD_WATCH._cond = threading.Condition(threading.Lock())
    _HEAD_WATCH._armed = {}
    _HEAD_WATCH._pid = -1


_forksafe.register(after_in_child=_renew_head_watch)


def _getresponse(conn: Any, getresponse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    sock = conn.sock
    if sock is None:
        return getresponse(*args, **kwargs)
    quick_ack(sock)
    timeout = sock.gettimeout()  # (urllib3 set the read timeout just before)
    token = _HEAD_WATCH.arm(sock, timeout if timeout else 600.0)
    try:
        return getresponse(*args, **kwargs)
    finally:
        _HEAD_WATCH.disarm(token)


class _QuickAckHTTPConnection(urllib3.connection.HTTPConnection):
    """Acknowledges the answer's first segment at once (see :class:`QuickAckAdapter`), and bounds the time its head
    may take (:class:`_HeadWatch`)."""

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - urllib3's
        return _getresponse(self, super().getresponse, *args, **kwargs)


class _QuickAckHTTPSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - urllib3's
        return _getresponse(self, super().getresponse, *args, **kwargs)


class _QuickAckHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _QuickAckHTTPConnection


class _QuickAckHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _QuickAckHTTPSConnection


class QuickAckAdapter(HTTPAdapter):
    """requests' adapter whose connections turn on ``TCP_QUICKACK`` each time they wait for an answer (Linux).

    A server that leaves Nagle's algorithm on (common for simple servers) sends a small answer's headers, then holds
    its body until the headers are acknowledged; the client's kernel delays that ACK by up to ~40 ms, and on a reused
    keep-alive connection it does so on every request (measured at 20 ms latency: 63 ms per GET instead of 23 ms).
    Quick-ACK mode lapses by itself, so it is switched on again right after each request is sent.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - requests'
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _QuickAckHTTPPool, "https": _QuickAckHTTPSPool}


def _redirect_target(url: str, location: str) -> str:
    """Where a redirect from ``url`` leads; a RemoteError (not a raw ValueError) for a Location no URL parser takes
    (``http://[::1``)."""
    try:
        target = urljoin(url, location)
        urlsplit(target).port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise RemoteError(f"GET {url}: redirected to a malformed URL") from None
    return target


class RawTransport:
    """GETs for one client: ``get(url, headers)`` -> :class:`Body` (see module docstring).

    ``session`` returns the client's current Session (rebuilt per process); ``auth_headers(url)`` the headers that
    authenticate a request to ``url`` (empty for any origin but the API's); ``timeout`` is (connect, read) and
    ``min_rate`` the throughput floor of a body (module docstring).
    """

    def __init__(self, session: Callable[[], requests.Session], auth_headers: Callable[[str], Dict[str, str]],
                 timeout: Tuple[float, float], min_rate: float = MIN_RATE):
        self._session = session
        self._auth_headers = auth_headers
        self._timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        self._requests_timeout = timeout
        self._grace, self._min_rate = float(timeout[1]), float(min_rate)
        self._lock = threading.Lock()

    def renew_lock(self) -> None:
        """A fresh lock (in a forked child: the parent's may have been held by another thread at the fork)."""
        self._lock = threading.Lock()

    def get(self, url: str, headers: Optional[Dict[str, str]] = None) -> Body:
        started = time.monotonic()
        session = self._session()
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()  # origin_of(url), without parsing twice
        pools: Dict[str, Any] = getattr(session, "raw_pools", None) or {}
        route = pools.get(origin)
        if route is None:
            route = self._pool_for(session, origin, url)
        if route is _NO_FAST:
            return self._via_session(session, url, headers, started)
        lean, pool = route
        target = parts.path + ("?" + parts.query if parts.query else "")
        sent = {"User-Agent": str(session.headers.get("User-Agent", "streamloader")), "Accept": "*/*",
                "Accept-Encoding": "identity", **self._auth_headers(url), **(headers or {})}
        if lean is not None:
            try:
                answer = lean.get(target, parts.netloc, sent, started)
            except Unsupported as exc:  # urllib3 (then requests) does what the lean client leaves out
                log.debug("GET %s through urllib3: %s", target, exc)
            except ExchangeError as exc:
                raise TransportError(str(exc), "answered" if exc.answered else "unreachable") from None
            else:
                location = answer.headers.get("Location") if answer.status in REDIRECT_STATUSES else None
                if location:
                    answer.close()
                    return self._via_session(session, _redirect_target(url, location), headers, started, shown=url)
                return _lean_body(answer, url, self._grace, self._min_rate)
        try:
            resp = pool.urlopen("GET", target, headers=sent, retries=False, redirect=False, assert_same_host=False,
                                timeout=self._timeout, preload_content=False, decode_content=True)
        except urllib3.exceptions.ClosedPoolError:
            pools.pop(origin, None)  # evicted by the pool manager: look it up again
            raise TransportError("connection pool was closed; retrying") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {_reason(exc)}") from None
        location = resp.headers.get("Location") if resp.status in REDIRECT_STATUSES else None
        if location:
            # redirects follow requests' rules (credentials never leave the API origin, further hops, limits)
            resp.drain_conn()
            resp.release_conn()
            return self._via_session(session, _redirect_target(url, location), headers, started, shown=url)
        return _urllib3_body(resp, url, started, self._grace, self._min_rate)

    def _via_session(self, session: requests.Session, url: str, headers: Optional[Dict[str, str]], started: float,
                     shown: Optional[str] = None) -> Body:
        """GET through requests (redirects followed there); errors name ``shown`` (ours), not a server's target."""
        failure = None
        try:
            resp = session.get(url, stream=True, headers=headers, timeout=self._requests_timeout)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise TransportError(type(exc).__name__) from None
        except requests.RequestException as exc:  # not worth a retry: a redirect loop, a redirect to file://
            failure = request_error(exc, shown or url)
        if failure is not None:
            raise failure  # out of the except block: requests' message is not even kept as __context__
        return _requests_body(resp, started, self._grace, self._min_rate)

    def _pool_for(self, session: requests.Session, origin: str, url: str) -> Any:
        """``(lean pool or None, urllib3 pool)`` for ``origin``, or _NO_FAST (requests must send it); made once per
        Session and origin."""
        with self._lock:
            pools = getattr(session, "raw_pools", None)
            route = pools.get(origin) if pools is not None else None
            if route is None:
                settings = requests_settings(session, url)  # (what both lookups below need, asked once)
                pool = self._lookup_pool(session, url, settings) if pools is not None else _NO_FAST
                route = _NO_FAST if pool is _NO_FAST else (self._lean_pool(session, url, settings), pool)
                self._remember(session, origin, route)
            return route

    def _lean_pool(self, session: requests.Session, url: str, settings: Dict[str, Any]) -> Optional[BlockingPool]:
        """The lean client's pool for ``url``'s origin where it can stand in for urllib3's: our own adapter (a user's
        may configure TLS or sockets its own way), no client certificate, a host and port it can use as they are."""
        if httptools is None or type(session.get_adapter(url)) is not QuickAckAdapter:
            return None
        parts = urlsplit(url)
        if settings.get("cert") or not parts.hostname or "@" in parts.netloc:
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        scheme = parts.scheme.lower()
        return BlockingPool(scheme, parts.hostname, port, lambda: tls_context(settings.get("verify", True)),
                            self._requests_timeout[0], self._requests_timeout[1])

    @staticmethod
    def _remember(session: requests.Session, origin: str, pool: Any) -> None:
        pools = getattr(session, "raw_pools", None)
        if pools is not None:
            pools[origin] = pool

    @staticmethod
    def _lookup_pool(session: requests.Session, url: str, settings: Dict[str, Any]) -> Any:
        adapter = session.get_adapter(url)
        lookup = getattr(adapter, "get_connection_with_tls_context", None)  # requests >= 2.32.2
        if lookup is None:
            return _NO_FAST
        if proxy_applies(session, url, settings):
            return _NO_FAST  # proxies (and their auth and tunnelling) stay with requests
        request = requests.Request("GET", url).prepare()
        try:
            return lookup(request, settings.get("verify", True), proxies=None, cert=settings.get("cert"))
        except Exception as exc:  # noqa: BLE001 - an adapter we do not understand: let requests do its job
            log.debug("no direct connection pool for %s (%s); using requests", url, exc)
            return _NO_FAST


def tls_context(verify: Any) -> Any:
    """The TLS settings requests would use for ``verify`` (a Session's, or REQUESTS_CA_BUNDLE's): certifi's
    authorities for True, a CA bundle file or a directory of them for a path, False (no checks) for False."""
    if verify is False:
        return False
    if verify is True or not verify:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    if os.path.isdir(str(verify)):
        return ssl.create_default_context(capath=str(verify))
    return ssl.create_default_context(cafile=str(verify))


def _lean_body(answer: StreamedAnswer, url: str, grace: float, min_rate: float) -> Body:
    """A :class:`Body` of the lean client's answer: its pieces paced as :func:`_stream` paces urllib3's, its
    failures TransportErrors (the host answered: "answered", but a read that timed out, as urllib3's would)."""

    def chunks(size: int) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in answer.chunks(size):
                received += len(chunk)
                _check_pace(received, answer.started, grace, min_rate)
                yield chunk
        except ExchangeTimeout:
            raise TransportError(f"read timed out after {received} bytes") from None
        except ExchangeError as exc:  # (Unsupported cannot come after the head)
            raise TransportError(f"connection dropped after {received} bytes: {exc}", "answered") from None

    return Body(answer.status, answer.headers, chunks, answer.close, url)


def requests_settings(session: requests.Session, url: str) -> Dict[str, Any]:
    """What requests would use for a GET of ``url`` through ``session``: its ``proxies``, ``verify`` and ``cert``,
    the environment (``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE`` ...) merged in."""
    return session.merge_environment_settings(url, {}, True, None, None)


def proxy_applies(session: requests.Session, url: str, settings: Optional[Dict[str, Any]] = None) -> bool:
    """Whether requests would send a GET of ``url`` through a proxy (session-level proxies always count: requests
    merges them per request). ``settings``: :func:`requests_settings` of ``url``, if already at hand."""
    if session.proxies:
        return True
    settings = requests_settings(session, url) if settings is None else settings
    return select_proxy(url, settings.get("proxies") or {}) is not None


def request_error(exc: BaseException, url: str) -> RemoteError:
    """The :class:`RemoteError` for a requests failure that no retry fixes. Never built from ``str(exc)``: requests
    quotes header values (a token) and redirect targets (their credentials) in its messages."""
    if isinstance(exc, requests.TooManyRedirects):
        what = "too many redirects (a redirect loop?)"
    elif isinstance(exc, (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema)):
        what = "redirected to a URL that is not http(s)"
    elif isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader)):
        what = f"invalid redirect or header ({type(exc).__name__})"
    else:
        what = f"request failed ({type(exc).__name__})"
    return RemoteError(what, url=url)


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, lower-cased."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return type(reason).__name__ if isinstance(reason, BaseException) else str(exc)[:200]
