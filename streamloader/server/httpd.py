"""The HTTP listener under the local server's origins (the API origin and the presigned-download origin), and the
one way their handlers start an answer (:func:`send_head`) or send a whole small one (:func:`send_answer`).

A handler passed to these offers BaseHTTPRequestHandler's ``send_response/send_header/wfile/command`` plus
``_end_headers(status)``, which logs the request before its headers leave (so a client holding its answer finds
it in the request log)."""
from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Set, Type

log = logging.getLogger(__name__)

__all__ = ["LoopbackHTTPServer", "send_head", "send_answer"]


def send_head(handler: Any, status: int, content_type: str, length: Optional[int],
              headers: Optional[Dict[str, str]] = None) -> bool:
    """Send the status line, Content-Type, Content-Length (unless ``length`` is None: the caller sends its own
    framing header, e.g. Transfer-Encoding) and ``headers``; True when a body must follow (not a HEAD)."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler._end_headers(status)
    return handler.command != "HEAD"


def send_answer(handler: Any, status: int, body: bytes, content_type: str,
                headers: Optional[Dict[str, str]] = None) -> None:
    """A whole answer held in memory: :func:`send_head` with ``len(body)``, then the body (none for HEAD)."""
    if send_head(handler, status, content_type, len(body), headers) and body:
        handler.wfile.write(body)


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its owner (``self.app``) and can cut its idle keep-alive connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: Any, app: Any, handler: Type[BaseHTTPRequestHandler]):
        self.app = app
        self._connections: Set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse-DNS lookup that can stall for seconds
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; clients hanging up mid-request are routine here
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.error("error while serving %s", client_address, exc_info=True)

    def close_connections(self) -> None:
        """Cut idle keep-alive connections so a stopped server really stops answering."""
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
