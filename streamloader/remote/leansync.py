"""Blocking HTTP/1.1 GETs on keep-alive connections, parsed by llhttp (httptools): the thread path's client for raw
file bytes (:class:`~streamloader.remote.transport.RawTransport` sends through it what it used to send through
urllib3's pool).

Why: per small file, urllib3 and http.client cost ~0.45 ms of CPU (header parsing through the ``email`` package,
URL re-encoding, per-request objects); this client ~0.1 ms (measured: 400 sequential GETs of 30 KB, 0.73 -> 0.10 ms
per GET in the calling thread). It is the event-loop client's counterpart (:mod:`streamloader.remote.leanhttp`:
the same answer checks, the same header limit) for one thread at a time per connection, with the body streamed as it
arrives instead of held whole, so that any size goes straight to disk.

What it leaves out it refuses with :class:`~streamloader.remote.leanhttp.Unsupported` before sending, or after the
answer's head where only the head tells (a compressed or unframed body, an interim answer, an upgrade); the caller
then asks urllib3 or requests instead. Time limits: ``connect_timeout`` to connect (TLS handshake included),
``read_timeout`` for every wait for bytes, and the whole header block within ``read_timeout`` of the request's start
(a server that drips header bytes cannot hold a thread); the body's pace is the caller's (it sees every piece).
"""
from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any, Iterator, List, Mapping, Optional, Tuple

from streamloader.remote.leanhttp import (ExchangeError, ExchangeTimeout, Unsupported, _Answer, _request_bytes,
                                          quick_ack, tls_of)

__all__ = ["BlockingPool", "StreamedAnswer"]

_MAX_IDLE = 256  # idle connections kept per origin
_DRAIN_MAX = 64 << 10  # an unread redirect or error page up to this size is read out so that its connection is kept
_DRAIN_TIME = 1.0  # ... if it arrives within this many seconds
_RECV = 1 << 18


class _Conn:
    """One connection and the parser state of its current answer."""

    __slots__ = ("sock", "answer", "buffer", "view")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.answer = _Answer()
        self.buffer = bytearray(_RECV)
        self.view = memoryview(self.buffer)

    def receive(self, size: int = _RECV) -> None:
        """One ``recv`` fed to the parser; ExchangeTimeout (socket timeout) or ExchangeError (closed, reset)."""
        answer = self.answer
        try:
            got = self.sock.recv_into(self.buffer, min(size, _RECV))
        except socket.timeout:
            raise ExchangeTimeout("no bytes within the read timeout", answered=answer.got_any) from None
        except (OSError, ssl.SSLError) as exc:
            raise ExchangeError(f"the connection failed ({type(exc).__name__})", answered=answer.got_any) from None
        if not got:
            what = "the connection closed before the answer's end" if answer.got_any else "the connection closed"
            raise ExchangeError(what, answered=answer.got_any)
        answer.feed(self.view[:got])  # (the parser copies out what it keeps)
        if answer.error is not None:
            raise answer.error

    def idle_and_open(self) -> bool:
        """Whether a kept-alive connection can carry another request: nothing arrived on it meanwhile (the
        server's close, or bytes no request asked for)."""
        if self.answer.overrun:
            return False
        try:  # (poll, not select: a busy process may have descriptors past select's FD_SETSIZE)
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError, AttributeError):  # (no poll: Windows)
            try:
                readable, _w, _x = select.select([self.sock], [], [], 0)
            except (OSError, ValueError):
                return False
            return not readable

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class BlockingPool:
    """Keep-alive connections to one origin (``scheme``, ``host``, ``port``), shared by threads (each connection
    serves one request at a time). ``tls``: for https, an ``ssl.SSLContext``, False (no certificate checks), or a
    function of no arguments returning one of those (made at the first connection). ``connections_made`` counts
    the connections it opened."""

    def __init__(self, scheme: str, host: str, port: int, tls: Any, connect_timeout: float, read_timeout: float):
        self.scheme, self.host, self.port = scheme, host, port
        self._tls = tls
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: List[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self.connections_made = 0

    def get(self, target: str, host_header: str, headers: Mapping[str, str],
            started: Optional[float] = None) -> "StreamedAnswer":
        """Send ``GET target`` and return once the answer's head is in (its body streams from
        :meth:`StreamedAnswer.chunks`). ``started`` (time.monotonic(); default now) starts the header deadline.
        Unsupported, ExchangeTimeout or ExchangeError as the module docstring says; a kept-alive connection the
        server closed meanwhile is replaced once by a new one."""
        request = _request_bytes(target, host_header, dict(headers))
        started = time.monotonic() if started is None else started
        while True:
            conn, reused = self._take()
            if conn is None:
                conn = self._connect()
            try:
                self._send(conn, request)
                self._read_head(conn, started)
            except ExchangeError as exc:
                conn.close()
                if reused and not exc.answered and not isinstance(exc, (Unsupported, ExchangeTimeout)):
                    continue  # the server had closed that idle connection: once more, on a new one
                raise
            return StreamedAnswer(self, conn, started)

    def _send(self, conn: _Conn, request: bytes) -> None:
        conn.answer.reset(None)
        try:
            conn.sock.sendall(request)
        except socket.timeout:
            raise ExchangeTimeout("the request could not be sent within the read timeout", answered=False) from None
        except (OSError, ssl.SSLError) as exc:
            raise ExchangeError(f"the request could not be sent ({type(exc).__name__})", answered=False) from None
        quick_ack(conn.sock)  # a server that leaves Nagle on would wait ~40 ms per answer for our delayed ACK

    def _read_head(self, conn: _Conn, started: float) -> None:
        answer = conn.answer
        while not answer.headers_done:
            if time.monotonic() - started > self.read_timeout:
                raise ExchangeTimeout("the answer's head did not come within the read timeout",
                                      answered=answer.got_any)
            conn.receive()
        encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise Unsupported("a compressed body", answered=True)

    def _take(self) -> Tuple[Optional[_Conn], bool]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return None, False
            if conn.idle_and_open():
                return conn, True
            conn.close()

    def _connect(self) -> _Conn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout:
            raise ExchangeTimeout(f"no connection to {self.host}:{self.port} within the connect timeout",
                                  answered=False) from None
        except OSError as exc:
            raise ExchangeError(f"cannot connect to {self.host}:{self.port} ({type(exc).__name__})",
                                answered=False) from None
        self.connections_made += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":  # (never plain TCP for https: no context means the system's authorities)
                sock = self._tls_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except Unsupported:
            sock.close()
            raise
        except (OSError, ssl.SSLError, ValueError) as exc:
            sock.close()
            raise ExchangeError(f"cannot connect to {self.host}:{self.port} ({type(exc).__name__})",
                                answered=False) from None
        return _Conn(sock)

    def _tls_context(self) -> ssl.SSLContext:
        with self._lock:
            self._tls, context = tls_of(self._tls)
        return context

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (one in use is closed when its answer is)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class StreamedAnswer:
    """An answer whose head is in: ``status``, case-insensitive ``headers`` (a repeated name's values joined with
    ``", "``), its body from :meth:`chunks`, and :meth:`close` (which keeps the connection for the next request when
    the answer ended cleanly)."""

    def __init__(self, pool: BlockingPool, conn: _Conn, started: float):
        self._pool, self._conn, self.started = pool, conn, started
        answer = conn.answer
        self.status, self.headers = answer.status, answer.headers
        self._open = True

    def chunks(self, size: int) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes as they arrive; ExchangeTimeout or ExchangeError (always
        ``answered``) when the connection fails or a wait for bytes runs past the read timeout."""
        conn = self._conn
        answer = conn.answer
        while True:
            pieces, answer.body = answer.body, []
            for piece in pieces:
                for start in range(0, len(piece), size):
                    yield piece[start:start + size] if len(piece) > size else piece
            if answer.done or not self._open:
                return
            conn.receive(size)

    def close(self) -> None:
        """Done with the answer: its connection goes back to the pool if the answer was read to its end (or is a
        short redirect or error page, read out here), else it is closed."""
        if not self._open:
            return
        self._open = False
        conn, answer = self._conn, self._conn.answer
        if not answer.done and self.status >= 300 and _small(self.headers):
            self._drain()  # (a redirect's or an error's page: a DVC file's raw GET is a redirect every time)
        if answer.done and answer.keep_alive and not answer.overrun:  # (a refused answer is never done)
            answer.body = []
            self._pool._give_back(conn)
        else:
            conn.close()


    def _drain(self) -> None:
        """Read out the rest of a short redirect or error page, for at most :data:`_DRAIN_TIME` seconds in all."""
        conn, answer = self._conn, self._conn.answer
        deadline = time.monotonic() + _DRAIN_TIME
        try:
            while not answer.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                conn.sock.settimeout(remaining)
                answer.body = []
                conn.receive()
            conn.sock.settimeout(self._pool.read_timeout)
        except (ExchangeError, OSError):
            return


def _small(headers: Mapping[str, str]) -> bool:
    try:
        return int(headers.get("Content-Length", "")) <= _DRAIN_MAX
    except ValueError:
        return False

