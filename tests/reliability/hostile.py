"""Adversarial helpers for the traversal tests: a lying proxy in front of the real server, and a file audit.

``HostileProxy(upstream_url, mutate, mutate_raw=None)`` forwards every GET/HEAD to the real server and lets
``mutate(path, body)`` rewrite JSON answers (listings, branch records) and ``mutate_raw`` rewrite raw downloads
(status, headers, body); it logs the request paths it received. ``intercept(path)`` may answer a request itself
instead: it returns ``(status, headers, body)`` (sent verbatim, no Content-Length added, connection closed after;
a callable ``body(wfile)`` writes the body itself) or None to forward it.

``FileAudit`` records, through a ``sys.addaudithook`` hook, every path this process opens, writes, renames,
creates or deletes while it is active (Python-level file operations, which is all streamloader uses).
"""
from __future__ import annotations

import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import requests

Mutate = Callable[[str, bytes], bytes]
# (request path, status, headers, body, the Range asked for) -> (status, headers, body) sent instead
MutateRaw = Callable[[str, int, Dict[str, str], bytes, Optional[str]], Tuple[int, Dict[str, str], bytes]]
# request path -> (status, headers, body) to answer without asking upstream, or None
Intercept = Callable[[str], Optional[Tuple[int, Dict[str, str], bytes]]]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class HostileProxy:
    """A man in the middle that serves the upstream repo but lies in its JSON (see module docstring)."""

    def __init__(self, upstream: str, mutate: Mutate = lambda path, body: body, mutate_raw: Optional[MutateRaw] = None,
                 intercept: Optional[Intercept] = None):
        self.upstream = upstream.rstrip("/")
        self.mutate = mutate
        self.mutate_raw = mutate_raw
        self.intercept = intercept
        self.paths: List[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._forward("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._forward("HEAD")

            def _forward(self, method: str) -> None:
                proxy.paths.append(self.path)
                canned = proxy.intercept(self.path) if proxy.intercept else None
                if canned is not None:
                    self._answer(method, *canned)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "range")}
                resp = requests.request(method, proxy.upstream + self.path, headers=headers, allow_redirects=False,
                                        timeout=30)
                body = resp.content
                status = resp.status_code
                out = {name: resp.headers[name] for name in ("Content-Type", "Content-Range", "Retry-After",
                                                             "Location", "Accept-Ranges") if name in resp.headers}
                out["Content-Length"] = str(len(body))
                if status == 200 and "json" in resp.headers.get("Content-Type", ""):
                    body = proxy.mutate(self.path, body)
                    out["Content-Length"] = str(len(body))
                elif "/raw/" in self.path and proxy.mutate_raw is not None:
                    status, out, body = proxy.mutate_raw(self.path, status, out, body,
                                                         self.headers.get("Range"))
                self.send_response(status)
                for name, value in out.items():
                    self.send_header(name, value)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

            def _answer(self, method: str, status: int, headers: Dict[str, str], body: Any) -> None:
                try:
                    self._send(method, status, headers, body)
                except OSError:  # the client gave up on it meanwhile
                    self.close_connection = True

            def _send(self, method: str, status: int, headers: Dict[str, str], body: Any) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()
                if method != "HEAD":
                    if callable(body):  # it writes the body itself (e.g. a byte at a time, slowly)
                        body(self.wfile)
                    else:
                        self.wfile.write(body)
                self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> "HostileProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class FileAudit:
    """``with FileAudit() as audit: ...`` then ``audit.reads`` / ``audit.writes``: absolute paths touched."""

    _active: Optional["FileAudit"] = None
    _installed = False
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.reads: Set[str] = set()
        self.writes: Set[str] = set()

    @classmethod
    def _hook(cls, event: str, args: Tuple[Any, ...]) -> None:
        audit = cls._active
        if audit is None:
            return
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return  # an fd
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            (audit.writes if writing else audit.reads).add(_abs(path))
        elif event in ("os.rename", "os.link", "os.symlink"):
            audit.writes.update(_abs(p) for p in args[:2] if isinstance(p, (str, bytes, os.PathLike)))
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime"):
            if isinstance(args[0], (str, bytes, os.PathLike)):
                audit.writes.add(_abs(args[0]))

    def __enter__(self) -> "FileAudit":
        with FileAudit._lock:
            if not FileAudit._installed:
                sys.addaudithook(FileAudit._hook)  # permanent, but inert while no audit is active
                FileAudit._installed = True
            FileAudit._active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        FileAudit._active = None

    def outside(self, *roots: str) -> Tuple[List[str], List[str]]:
        """(reads, writes) of paths not under any of ``roots`` (reads of the interpreter's own files ignored)."""
        allowed = [os.path.realpath(r) for r in roots]
        system = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, _PACKAGE_DIR, "/usr", "/proc", "/dev",
                                                "/sys", "/etc/ssl", "/etc/pki")]
        reads = sorted(p for p in self.reads if not _under(p, allowed + system) and p not in _BENIGN_READS)
        writes = sorted(p for p in self.writes if not _under(p, allowed))
        return reads, writes


def _under(path: str, roots: List[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


# streamloader's own modules are imported lazily (reads of its .py/.pyc files are expected)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__import__("streamloader").__file__))
# files the interpreter and libraries read on their own (certificates, mime types, zone info)
_BENIGN_READS = {"/etc/mime.types", "/etc/localtime", "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf"}


def _abs(path: Any) -> str:
    return os.path.realpath(os.fsdecode(path))
