"""HTTP request handling for the local DagsHub-compatible server: routing, auth, faults, JSON and file answers.

Routes (the DagsHub REST API paths streamloader and the official client use); ``{base}`` is
``/api/v1/repos/{owner}/{repo}``::

    GET  /api/v1/user, /api/v1/users/{name}        user record
    GET  {base}                                      repo record
    GET  {base}/branches[/{branch}]                  branch list / branch record (404 unknown)
    GET  {base}/commits/{sha}                        {"commit": ...} (404 unknown)
    GET  {base}/content/{rev}/{dir}                  listing (paged with paging=true or limit=N)
    GET|HEAD {base}/raw/{rev}/{path}                 bytes, Range -> 206/416
    GET  {base}/storage                              the connected buckets (server/storage.py)
    GET  {base}/storage/content/{proto}/{bucket}/{path}   a bucket folder, paged: {"entries", "next_token"}
    GET|HEAD {base}/storage/raw/{proto}/{bucket}/{path}   a bucket object's bytes
    (with a DagsHubLike, content/raw/storage answer as dagshub.com does instead: server/dagshub_like.py)
    GET  /login/oauth/authorize, POST /login/oauth/middleman, POST /login/oauth/access_token
    /_streamloader/{counts,log,head,faults,dagshub_like,reset}   unauthenticated admin endpoints (when enabled)
"""
from __future__ import annotations

import json
import logging
import os
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Dict, List, Optional
from urllib.parse import parse_qs, unquote

from streamloader.server import dagshub_like, payloads, storage
from streamloader.server.blobs import Blob, send_blob
from streamloader.server.httpd import send_answer
from streamloader.server.oauth import approval_page
from streamloader.server.repo import RepoEntry, RepoPathError, split_repo_path
from streamloader.server.routes import HTTPError, Route, page_bounds, parse_route

if TYPE_CHECKING:  # pragma: no cover
    from streamloader.server.app import DagsHubServer

log = logging.getLogger(__name__)

__all__ = ["DagsHubRequestHandler", "HTTPError"]

_MAX_BODY = 1024 * 1024


class DagsHubRequestHandler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive); ``self.server.app`` is the owning DagsHubServer."""

    protocol_version = "HTTP/1.1"
    server_version = "streamloader-test-server"
    # small JSON answers are written right after the headers: without NODELAY, Nagle + delayed ACK add ~40 ms
    @property
    def disable_nagle_algorithm(self) -> bool:  # read by StreamRequestHandler.setup() for each new connection
        return not self.server.app.faults.nagle  # type: ignore[attr-defined]

    # idle keep-alive connections are closed after this long, so abandoned pools do not pin threads forever
    timeout = 120

    @property
    def app(self) -> "DagsHubServer":
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # the request line only (never headers, so never the token)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # -- plumbing -------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # chunked request bodies are not supported; do not reuse the stream
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "bad Content-Length") from None
        if length > _MAX_BODY:
            self.close_connection = True
            raise HTTPError(413, "request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _end_headers(self, status: int) -> None:
        # log before the headers leave: once a client has its answer, the request log already shows it
        self._status = status
        self._log_request()
        self.end_headers()

    def _log_request(self) -> None:
        if self._logged or self._route is None:
            return
        self._logged = True
        auth = self.headers.get("Authorization")
        self.app._record_done(
            {
                "method": self.command,
                "kind": self._route.kind,
                "path": self._route.key,
                "status": self._status,
                "range": self.headers.get("Range"),
                "has_auth": auth is not None,
                "auth": auth,
                "query": self.path.partition("?")[2],
                "fault": self._fault,
                "in_flight": self._in_flight,
                "started": self._started,
            }
        )

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None) -> None:
        send_answer(self, status, body, content_type, headers)

    def _send_json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8", headers)

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._fault: Optional[str] = None
        self._drip: Optional[float] = None
        self._in_flight, self._started = 0, time.monotonic()
        self._logged = False
        self._route: Optional[Route] = None  # admin requests stay out of the log
        raw_path, _, query_string = self.path.partition("?")
        if raw_path.startswith(("http://", "https://")):  # absolute-form request target
            raw_path = "/" + raw_path.split("/", 3)[-1] if raw_path.count("/") >= 3 else "/"
        try:
            path: Optional[str] = unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            path = None
        if path is not None and path.startswith("/_streamloader/") and self.app.test_knobs:
            self._admin(method, path[len("/_streamloader/") :])
            return
        route = parse_route(path) if path is not None else Route("other")
        self._route = route
        self.app._record_arrival(route.kind, route.key)
        entered, retry_after = self.app._admit()
        self._in_flight = self.app._enter(route.kind)
        try:
            body = self._read_body()
            if retry_after is not None:  # dagshub-like rate limit (the body was read: the connection stays usable)
                self._fault = "rate_limit"
                raise HTTPError(429, "rate limit exceeded; retry later", {"Retry-After": retry_after})
            latency = float(self.app.faults.latency)
            if latency > 0:
                time.sleep(latency)  # each handler thread sleeps on its own: concurrent requests overlap
            if path is None:
                raise HTTPError(400, "request path is not valid UTF-8 after percent-decoding")
            self._handle(method, route, parse_qs(query_string, keep_blank_values=True), body)
        except RepoPathError as exc:
            self._send_json(exc.status, {"message": exc.message})
        except HTTPError as exc:
            self._send_json(exc.status, {"message": exc.message}, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to answer
        except Exception:  # a server bug: answer 500 rather than killing the connection silently
            log.exception("test server failed on %s %s", method, raw_path)
            self.close_connection = True
            if not self._status:  # nothing sent yet, so a clean 500 is still possible
                try:
                    self._send_json(500, {"message": "internal server error"})
                except OSError:
                    pass
        finally:
            self._log_request()  # requests that ended without an answer (client gone) are logged too
            if entered:
                self.app._release()
            self.app._leave(route.kind)

    # -- routing --------------------------------------------------------------------------------------------
    def _handle(self, method: str, route: Route, query: Dict[str, List[str]], body: bytes) -> None:
        app = self.app
        if route.kind == "oauth":
            self._oauth(method, route.action, query, body)
            return
        # everything but the OAuth pages needs the token (decided on the route, not on the raw URL text), except
        # reads of a public repo (anonymous_read); private repos answer anonymous requests anonymous_status
        # (an endpoint of a repo that this server lacks, e.g. tags, is a repo request too: 404 for a public repo)
        kind = "repo" if route.kind == "other" and route.owner else route.kind
        denied = app.access_denied(kind, self.headers.get("Authorization"))
        if denied == 404:
            raise HTTPError(404, "repository not found")
        if denied is not None:
            raise HTTPError(401, "unauthorized: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        if route.kind == "other":
            if method == "POST" and self.path.startswith("/api/internal/trackAnalyticsEvent"):
                self._send_json(200, {})  # the official client's analytics ping; accept and ignore
                return
            log.debug("unknown request %s %s", method, self.path.partition("?")[0])
            raise HTTPError(404, "not found")
        if method not in ("GET", "HEAD"):
            raise HTTPError(405, f"{method} is not allowed here", {"Allow": "GET, HEAD"})
        faults = app.faults
        decision = faults.decide(route.kind, route.key if route.kind == "raw" else None, method, self._in_flight)
        self._fault = decision.reason
        self._drip = float(faults.drip_interval) if decision.drip else None
        if decision.status is not None:
            headers = {"Retry-After": decision.retry_after} if decision.retry_after is not None else None
            raise HTTPError(decision.status, f"injected fault (HTTP {decision.status})", headers)
        if route.kind == "user":
            if route.action == "named" and route.key.lower() != app.owner.lower():
                raise HTTPError(404, "user not found")
            self._send_json(200, payloads.user(app))
            return
        if (route.owner.lower(), route.repo.lower()) != (app.owner.lower(), app.repo.lower()):
            raise HTTPError(404, "repository not found")
        if route.kind == "repo":
            self._send_json(200, payloads.repo(app))
        elif route.kind == "branches":
            self._branches(route)
        elif route.kind == "commits":
            if not app.folder.knows_commit(route.key):
                raise HTTPError(404, "commit not found")
            self._send_json(200, {"commit": payloads.commit(app, route.key)})
        elif route.kind == "storage":
            if route.action == "list":
                self._send_json(200, storage.records(self))
            else:
                storage.serve(self, route, query)
        elif route.kind == "content":
            self._check_rev(route.rev)
            if app.dagshub_like is not None:
                dagshub_like.serve_content(self, route, query)
            else:
                self._listing(route, query)
        else:
            self._check_rev(route.rev)
            if app.dagshub_like is not None:
                dagshub_like.serve_raw(self, route, decision.drop)
            else:
                self._raw(route, decision.drop)

    def _check_rev(self, rev: str) -> None:
        if rev != self.app.branch and not self.app.folder.knows_commit(rev):
            raise HTTPError(404, f"revision {rev!r} not found")

    def _branches(self, route: Route) -> None:
        app = self.app
        if route.action == "list":
            self._send_json(200, [payloads.branch(app)])
        elif route.key == app.branch:
            self._send_json(200, payloads.branch(app))
        else:
            raise HTTPError(404, f"branch {route.key!r} not found")

    def _listing(self, route: Route, query: Dict[str, List[str]]) -> None:
        folder = self.app.folder
        real = folder.resolve(route.key)
        if os.path.isfile(real):  # a file path answers with that file's own entry, as DagsHub does
            st = os.stat(real)
            entry = RepoEntry("/".join(split_repo_path(route.key)), "file", st.st_size, folder.blob_sha(real, st))
            self._send_json(200, payloads.content_entry(self.app, self._base_url(), route.rev, entry))
            return
        entries = folder.list_dir(route.key)
        rows = [payloads.content_entry(self.app, self._base_url(), route.rev, e) for e in entries]
        if not split_repo_path(route.key):  # the root also names the connected buckets, as dagshub.com's does
            rows += [storage.root_row(self, name) for name in self.app.buckets.names(self.app)]
        paging = query.get("paging", [""])[-1].lower() in ("1", "true", "yes")
        if not paging and "limit" not in query:
            self._send_json(200, rows)
            return
        start, limit = page_bounds(query)
        page = rows[start : start + limit]
        next_token = str(start + limit) if start + limit < len(rows) else None
        self._send_json(200, {"entries": page, "next_token": next_token})

    def _base_url(self) -> str:
        host = self.headers.get("Host", "")
        # echo the Host the client used (so URLs work through any alias), but only a plausible one
        if host and all(c.isalnum() or c in ".-:[]" for c in host):
            return f"http://{host}"
        return self.app.url

    def _raw(self, route: Route, drop: bool) -> None:
        app = self.app
        real = app.folder.resolve(route.key)
        if os.path.isdir(real):
            raise HTTPError(404, "is a directory")
        if self._redirect_fault():
            return
        with Blob.open(real) as blob:
            sha = app.folder.etag_sha(real, os.fstat(blob.fh.fileno()))  # type: ignore[union-attr]
            send_blob(self, blob, honour_range=True, headers={"ETag": f'"{sha}"'} if sha else None, drop=drop,
                      drip=self._drip)

    def _redirect_fault(self) -> bool:
        """The redirect fault (``faults.redirect_raw_to``): answer 307 to the same path there; False when off."""
        target = self.app.faults.redirect_raw_to
        if not target:
            return False
        self._fault = "redirect"
        self._send(307, b"", "text/plain", {"Location": target.rstrip("/") + self.path})
        return True

    # -- OAuth ----------------------------------------------------------------------------------------------
    def _oauth(self, method: str, action: str, query: Dict[str, List[str]], body: bytes) -> None:
        broker = self.app.oauth
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        if action == "authorize" and method in ("GET", "HEAD"):
            request_id = query.get("middleman_request_id", [""])[-1]
            if not request_id:
                raise HTTPError(400, "missing middleman_request_id")
            broker.approve(request_id)
            status, html = approval_page(request_id)
            self._send(status, html, "text/html; charset=utf-8")
        elif action == "middleman" and method == "POST":
            request_id = form.get("request_id", [""])[-1]
            code = broker.wait_for_code(request_id) if request_id else None
            if code is None:
                raise HTTPError(400, f"authorization request was not approved within {broker.wait_s:g} s")
            self._send_json(200, code)
        elif action == "access_token" and method == "POST":
            record = broker.exchange(form.get("code", [""])[-1])
            if record is None:
                raise HTTPError(400, "invalid or already used authorization code")
            self._send_json(200, record)
        else:
            raise HTTPError(404, "not found")

    # -- admin ----------------------------------------------------------------------------------------------
    def _admin(self, method: str, name: str) -> None:
        app = self.app
        try:
            body = self._read_body()
            if method == "GET" and name == "counts":
                self._send_json(200, {"counts": app.all_counts()})
            elif method == "GET" and name == "log":
                self._send_json(200, {"log": app.request_log})
            elif method == "GET" and name == "head":
                self._send_json(200, {"sha": app.head_sha()})
            elif method == "GET" and name == "faults":
                self._send_json(200, app.faults.to_dict())
            elif method == "POST" and name == "reset":
                app.reset_counts()
                self._send_json(200, {"ok": True})
            elif method == "GET" and name == "dagshub_like":
                mode = app.dagshub_like
                self._send_json(200, mode.to_dict() if mode is not None else None)
            elif method == "POST" and name == "dagshub_like":
                app.update_dagshub_like(_json_object(body, "DagsHubLike"))
                mode = app.dagshub_like
                self._send_json(200, mode.to_dict() if mode is not None else None)
            elif method == "POST" and name == "faults":
                app.update_faults(_json_object(body, "ServerFaults"))
                self._send_json(200, app.faults.to_dict())
            else:
                raise HTTPError(404, "unknown admin endpoint")
        except ValueError as exc:
            self._send_json(400, {"message": str(exc)})
        except HTTPError as exc:
            self._send_json(exc.status, {"message": exc.message}, exc.headers)


def _json_object(body: bytes, of: str) -> Dict[str, Any]:
    """An admin POST's body: a JSON object of ``of``'s fields (empty body: none); ValueError otherwise."""
    values = json.loads(body or b"{}")
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object of {of} fields")
    return values
