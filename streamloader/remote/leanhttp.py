"""A small HTTP/1.1 GET client for an asyncio event loop, for prefetch's event-loop engine
(:mod:`streamloader.remote.aioprefetch`): keep-alive connections per origin, each answer parsed by llhttp (Node.js's
C parser, through httptools) and read whole into memory.

Why not aiohttp: per small file, aiohttp's request and response objects cost ~0.6 ms of CPU on a 2-core machine,
this client ~0.4 ms (measured side by side, 1500 GETs of 30 KB, 64 in flight; the engine's CPU per file fell from
~1.45 to ~1.1 ms). What it leaves out it refuses with :class:`Unsupported`, so that the caller hands the request to
the thread path (requests), which does everything: a URL with credentials or characters that would need quoting,
a body that ends only when the connection closes, an upgrade. The parser refuses malformed answers (bad framing,
conflicting ``Content-Length``, chunk errors) and this module bounds what it keeps: the header block
(:data:`MAX_HEADER_BYTES`) and the body (the caller's ``limit``). Bytes after an answer (more than its framing
said) close the connection rather than being read as the next answer. Time limits: the caller's deadline on the
event loop's clock; a connection whose exchange is cancelled or times out is closed. The answer checks
(:class:`_Answer`) are shared with the thread path's blocking client (:mod:`streamloader.remote.leansync`).
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import defaultdict
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

try:
    import httptools
except ImportError:  # a dependency; where it is missing, prefetch uses its thread engine (aioprefetch.unusable)
    httptools = None

__all__ = ["BodyTooLarge", "ConnectionPool", "ExchangeError", "ExchangeTimeout", "MAX_HEADER_BYTES", "Response",
           "Unsupported", "quick_ack", "tls_of"]

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def quick_ack(sock: Any) -> None:
    """Switch ``TCP_QUICKACK`` on for ``sock`` now (Linux; a no-op elsewhere). A server that leaves Nagle's
    algorithm on sends a small answer's headers, then holds its body until they are acknowledged; the client's kernel
    delays that ACK by up to ~40 ms, and on a kept-alive connection it does so on every request. Quick-ACK mode
    lapses by itself, so it is switched on again right after each request is sent."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except (OSError, AttributeError, TypeError):
        pass


#: the most bytes of status line and headers one answer may have
MAX_HEADER_BYTES = 64 << 10
_MAX_IDLE = 256  # idle connections kept per origin
_DNS_TTL = 300.0  # seconds an origin's resolved addresses are reused (as aiohttp's ttl_dns_cache)
_RECV_BUFFER = 256 << 10  # bytes a connection reads at a time (asyncio's own default for a plain Protocol)


class ExchangeError(Exception):
    """The exchange failed: the connection could not be made, dropped, timed out or carried a malformed answer.
    ``answered``: whether any of an answer had arrived (then the host is up)."""

    def __init__(self, message: str, answered: bool):
        super().__init__(message)
        self.answered = answered


class Unsupported(ExchangeError):
    """A request or an answer this client leaves to a full HTTP client (see the module docstring)."""


class ExchangeTimeout(ExchangeError):
    """The exchange ran past its deadline (connecting included): a server that drips bytes cannot hold it."""


class BodyTooLarge(ExchangeError):
    """The answer's body runs past the limit the caller set (it was not read further)."""


class Headers(dict):
    """An answer's headers, looked up by name in any case: stored in lower case (llhttp hands them over as the
    server spelled them) in a plain dict, so a lookup is one call, where requests' ``CaseInsensitiveDict`` makes
    three (a prefetch makes ~10 per file)."""

    __slots__ = ()

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __setitem__(self, name: str, value: str) -> None:
        dict.__setitem__(self, name.lower(), value)


class Response:
    """A whole answer: ``status``, case-insensitive ``headers`` (a repeated name's values joined with ``", "``, as
    requests does) and the ``body`` bytes."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: "Headers", body: bytes):
        self.status, self.headers, self.body = status, headers, body


Resolver = Callable[[str, int], Awaitable[List[Tuple[Any, ...]]]]


class ConnectionPool:
    """Keep-alive connections per origin (``scheme``, host, port) and :meth:`get` on them. ``ssl_context``: for
    https (None: the system's authorities; False: no certificate checks; or a function of no arguments returning
    one of those, called at the first https connection: loading a CA bundle costs ~50 ms, for nothing where every
    origin is http); ``resolve(host, port)``: an awaitable of ``socket.getaddrinfo``'s result (the caller's thread
    pool, so that a hung lookup never holds the interpreter's exit)."""

    def __init__(self, ssl_context: Any, connect_timeout: float, resolve: Resolver,
                 pace: Optional[Tuple[float, float]] = None):
        self._ssl = ssl_context
        self.connect_timeout = connect_timeout
        self._resolve = resolve
        # (grace s, min bytes/s): an answer must average that rate once the grace has passed, as on the thread
        # path; a server that sends nothing, or drips, fails within about the grace, not at the deadline
        self.pace = pace
        self._idle: Dict[Tuple[str, str, int], List["_Connection"]] = defaultdict(list)
        self._addresses: Dict[Tuple[str, int], Tuple[float, List[Tuple[Any, ...]]]] = {}
        self._open: "set[_Connection]" = set()
        self._prefixes: List[Tuple[str, Tuple[str, str, int], str]] = []  # see _split
        # one receive buffer for every connection of the pool: each read is parsed (its pieces copied out) before
        # the loop reads again, and a fresh 256 KiB bytes per read costs the allocator a heap extension each time
        self._recv = memoryview(bytearray(_RECV_BUFFER))

    async def get(self, url: str, headers: Dict[str, str], limit: int,
                  deadline: Optional[float] = None) -> Response:
        """GET ``url`` with ``headers`` (Host is added) and return the whole answer, its body at most ``limit``
        bytes (:class:`BodyTooLarge` past that). :class:`Unsupported` for what the module docstring lists,
        :class:`ExchangeError` for a failed exchange, :class:`ExchangeTimeout` once the event loop's clock
        (``loop.time()``) passes ``deadline``. A kept-alive connection the server closed meanwhile is replaced
        once by a new one. Every :class:`ExchangeError` says whether any of the answer had arrived."""
        origin, netloc, target = self._split(url)
        request = _request_bytes(target, netloc, headers)
        while True:
            conn, reused = self._take(origin)
            if conn is None:
                conn = await self._connect(origin, deadline)
            try:
                response = await conn.exchange(request, limit, deadline, self.pace)
            except ExchangeError as exc:
                if reused and not exc.answered and not isinstance(exc, Unsupported):
                    continue  # the server had closed that idle connection: once more, on a new one
                raise
            idle = self._idle[origin]
            if conn.reusable() and len(idle) < _MAX_IDLE:
                idle.append(conn)
            else:  # (Connection: close, HTTP/1.0, more bytes than framed: never left open for the server to end)
                conn.close()
            return response

    def _split(self, url: str) -> Tuple[Tuple[str, str, int], str, str]:
        """``(origin, netloc, request target)`` of ``url``; :class:`Unsupported` for what a plain GET cannot ask.
        The ``scheme://netloc/`` prefix of an origin seen before is recognised without parsing the URL again (every
        file of a prefetch is on one or two origins)."""
        if "#" not in url:
            for prefix, origin, netloc in self._prefixes:
                if url.startswith(prefix):
                    return origin, netloc, url[len(prefix) - 1:]
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise Unsupported(f"not a plain http(s) URL: {scheme}://...", answered=False)
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise Unsupported("an invalid port", answered=False) from None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        origin = (scheme, parts.hostname, port)
        prefix = f"{parts.scheme}://{parts.netloc}/"
        if url.startswith(prefix) and target == url[len(prefix) - 1:] and len(self._prefixes) < 8:
            self._prefixes.append((prefix, origin, parts.netloc))  # (only where the two ways agree exactly)
        return origin, parts.netloc, target

    def _take(self, origin: Tuple[str, str, int]) -> Tuple[Optional["_Connection"], bool]:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn, True
            conn.close()
        return None, False

    async def _connect(self, origin: Tuple[str, str, int], deadline: Optional[float]) -> "_Connection":
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        limit = self.connect_timeout if deadline is None else min(self.connect_timeout, deadline - loop.time())
        if limit <= 0:
            raise ExchangeTimeout(f"no time left to connect to {host}:{port}", answered=False)
        tls = None
        if scheme == "https":  # (never plain TCP for https: no context given means the system's authorities)
            self._ssl, tls = tls_of(self._ssl)
        failure: Optional[BaseException] = None
        for family, _kind, proto, _name, address in await self._addresses_of(host, port):
            try:
                _transport, conn = await asyncio.wait_for(loop.create_connection(
                    lambda: _Connection(self._open, self._recv), address[0], address[1], ssl=tls, family=family,
                    proto=proto, server_hostname=host if tls else None), limit)
                return conn
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                failure = exc
        raise ExchangeError(f"cannot connect to {host}:{port} ({type(failure).__name__})", answered=False)

    async def _addresses_of(self, host: str, port: int) -> List[Tuple[Any, ...]]:
        known = self._addresses.get((host, port))
        now = time.monotonic()
        if known is not None and now - known[0] < _DNS_TTL:
            return known[1]
        try:
            found = [info for info in await self._resolve(host, port) if info[1] == socket.SOCK_STREAM]
        except OSError as exc:
            raise ExchangeError(f"cannot resolve {host} ({type(exc).__name__})", answered=False) from None
        if not found:
            raise ExchangeError(f"cannot resolve {host}", answered=False)
        self._addresses[(host, port)] = (now, found)
        return found

    def close(self) -> None:
        """Close every connection (idle or not) this pool opened."""
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


def _printable(text: str, spaces: bool) -> bool:
    """Printable ASCII only (no CR, LF or other control characters; spaces only where ``spaces``)."""
    return text.isascii() and text.isprintable() and (spaces or " " not in text)


def _request_bytes(target: str, host: str, headers: Dict[str, str]) -> bytes:
    """The request's bytes; :class:`Unsupported` for anything that would need quoting or encoding first. The
    checked block of Host and headers is kept for the next request that has the same ones (most do)."""
    key = (host, *headers.items())
    block = _BLOCKS.get(key)
    if block is None:
        if not (_printable(host, False) and all(_printable(name, False) and ":" not in name and
                                                _printable(value, True) for name, value in headers.items())):
            raise Unsupported("a request target or header that would need quoting", answered=False)
        block = "".join(f"\r\n{line}" for line in (f"Host: {host}", *(f"{n}: {v}" for n, v in headers.items())))
        if len(_BLOCKS) >= 64:
            _BLOCKS.clear()
        _BLOCKS[key] = block
    if not _printable(target, False):
        raise Unsupported("a request target or header that would need quoting", answered=False)
    return f"GET {target} HTTP/1.1{block}\r\n\r\n".encode("ascii")


_BLOCKS: Dict[Tuple[str, ...], str] = {}  # (host, *header items) -> their checked lines (see _request_bytes)


def tls_of(settings: Any) -> Tuple[Any, ssl.SSLContext]:
    """``(settings, context)``: TLS settings as a pool takes them (an ``ssl.SSLContext``; None: the system's
    authorities; False: no certificate checks; or a function of no arguments returning one of those, called here)
    and the context they mean. Settings that cannot be made (a CA bundle that is not there) are
    :class:`Unsupported`: the full client then says what is wrong, and the host is not taken for down."""
    if callable(settings):
        try:
            settings = settings()
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise Unsupported(f"no TLS settings for https ({type(exc).__name__}: {exc})", answered=False) from None
    return settings, (_unverified() if settings is False else settings or ssl.create_default_context())


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _Answer:
    """llhttp's callbacks for the answers on one connection, one at a time (:meth:`reset` before each): status,
    headers, body pieces, and the checks of the module docstring. ``error`` is set, and nothing more is collected,
    once the answer must be refused; ``headers_done`` and ``done`` once its header block and its whole body are in;
    ``overrun`` once bytes arrive after an answer's end (its framing did not account for them: the connection must
    not be reused). ``limit=None``: no bound on the body (a caller that streams it)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.overrun = False
        self.reset(0)

    def reset(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.headers = Headers()
        self.header_bytes = 0  # bytes received while the header block was not complete
        self.headers_done = False
        self.body: List[bytes] = []
        self.body_bytes = 0
        self.got_any = False
        self.done = False
        self.keep_alive = False
        self.error: Optional[ExchangeError] = None

    @property
    def status(self) -> int:
        return self.parser.get_status_code()

    def feed(self, data: Any) -> None:
        """Parse ``data``, the next bytes from the connection (check ``error`` and ``done`` after)."""
        self.got_any = True
        if not self.headers_done:
            self.header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(Unsupported("a protocol upgrade", answered=True))
        except httptools.HttpParserError as exc:
            if not self.done:  # (after the answer: the extra bytes only end the connection, see on_message_begin)
                # llhttp's reasons are its own fixed texts ("Invalid character in Content-Length"), never the bytes
                reason = str(exc)[:80]
                reason = reason if reason and _printable(reason, True) else type(exc).__name__
                self._refuse(ExchangeError(f"a malformed answer: {reason}", answered=True))
        if not self.headers_done and self.header_bytes > MAX_HEADER_BYTES:  # (then all of it was headers)
            self._refuse(ExchangeError(f"an answer's headers run past {MAX_HEADER_BYTES} bytes", answered=True))

    def _refuse(self, exc: ExchangeError) -> None:
        if self.error is None and not self.done:
            self.error = exc

    # -- llhttp callbacks ----------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:
            self.overrun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.done or self.headers_done or self.error is not None:
            return
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers = self.headers
        known = dict.get(headers, key)
        dict.__setitem__(headers, key, text if known is None else f"{known}, {text}")

    def on_headers_complete(self) -> None:
        if self.done or self.error is not None:
            return
        self.headers_done = True
        status, headers = self.status, self.headers
        if status < 200:  # nothing asked for an interim answer (no Expect: 100-continue), nor for an upgrade
            self._refuse(Unsupported(f"an interim answer (HTTP {status})", answered=True))
        elif not ("Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "").lower()
                  or status in (204, 304)):  # a body that ends at the connection's close: left to the full client
            self._refuse(Unsupported("an answer without Content-Length or chunked framing", answered=True))

    def on_body(self, body: bytes) -> None:
        if self.done or self.error is not None:
            return
        self.body_bytes += len(body)
        if self.limit is not None and self.body_bytes > self.limit:
            self._refuse(BodyTooLarge(f"a body over {self.limit} bytes", answered=True))
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done or self.error is not None:
            return
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()  # (only meaningful until the parser moves on)


class _Connection(asyncio.BufferedProtocol):
    """One connection: one exchange at a time, its answer parsed as it arrives (read into ``buffer``, which other
    connections of the loop share: what :meth:`buffer_updated` is given is parsed before the next read)."""

    def __init__(self, registry: "set[_Connection]", buffer: memoryview):
        self._registry = registry
        self._buffer = buffer
        self.transport: Optional[asyncio.Transport] = None
        self._answer = _Answer()
        self._waiter: Optional["asyncio.Future[Response]"] = None
        self._broken = False  # never to be used again (closed or lost; bytes past an answer: _Answer.overrun)
        self._pace: Tuple[float, float, float] = (0.0, 0.0, 1.0)  # (started, grace, min_rate): see exchange
        self._pace_timer: Optional[asyncio.TimerHandle] = None

    # -- asyncio.Protocol --------------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._registry.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: Any) -> None:
        answer, waiter = self._answer, self._waiter
        if waiter is None or answer.done:  # nothing was asked: not an answer to anything
            self._break()
            return
        answer.feed(data)
        if answer.error is not None:
            self._fail(answer.error)
        elif answer.done and not waiter.done():
            waiter.set_result(Response(answer.status, answer.headers, b"".join(answer.body)))

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._broken = True
        self._registry.discard(self)
        answer = self._answer
        if self._waiter is not None and not self._waiter.done() and not answer.done:
            what = "the connection closed before the answer's end" if answer.got_any else "the connection closed"
            self._waiter.set_exception(ExchangeError(what, answered=answer.got_any))

    # -- use -----------------------------------------------------------------------------------------------------
    async def exchange(self, request: bytes, limit: int, deadline: Optional[float] = None,
                       pace: Optional[Tuple[float, float]] = None) -> Response:
        """Send ``request`` and return the whole answer (see :meth:`ConnectionPool.get`); ``pace``: ``(grace,
        min_rate)``, the answer (head and body) must average ``min_rate`` bytes/s once ``grace`` s have passed."""
        if self._broken or self.transport is None or self.transport.is_closing():
            raise ExchangeError("the connection closed", answered=False)
        self._answer.reset(limit)
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        # timers, not asyncio.wait_for: that costs a task per request
        timer = loop.call_at(deadline, self._time_out) if deadline is not None else None
        if pace is not None:
            self._pace = (loop.time(), pace[0], pace[1])
            self._pace_timer = loop.call_at(loop.time() + pace[0], self._check_pace)
        self.transport.write(request)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a server that leaves Nagle on would wait ~40 ms per answer for our delayed ACK
            quick_ack(sock)
        try:
            return await self._waiter
        except BaseException:
            self.close()  # failed, timed out or cancelled mid-answer: never reused
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            if self._pace_timer is not None:
                self._pace_timer.cancel()
                self._pace_timer = None

    def _time_out(self) -> None:
        if not self._answer.done:
            self._fail(ExchangeTimeout("the answer did not come in time", answered=self._answer.got_any))

    def _check_pace(self) -> None:
        """Fail the exchange if its answer fell behind ``grace + received / min_rate`` s, else look again when it
        would (one timer per exchange, moved on as bytes arrive; none per chunk)."""
        self._pace_timer = None
        answer = self._answer
        if answer.done or self._waiter is None:
            return
        started, grace, min_rate = self._pace
        received = answer.header_bytes + answer.body_bytes
        due = started + grace + received / min_rate
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= due:
            self._fail(ExchangeTimeout(f"too slow: {received} bytes in {now - started:.1f} s (the floor is "
                                       f"{min_rate / 1024:g} KB/s after {grace:g} s)", answered=answer.got_any))
        else:
            self._pace_timer = loop.call_at(due, self._check_pace)

    def reusable(self) -> bool:
        answer = self._answer
        return (not self._broken and answer.done and not answer.overrun and answer.keep_alive
                and self.transport is not None and not self.transport.is_closing())

    def _fail(self, exc: ExchangeError) -> None:
        waiter = self._waiter
        self._break()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _break(self) -> None:
        self._broken = True
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._break()
        self._registry.discard(self)
