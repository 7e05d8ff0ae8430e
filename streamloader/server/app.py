"""DagsHubServer: a local folder served over HTTP as a DagsHub repository, in a background thread.

Example::

    with DagsHubServer("/tmp/repo", token="t0k") as srv:
        requests.get(f"{srv.url}/api/v1/repos/user/repo/raw/main/data/labels.tsv",
                     headers={"Authorization": "Bearer t0k"}).content
        srv.faults.error_rate = 0.3          # knobs are live
        srv.request_count("data/labels.tsv", kind="raw")
"""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import socket
import socketserver
import sys
import threading
from collections import Counter, deque
from http.server import ThreadingHTTPServer
from typing import Any, Deque, Dict, List, Mapping, Optional, Set

from streamloader.server.faults import KINDS, ServerFaults
from streamloader.server.handler import DagsHubRequestHandler
from streamloader.server.oauth import OAuthBroker
from streamloader.server.repo import RepoFolder

log = logging.getLogger(__name__)

__all__ = ["DagsHubServer"]

# request_log keeps the newest entries only, so a long benchmark cannot grow memory without bound
_MAX_LOG = 200_000


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: Any, app: "DagsHubServer"):
        self.app = app
        self._connections: Set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, DagsHubRequestHandler)

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


class DagsHubServer:
    """Serve ``root`` as ``{owner}/{repo}`` on branch ``branch`` (see module docstring for an example).

    ``token=None`` accepts any (or no) credentials; otherwise every API request needs ``Bearer <token>`` (or Basic
    with the token as password). ``test_knobs`` enables the unauthenticated ``/_streamloader/`` admin endpoints;
    ``oauth_wait`` bounds how long ``/login/oauth/middleman`` waits for approval.
    """

    def __init__(
        self,
        root: str,
        owner: str = "user",
        repo: str = "repo",
        branch: str = "main",
        token: Optional[str] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Optional[ServerFaults] = None,
        *,
        test_knobs: bool = True,
        oauth_wait: float = 30.0,
    ):
        self.folder = RepoFolder(str(root))
        self.owner, self.repo, self.branch = owner, repo, branch
        self.token = token
        self.host, self.port = host, int(port)
        self.test_knobs = test_knobs
        self._faults = faults if faults is not None else ServerFaults()
        # OAuth hands out the configured token; without one, any token works, so a generated one will do
        self.oauth = OAuthBroker(token or f"sl-oauth-{secrets.token_hex(12)}", oauth_wait)
        self._stats_lock = threading.Lock()
        self._counts: Dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self._log: Deque[Dict[str, Any]] = deque(maxlen=_MAX_LOG)
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "DagsHubServer":
        """Bind and serve in a daemon thread; returns self. Example: ``srv = DagsHubServer(d).start()``."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name=f"dagshub-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.debug("serving %s as %s/%s at %s", self.folder.root, self.owner, self.repo, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "DagsHubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def repo_url(self) -> str:
        """``{url}/{owner}/{repo}``, the form the official client's ``repo_url=`` takes."""
        return f"{self.url}/{self.owner}/{self.repo}"

    @property
    def api_url(self) -> str:
        """``{url}/api/v1/repos/{owner}/{repo}``, the base of the repo endpoints."""
        return f"{self.url}/api/v1/repos/{self.owner}/{self.repo}"

    # -- faults ---------------------------------------------------------------------------------------------
    @property
    def faults(self) -> ServerFaults:
        """The live fault knobs; mutate them or assign a new ServerFaults at any time."""
        return self._faults

    @faults.setter
    def faults(self, value: ServerFaults) -> None:
        self._faults = value

    def update_faults(self, values: Mapping[str, Any]) -> None:
        """Set some knobs by name (``{"_replace": True}`` first restores every default); ValueError if invalid."""
        values = dict(values)
        if values.pop("_replace", False):
            fresh = ServerFaults()
            fresh.update(values)
            self._faults = fresh
        else:
            self._faults.update(values)

    # -- state ----------------------------------------------------------------------------------------------
    def head_sha(self) -> str:
        """Current commit sha of the branch (derived from the folder's state)."""
        return self.folder.head_sha()

    def authorized(self, header: Optional[str]) -> bool:
        """Whether an Authorization header value carries the server token (always True without a token)."""
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() == "basic":
            try:
                credential = base64.b64decode(credential, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() not in ("bearer", "token"):
            return False
        return hmac.compare_digest(credential.encode("utf-8"), self.token.encode("utf-8"))

    # -- counters -------------------------------------------------------------------------------------------
    def _record_arrival(self, kind: str, key: str) -> None:
        with self._stats_lock:
            self._counts[kind][key] += 1

    def _record_done(self, entry: Dict[str, Any]) -> None:
        with self._stats_lock:
            self._log.append(entry)

    def request_count(self, path: Optional[str] = None, kind: Optional[str] = None) -> int:
        """Requests received (faulted and rejected ones included) for a repo path and/or kind; None = any."""
        with self._stats_lock:
            kinds = [kind] if kind is not None else list(self._counts)
            return sum(
                sum(self._counts[k].values()) if path is None else self._counts[k].get(path, 0)
                for k in kinds
                if k in self._counts
            )

    def get_counts(self, kind: Optional[str] = None) -> Dict[str, int]:
        """``{repo_path: count}`` for one kind (None: summed over kinds)."""
        with self._stats_lock:
            total: Counter = Counter()
            for k, counter in self._counts.items():
                if kind is None or k == kind:
                    total.update(counter)
            return dict(total)

    def all_counts(self) -> Dict[str, Dict[str, int]]:
        """``{kind: {key: count}}`` for every kind that saw a request."""
        with self._stats_lock:
            return {k: dict(c) for k, c in self._counts.items() if c}

    def reset_counts(self) -> None:
        """Zero the counters, clear the request log and re-arm ``fail_first``."""
        with self._stats_lock:
            for counter in self._counts.values():
                counter.clear()
            self._log.clear()
        self._faults.reset_consumed()

    @property
    def request_log(self) -> List[Dict[str, Any]]:
        """A copy of the log, one dict per finished request: ``method, kind, path, status, range, has_auth, auth,
        query, fault`` (``fault``: None or "fail_path"/"fail_first"/"error"/"throttle"/"drop"/"redirect")."""
        with self._stats_lock:
            return [dict(e) for e in self._log]
