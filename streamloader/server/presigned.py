"""The presigned-download origin of the dagshub-like mode: a second loopback listener (another port, so another
origin) standing in for the cloud bucket that dagshub.com redirects DVC downloads to.

URLs look like ``http://127.0.0.1:PORT/presigned/<token>?X-Expires=<unix time>&X-Signature=<hmac-sha256>``
where the token is the repo path in URL-safe base64. Like an S3 presigned URL it needs no token; it answers
(with an S3-style XML error body) 400 if an Authorization header comes along (``presigned_rejects_auth``), 403 if
the signature does not match or the URL has expired, 404 if the file is gone. Every request is counted under kind
``"presigned"`` keyed by the repo path (``""`` when the token does not decode) and logged like API requests.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qs

from streamloader.server.blobs import send_blob
from streamloader.server.httpd import send_answer
from streamloader.server.httpd import LoopbackHTTPServer
from streamloader.server.routes import HTTPError

if TYPE_CHECKING:  # pragma: no cover
    from streamloader.server.app import DagsHubServer

log = logging.getLogger(__name__)

__all__ = ["PresignedOrigin"]

_PREFIX = "/presigned/"


def _token(repo_path: str) -> str:
    return base64.urlsafe_b64encode(repo_path.encode("utf-8")).decode("ascii").rstrip("=")


def _path_of(token: str) -> Optional[str]:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class PresignedOrigin:
    """Signs URLs for repo paths and serves them from its own listener (started by DagsHubServer)."""

    def __init__(self, app: "DagsHubServer", host: str = "127.0.0.1"):
        self.app = app
        self.host = host
        self._secret = secrets.token_bytes(32)
        self._httpd: Optional[LoopbackHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.port = 0

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of this origin (empty until started)."""
        if not self.port:
            return ""
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def start(self) -> "PresignedOrigin":
        """Bind a free port and serve in a daemon thread (idempotent)."""
        with self._lock:
            if self._httpd is None:
                self._httpd = LoopbackHTTPServer((self.host, 0), self.app, _PresignedHandler)
                self._httpd.origin = self  # type: ignore[attr-defined]
                self.port = int(self._httpd.server_address[1])
                self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                                name=f"presigned-origin-{self.port}", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open connections (idempotent)."""
        with self._lock:
            httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _signature(self, token: str, expires: str) -> str:
        return hmac.new(self._secret, f"{token}\n{expires}".encode("ascii"), hashlib.sha256).hexdigest()

    def sign(self, repo_path: str, ttl: float, expired: bool = False, host: Optional[str] = None) -> str:
        """A presigned URL for ``repo_path`` valid for ``ttl`` s (already expired when ``expired``); ``host``: the
        host name the client used for the API (so a server bound to 0.0.0.0 hands out reachable URLs)."""
        self.start()
        expires = str(int(time.time()) - 1 if expired else int(time.time() + ttl))
        token = _token(repo_path)
        origin = self.url
        if host:
            origin = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        return f"{origin}{_PREFIX}{token}?X-Expires={expires}&X-Signature={self._signature(token, expires)}"

    def check(self, token: str, expires: str, signature: str, now: Optional[float] = None) -> None:
        """Raise HTTPError 403 unless the signature matches and the URL has not expired."""
        if not expires.isdigit() or not hmac.compare_digest(self._signature(token, expires), signature):
            raise HTTPError(403, "SignatureDoesNotMatch")
        if int(expires) < (time.time() if now is None else now):
            raise HTTPError(403, "AccessDenied: Request has expired")


class _PresignedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "streamloader-presigned-origin"
    disable_nagle_algorithm = True
    timeout = 120

    @property
    def app(self) -> "DagsHubServer":
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)  # the request line only: no credentials in it

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def _end_headers(self, status: int) -> None:
        self._status = status
        self._log()
        self.end_headers()

    def _log(self) -> None:
        if self._logged:
            return
        self._logged = True
        auth = self.headers.get("Authorization")
        self.app._record_done({"method": self.command, "kind": "presigned", "path": self._key,
                               "status": self._status, "range": self.headers.get("Range"),
                               "has_auth": auth is not None, "auth": auth, "query": self.path.partition("?")[2],
                               "fault": self._fault})

    def _error(self, status: int, message: str) -> None:
        code, _, text = message.partition(": ")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{text or code}</Message></Error>").encode("utf-8")
        send_answer(self, status, body, "application/xml")

    def _serve(self) -> None:
        from streamloader.server import dagshub_like  # the answers of the mode (imports this module)

        self._status, self._fault, self._logged = 0, None, False
        raw_path, _, query_string = self.path.partition("?")
        token = raw_path[len(_PREFIX):] if raw_path.startswith(_PREFIX) else ""
        repo_path = _path_of(token) if token else None
        self._key = repo_path or ""
        app = self.app
        app._record_arrival("presigned", self._key)
        try:
            if repo_path is None:
                raise HTTPError(404, "NoSuchKey")
            mode = app.dagshub_like
            if self.headers.get("Authorization") is not None and (mode is None or mode.presigned_rejects_auth):
                raise HTTPError(400, "InvalidArgument: Only one auth mechanism allowed")
            query = parse_qs(query_string)
            origin: PresignedOrigin = self.server.origin  # type: ignore[attr-defined]
            origin.check(token, query.get("X-Expires", [""])[-1], query.get("X-Signature", [""])[-1])
            if app.faults.latency > 0:
                time.sleep(float(app.faults.latency))
            decision = app.faults.decide("presigned", None, self.command)
            self._fault = decision.reason
            if decision.status is not None:
                raise HTTPError(decision.status, f"InjectedFault: HTTP {decision.status}")
            with dagshub_like.open_blob(app, repo_path) as blob:
                send_blob(self, blob, honour_range=mode is None or not mode.ignore_range)
        except HTTPError as exc:
            self._error(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("presigned origin failed on %s", raw_path)
            self.close_connection = True
            if not self._status:
                try:
                    self._error(500, "InternalError")
                except OSError:
                    pass
        finally:
            self._log()
