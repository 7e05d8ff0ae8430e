"""DagsHub REST client: one pooled ``requests.Session``, tenacity retries, typed errors, a pinned revision.

Only the endpoints in ``shared/reference/dagshub-api.md`` are used, so the client works against real DagsHub and
against ``streamloader serve``. Usage::

    client = DagsHubClient("https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus", branch="main")
    client.resolve_revision()            # branch -> commit sha, once; every later call reads that snapshot
    [e.path for e in client.list_dir("data")][:3]
    client.read_bytes("data/labels.tsv", start=0, end=100)
"""
from __future__ import annotations

import logging
import os
import random
import re
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Union

import requests
import tenacity
from requests.adapters import HTTPAdapter

from streamloader.errors import (
    AuthenticationError,
    RemoteError,
    RemoteFileNotFoundError,
    RevisionNotFoundError,
)
from streamloader.remote.transport import RawTransport, Session, TransportError, origin_of
from streamloader.remote.urls import RepoRef, safe_repo_path

log = logging.getLogger(__name__)

__all__ = ["DagsHubClient", "RemoteEntry", "RetryPolicy"]

_CHUNK = 1 << 18
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry transient failures (connection errors, timeouts, 5xx, 429, short bodies)."""

    attempts: int = 8
    max_time: float = 120.0
    initial_backoff: float = 0.05
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class RemoteEntry:
    """One item of a repo listing: full repo ``path``, ``type`` "file"/"dir", real ``size``, content ``hash``."""

    path: str
    type: str
    size: int
    hash: Optional[str] = None
    versioning: Optional[str] = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


class _Transient(Exception):
    """A retryable failure; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class _OriginBearerAuth(requests.auth.AuthBase):
    """Adds the bearer token only to requests for the API origin (never to a redirect target elsewhere)."""

    def __init__(self, origin: str, token_getter: Callable[[], Optional[str]]):
        self.origin = origin
        self._token_getter = token_getter

    def headers_for(self, url: str) -> Dict[str, str]:
        """The Authorization header for a request to ``url``: empty for any origin but the API's."""
        if origin_of(url) == self.origin:
            secret = self._token_getter()
            if secret:
                return {"Authorization": f"Bearer {secret}"}
        return {}

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.headers_for(request.url))
        return request


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class DagsHubClient:
    """REST access to one repository at one pinned revision (see module docstring)."""

    def __init__(
        self,
        repo_url: Optional[Union[str, RepoRef]] = None,
        *,
        owner: Optional[str] = None,
        repo: Optional[str] = None,
        host: Optional[str] = None,
        token: Any = None,
        branch: Optional[str] = None,
        revision: Optional[str] = None,
        max_concurrency: int = 32,
        retry: Optional[RetryPolicy] = None,
    ):
        if isinstance(repo_url, RepoRef):
            self.ref = repo_url
        elif repo_url:
            self.ref = RepoRef.parse(repo_url, host=host)
        elif owner and repo:
            self.ref = RepoRef.parse(f"{owner}/{repo}", host=host)
        else:
            raise ValueError("DagsHubClient needs repo_url or owner= and repo=")
        self.branch = branch
        self._requested_revision = revision
        self._sha: Optional[str] = None
        self._token_arg = token
        self._token: Any = None  # resolved streamloader.auth.Token (or False for anonymous)
        self.max_concurrency = max(1, int(max_concurrency))
        self.retry = retry or RetryPolicy()
        self._lock = threading.Lock()  # guards revision resolution
        self._session_lock = threading.Lock()
        self._session: Optional[requests.Session] = None
        self._transport: Optional[RawTransport] = None
        self._pid = os.getpid()

    # -- plumbing -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"DagsHubClient({self.ref.url!r}, revision={self._sha or self._requested_revision or self.branch!r})"

    def __getstate__(self) -> Dict[str, Any]:
        # Sessions and locks do not cross process boundaries (spawned DataLoader workers rebuild them).
        state = self.__dict__.copy()
        state["_session"] = state["_transport"] = None
        state["_lock"] = state["_session_lock"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()
        self._pid = os.getpid()

    @property
    def session(self) -> requests.Session:
        # A forked child must not reuse the parent's pooled sockets: rebuild the session per process.
        if self._session is None or self._pid != os.getpid():
            with self._session_lock:
                if self._session is None or self._pid != os.getpid():
                    self._session = self._make_session()
                    self._pid = os.getpid()
        return self._session

    def _make_session(self) -> requests.Session:
        session = Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.max_concurrency, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "streamloader"
        session.auth = _OriginBearerAuth(origin_of(self.ref.host), self._secret)
        return session

    def _secret(self) -> Optional[str]:
        if self._token is None:
            from streamloader.auth import resolve_token

            if self._token_arg is False:
                self._token = False
            else:
                self._token = resolve_token(self.ref.host, self._token_arg)
        return self._token.reveal() if self._token else None

    def _retrying(self) -> tenacity.Retrying:
        policy = self.retry

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hint = getattr(exc, "retry_after", None)
            if hint is not None:
                return min(hint, policy.max_retry_after)
            # exponential backoff with full jitter (no tenacity helper: its signature changed across versions)
            ceiling = min(policy.max_backoff, policy.initial_backoff * 2 ** (state.attempt_number - 1))
            return random.uniform(ceiling / 2, ceiling)

        def is_transient(exc: BaseException) -> bool:
            return isinstance(exc, _Transient)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug("retrying after %s (attempt %d)", type(exc).__name__, state.attempt_number)

        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_after_delay(policy.max_time),
            wait=wait,
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )

    def _call(self, fn: Callable[[], Any], what: str, url: str) -> Any:
        """Run ``fn`` under the retry policy; translate what is left into typed errors."""
        try:
            return self._retrying()(fn)
        except _Transient as exc:
            raise RemoteError(f"{what} failed after retries: {exc}", status=exc.status, url=url) from None

    def _get(self, url: str, *, headers: Optional[Dict[str, str]] = None, params: Optional[Dict[str, Any]] = None,
             path: Optional[str] = None) -> requests.Response:
        """One GET with status handling; raises _Transient for retryable outcomes, typed errors for the rest."""
        try:
            resp = self.session.get(url, headers=headers, params=params,
                                    timeout=(self.retry.connect_timeout, self.retry.read_timeout))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(type(exc).__name__) from None
        if resp.status_code >= 400:
            resp.close()
            self._raise_for_status(resp.status_code, resp.headers, url, path)
        return resp

    def _raise_for_status(self, status: int, headers: Any, url: str, path: Optional[str]) -> None:
        """Raise _Transient (retryable) or the typed error for an HTTP error ``status``; return if it is not one."""
        if status < 400:
            return
        if status in _RETRY_STATUSES:
            raise _Transient(f"HTTP {status}", status, _parse_retry_after(headers.get("Retry-After")))
        if status in (401, 403):
            raise AuthenticationError(f"{self.ref} rejected the credentials (HTTP {status})")
        if status == 404:
            raise RemoteFileNotFoundError(path if path is not None else url)
        raise RemoteError("request failed", status=status, url=url)

    @property
    def transport(self) -> RawTransport:
        """Streams raw file bytes (directly over the Session's connection pool where that is safe)."""
        transport = self._transport
        if transport is None:
            transport = self._transport = RawTransport(
                lambda: self.session, lambda url: self.session.auth.headers_for(url),
                (self.retry.connect_timeout, self.retry.read_timeout))
        return transport

    # -- revision -------------------------------------------------------------------------------------------------
    def resolve_revision(self) -> str:
        """Resolve ``revision`` (a sha, or a branch name) or else ``branch`` (default: the repo's default branch) to a
        commit sha, once; every later request of this client uses that sha."""
        if self._sha is None:
            with self._lock:
                if self._sha is None:
                    self._sha = self._checked_commit_id(self._resolve_revision())
                    log.debug("%s pinned to commit %s", self.ref, self._sha)
        return self._sha

    @property
    def revision(self) -> str:
        return self.resolve_revision()

    @property
    def is_resolved(self) -> bool:
        return self._sha is not None

    def pin(self, sha: str) -> None:
        """Use ``sha`` as the resolved revision without asking the server (offline mode, known commits)."""
        if not re.fullmatch(r"[0-9a-f]{40}", sha or ""):
            raise ValueError(f"not a full commit sha: {sha!r}")
        self._sha = sha

    @property
    def requested_revision(self) -> Optional[str]:
        """What the caller asked for: ``revision`` if given, else ``branch`` (None = the default branch)."""
        return self._requested_revision or self.branch

    def _get_json(self, url: str, what: str, path: Optional[str] = None, params: Optional[Dict[str, Any]] = None) -> Any:
        def fetch() -> Any:
            resp = self._get(url, path=path, params=params)
            try:
                return resp.json()
            except ValueError:
                raise _Transient(f"invalid JSON from {what}") from None

        return self._call(fetch, what, url)

    def _checked_commit_id(self, sha: str) -> str:
        # The sha becomes part of request URLs and of cache paths: a server must not be able to steer either.
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
            raise RemoteError(f"{self.ref} returned an invalid commit id {sha[:80]!r}", url=self.ref.api_base)
        return sha

    def _resolve_revision(self) -> str:
        if self._requested_revision:
            rev = self._requested_revision
            url = self.ref.api_url("commits", rev)
            try:
                data = self._get_json(url, "commit lookup")
            except RemoteFileNotFoundError:
                if not re.fullmatch(r"[0-9a-f]{7,64}", rev):
                    return self._branch_head(rev)  # revision= may name a branch or tag
                raise RevisionNotFoundError(f"revision {rev!r} not found in {self.ref.url}") from None
            commit = data.get("commit", data) if isinstance(data, dict) else {}
            return str(commit.get("id") or commit.get("sha") or rev)
        branch = self.branch
        if not branch:
            try:
                repo = self._get_json(self.ref.api_base, "repository lookup")
            except RemoteFileNotFoundError:
                raise RevisionNotFoundError(f"repository {self.ref.url} not found") from None
            branch = self.branch = repo.get("default_branch") or "main"
        return self._branch_head(branch)

    def _branch_head(self, branch: str) -> str:
        try:
            data = self._get_json(self.ref.api_url("branches", branch), "branch lookup")
        except RemoteFileNotFoundError:
            raise RevisionNotFoundError(f"branch {branch!r} not found in {self.ref.url}") from None
        try:
            return str(data["commit"]["id"])
        except (KeyError, TypeError):
            raise RemoteError(f"unexpected branch record for {branch!r}", url=self.ref.api_url("branches", branch)) from None

    # -- listings -------------------------------------------------------------------------------------------------
    def list_dir(self, path: str = "") -> List[RemoteEntry]:
        """List one directory of the pinned revision (full repo paths, real sizes). 404 → FileNotFoundError."""
        path = safe_repo_path(path)
        sha = self.resolve_revision()
        url = self.ref.api_url("content", sha, path) if path else self.ref.api_url("content", sha) + "/"
        entries: List[RemoteEntry] = []
        params: Dict[str, Any] = {"include_size": "true"}
        while True:
            data = self._get_json(url, "directory listing", path=path, params=params)
            items, next_token = (data.get("entries") or [], data.get("next_token")) if isinstance(data, dict) else (data, None)
            if not isinstance(items, list):
                raise RemoteError("unexpected listing format", url=url)
            entries.extend(self._parse_entries(items, path))
            if not next_token:
                return entries
            params = {"include_size": "true", "paging": "true", "from_token": next_token}

    @staticmethod
    def _parse_entries(items: List[Any], parent: str) -> Iterator[RemoteEntry]:
        prefix = parent + "/" if parent else ""
        for item in items:
            try:
                raw_path = str(item["path"])
                entry_path = safe_repo_path(raw_path)
                kind = "dir" if item.get("type") == "dir" else "file"
                size = int(item.get("size") or 0)
            except (KeyError, TypeError, ValueError) as exc:
                # A hostile or broken listing must not steer us outside the repo: skip and say so.
                log.warning("skipping malformed listing entry under %r: %s", parent or "/", exc)
                continue
            # An entry must name a direct child exactly: "data/." or "data//x" normalise to something else and
            # could shadow a real entry, so anything that changes under normalisation is refused too.
            if (entry_path != raw_path.rstrip("/") or not entry_path.startswith(prefix)
                    or "/" in entry_path[len(prefix):] or entry_path == parent):
                log.warning("skipping listing entry %r outside directory %r", raw_path, parent or "/")
                continue
            yield RemoteEntry(entry_path, kind, size if kind == "file" else 0, item.get("hash") or None,
                              item.get("versioning"))

    # -- bytes ----------------------------------------------------------------------------------------------------
    def raw_url(self, path: str) -> str:
        return self.ref.api_url("raw", self.resolve_revision(), safe_repo_path(path))

    def read_bytes(self, path: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """Bytes ``[start, end)`` of a file (whole file by default); short bodies are retried, never returned."""
        import io

        buf = io.BytesIO()
        self.download(path, buf, start=start, end=end)
        return buf.getvalue()

    def download(self, path: str, fileobj: BinaryIO, *, start: Optional[int] = None, end: Optional[int] = None,
                 expected_size: Optional[int] = None) -> int:
        """Stream a file (or the range ``[start, end)``) into ``fileobj``; returns the byte count.

        A retry restarts the transfer from the beginning of the range (``fileobj`` is truncated back to where it was),
        so ``fileobj`` holds exactly the requested bytes or an exception is raised.
        """
        path = safe_repo_path(path)
        url = self.raw_url(path)
        origin = fileobj.tell()
        start = start or 0
        if end is not None and end <= start:
            return 0
        headers = None
        if start or end is not None:
            headers = {"Range": f"bytes={start}-" + ("" if end is None else str(end - 1))}

        def attempt() -> int:
            fileobj.seek(origin)
            fileobj.truncate()
            try:
                body = self.transport.get(url, headers)
            except TransportError as exc:
                raise _Transient(str(exc)) from None
            with body:
                self._raise_for_status(body.status, body.headers, url, path)
                if headers and body.status != 206:
                    raise _Transient(f"server ignored Range (HTTP {body.status})")
                # a compressed body's Content-Length counts compressed bytes: then only the listing size applies
                encoded = body.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
                announced = None if encoded else body.headers.get("Content-Length")
                written = 0
                try:
                    for chunk in body.chunks(_CHUNK):
                        fileobj.write(chunk)
                        written += len(chunk)
                except TransportError as exc:
                    raise _Transient(str(exc)) from None
                if announced is not None and written != int(announced):
                    raise _Transient(f"short body: {written} of {announced} bytes")
                if expected_size is not None and not headers and written != expected_size:
                    raise _Transient(f"size mismatch: got {written} bytes, the listing says {expected_size}")
                return written

        return self._call(attempt, f"download of {path!r}", url)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
