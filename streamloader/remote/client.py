"""DagsHub REST client: one pooled ``requests.Session``, retries, typed errors, a pinned revision.

Only a few REST endpoints are used (repository, branch and commit records, folder listings, raw file bytes,
storage buckets), all of which ``streamloader serve`` implements too, so the client works against real DagsHub and
against it. Credentials (:mod:`.credentials`): the token that is found, else none (public repos), and a token after
all once the server refuses an anonymous request. Usage::

    client = DagsHubClient("https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus", branch="main")
    client.resolve_revision()            # branch -> commit sha, once; every later call reads that snapshot
    [e.path for e in client.list_dir("data")][:3]
    client.read_bytes("data/labels.tsv", start=0, end=100)
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Union
from urllib.parse import quote

import requests

from streamloader import _forksafe
from streamloader.errors import AuthenticationError, RemoteError, RemoteFileNotFoundError, RepositoryNotFoundError
from streamloader.remote.answers import follow_pages, json_values, stream_json
from streamloader.remote.credentials import Credentials, OriginBearerAuth, TokenAcquired, take_url_token
from streamloader.remote.download import receive_body
from streamloader.remote.entries import RemoteEntry, file_entry, parse_entries
from streamloader.remote.limits import HostLimiter, host_limiter, is_pushback, parse_retry_after
from streamloader.remote.retry import RETRY_STATUSES, RetryPolicy, Transient, retrying
from streamloader.remote import revisions
from streamloader.remote.transport import (QuickAckAdapter, RawTransport, Session, TransportError, origin_of, pace,
                                           request_error)
from streamloader.remote.urls import RepoRef, safe_repo_path

log = logging.getLogger(__name__)

__all__ = ["DagsHubClient", "RemoteEntry", "RetryPolicy"]


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
        repo_url, host, url_token = take_url_token(repo_url, host)  # user:TOKEN@ never stays in a URL
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
        self._raw_prefix: Optional[tuple] = None  # ((ref, sha), quoted URL prefix of raw_url)
        self._credentials = Credentials(self.ref, token, url_token)  # anonymous until a token is needed
        self.max_concurrency = max(1, int(max_concurrency))
        self.retry = retry or RetryPolicy()
        self._lock = threading.Lock()  # guards revision resolution
        self._session_lock = threading.Lock()
        self._session: Optional[requests.Session] = None
        self._transport: Optional[RawTransport] = None
        self._limiter: Optional[HostLimiter] = None
        self._pid = os.getpid()
        _LIVE_CLIENTS.add(self)

    def _after_fork(self) -> None:
        # A lock held by another thread at fork time (resolving the revision, making the session, choosing a raw
        # route) would stay locked forever in the child, and its first request would hang there.
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()
        if self._transport is not None:
            self._transport.renew_lock()

    # -- plumbing -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"DagsHubClient({self.ref.url!r}, revision={self._sha or self._requested_revision or self.branch!r})"

    def __getstate__(self) -> Dict[str, Any]:
        # Sessions and locks do not cross process boundaries (spawned DataLoader workers rebuild them).
        state = self.__dict__.copy()
        state["_session"] = state["_transport"] = state["_limiter"] = None
        state["_lock"] = state["_session_lock"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()
        self._pid = os.getpid()
        _LIVE_CLIENTS.add(self)

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
        # room for every request the host's limiter may allow in flight (a prefetch lets it decide): a smaller pool
        # would close each connection beyond its size after one request
        size = max(self.max_concurrency, self.limiter.limits.ceiling)
        adapter = QuickAckAdapter(pool_connections=4, pool_maxsize=size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "streamloader"
        session.auth = OriginBearerAuth(origin_of(self.ref.host), self._credentials.secret)
        return session

    @property
    def limiter(self) -> HostLimiter:
        """The API host's request limiter (slots, pushback, circuit breaker), shared by the machine's processes."""
        limiter = getattr(self, "_limiter", None)
        if limiter is None:
            limiter = self._limiter = host_limiter(origin_of(self.ref.host))
        return limiter

    def _call(self, fn: Callable[[], Any], what: str, url: str) -> Any:
        """Run ``fn`` under the retry policy, each attempt in a slot of the host's limiter (told how the attempt
        went); translate what is left into typed errors. HostUnreachableError is never retried."""
        limiter, policy = self.limiter, self.retry
        deadline = time.time() + policy.max_throttled_time

        def attempt() -> Any:
            with limiter.slot(deadline) as slot:
                try:
                    return fn()
                except Transient as exc:
                    if exc.outcome == "throttled":
                        hint = exc.retry_after
                        slot.throttled(None if hint is None else min(hint, policy.max_retry_after))
                    elif exc.outcome == "unreachable":
                        slot.unreachable(str(exc))
                    else:
                        slot.answered()
                    raise

        try:
            try:
                return retrying(policy, attempt)
            except TokenAcquired:  # refused anonymously, and now there is a token: once more, with it
                return retrying(policy, attempt)
        except TokenAcquired:
            raise AuthenticationError(f"{self.ref} refused the request again without a token") from None
        except Transient as exc:
            raise RemoteError(f"{what} failed after retries: {exc}", status=exc.status, url=url) from None

    def _get(self, url: str, *, headers: Optional[Dict[str, str]] = None, params: Optional[Dict[str, Any]] = None,
             path: Optional[str] = None, stream: bool = False) -> requests.Response:
        """One GET with status handling; raises Transient for retryable outcomes, typed errors for the rest. Its body
        is read under the deadline (see transport): here, or with ``stream`` as the caller reads it."""
        failure, started, resp = None, time.monotonic(), None
        try:
            resp = self.session.get(url, headers=headers, params=params, stream=True,
                                    timeout=(self.retry.connect_timeout, self.retry.read_timeout))
            pace(resp, self.retry.read_timeout, self.retry.min_rate, started)
            if not stream and resp.status_code < 400:
                resp.content  # noqa: B018 - read now, under the deadline
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise Transient(type(exc).__name__, outcome="unreachable") from None
        except TransportError as exc:
            if resp is not None:
                resp.close()
            raise Transient(str(exc), outcome=exc.outcome) from None
        except requests.RequestException as exc:  # redirect loops, redirects to file:// ...: typed, never str(exc)
            failure = request_error(exc, url)
        if failure is not None:
            raise failure  # out of the except block, so requests' text is not even the __context__
        if resp.status_code >= 400:
            resp.close()
            self._raise_for_status(resp.status_code, resp.headers, url, path)
        return resp

    def _raise_for_status(self, status: int, headers: Any, url: str, path: Optional[str]) -> None:
        """Raise Transient (retryable) or the typed error for an HTTP error ``status``; return if it is not one."""
        if status < 400:
            return
        if status in RETRY_STATUSES:
            hint = parse_retry_after(headers.get("Retry-After"))
            raise Transient(f"HTTP {status}", status, hint, "throttled" if is_pushback(status, hint) else "answered")
        if status in (401, 403) or (status == 404 and self._credentials.may_hide_private_repo(
                url, self.session, (self.retry.connect_timeout, self.retry.read_timeout))):
            self._credentials.refused(status, self.session.auth)  # raises
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
                (self.retry.connect_timeout, self.retry.read_timeout), self.retry.min_rate)
        return transport

    # -- revision -------------------------------------------------------------------------------------------------
    def resolve_revision(self) -> str:
        """Resolve ``revision`` (a sha, or a branch name) or else ``branch`` (default: the repo's default branch) to a
        commit sha, once; every later request of this client uses that sha."""
        if self._sha is None:
            with self._lock:
                if self._sha is None:
                    self._sha = revisions.checked_commit_id(self.ref, self._resolve_revision())
                    log.debug("%s pinned to commit %s", self.ref, self._sha)
        return self._sha

    @property
    def revision(self) -> str:
        return self.resolve_revision()

    @property
    def is_resolved(self) -> bool:
        return self._sha is not None

    def commit_time(self) -> Optional[float]:
        """The pinned commit's timestamp (POSIX seconds), or None when the server gives none (see
        :func:`~streamloader.remote.revisions.commit_time`: at most two requests)."""
        return revisions.commit_time(self.ref, self._get_json, self.resolve_revision(), self.branch)

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
            resp = self._get(url, path=path, params=params, stream=True)
            with resp:  # read with a bound: a small compressed answer must not inflate without limit
                first, values = stream_json(resp)
                if first == "[":
                    return list(json_values(values))
                return next(json_values(values))

        return self._call(fetch, what, url)

    def _resolve_revision(self) -> str:
        name = self._requested_revision or self.branch
        if not name:
            try:
                repo = self._get_json(self.ref.api_base, "repository lookup")
            except RemoteFileNotFoundError:
                raise RepositoryNotFoundError(f"repository {self.ref.url} not found") from None
            name = self.branch = (repo.get("default_branch") if isinstance(repo, dict) else None) or "main"
        return revisions.resolve_name(self.ref, self._get_json, name)

    # -- listings -------------------------------------------------------------------------------------------------
    def content(self, path: str, on_listing: Callable[[Iterator[RemoteEntry]], Any], *,
                include_size: bool = False) -> Optional[RemoteEntry]:
        """Ask the content API about ``path`` (one request, more only for a paged answer).

        A file answers with its own entry, which is returned. A folder answers with its listing: its entries are
        parsed as they stream in and handed to ``on_listing`` (an iterator, to be consumed there; the call is
        retried from the start if the stream breaks), and None is returned. Missing: FileNotFoundError.
        ``include_size`` asks the server for sizes, which dagshub.com computes per entry: only for a file.
        """
        path = safe_repo_path(path)
        sha = self.resolve_revision()
        url = self.ref.api_url("content", sha, path) if path else self.ref.api_url("content", sha) + "/"
        params = {"include_size": "true"} if include_size else None

        def attempt() -> Optional[RemoteEntry]:
            resp = self._get(url, path=path, params=params, stream=True)
            with resp:
                first, values = stream_json(resp)
                if first == "[":
                    on_listing(parse_entries(json_values(values), path))
                    return None
                if first != "{":
                    raise Transient(f"unexpected answer from the content API for {path or '/'!r}")
                obj = next(json_values(values))
            if isinstance(obj.get("entries"), list):  # the paged form (older servers, storage buckets)
                on_listing(parse_entries(follow_pages(self._get_json, url, path, obj), path))
                return None
            return file_entry(obj, path, self.ref.api_base)

        return self._call(attempt, "content lookup", url)

    def storage_content(self, path: str, on_items: Callable[[Iterator[Any]], Any], *,
                        limit: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """List the folder ``path`` (``"s3/bucket/prefix"``) of a connected storage bucket, every page of it.

        The raw entry objects (``{"path", "type", "size", "hash", ...}``) of all pages are handed to ``on_items``
        as one iterator, to be consumed there (each page request is retried on its own; a page that fails for
        good fails the whole listing); None is returned. A server that answers a file path with that file's own object
        gets it returned instead. Missing: FileNotFoundError; a repeating ``next_token``: PagingError.
        """
        path = safe_repo_path(path)
        url = self.ref.api_url("storage", "content", path)
        params: Dict[str, Any] = {"paging": "true"}
        if limit:
            params["limit"] = str(int(limit))

        def attempt() -> Optional[Dict[str, Any]]:
            first = self._get_json(url, "bucket listing", path=path, params=params)
            if isinstance(first, dict) and isinstance(first.get("entries"), list):
                on_items(follow_pages(self._get_json, url, path, first, params))
                return None
            if isinstance(first, dict) and isinstance(first.get("path"), str):
                return first
            raise RemoteError(f"unexpected bucket listing answer for {path!r}", url=url)

        return self._call(attempt, "bucket listing", url)

    def storages(self) -> List[Dict[str, Any]]:
        """The connected storage buckets (``GET .../storage``): records with ``protocol`` and ``name``."""
        url = self.ref.api_url("storage")
        records = self._get_json(url, "storage lookup")
        if not isinstance(records, list):
            raise RemoteError("unexpected answer from the storage API", url=url)
        return [r for r in records if isinstance(r, dict)]

    def storage_raw_url(self, path: str) -> str:
        """The bytes of the object ``path`` (``"s3/bucket/key"``) of a connected bucket."""
        return self.ref.api_url("storage", "raw", safe_repo_path(path))

    def list_dir(self, path: str = "") -> List[RemoteEntry]:
        """The entries of one folder of the pinned revision (in the server's order). 404 → FileNotFoundError;
        a file → NotADirectoryError. Sizes are None (unknown) unless the server sent them anyway."""
        entries: List[RemoteEntry] = []
        if self.content(path, lambda items: entries.extend(items)) is not None:
            raise NotADirectoryError(20, "Not a directory", path)
        return entries

    def stat(self, path: str) -> RemoteEntry:
        """The entry of one file with its real size (``include_size`` for that path alone)."""
        def refuse(items: Iterator[RemoteEntry]) -> None:
            raise IsADirectoryError(21, "Is a directory", path)  # never ask a folder for sizes: costs per entry

        entry = self.content(path, refuse, include_size=True)
        assert entry is not None
        return entry

    # -- bytes ----------------------------------------------------------------------------------------------------
    def raw_url(self, path: str) -> str:
        """The URL of ``path``'s bytes at the pinned commit (``.../raw/<sha>/<path>``, quoted)."""
        sha = self.resolve_revision()
        known = self._raw_prefix
        if known is None or known[0] != (self.ref, sha):  # (quoted once: a prefetch asks once per file)
            known = self._raw_prefix = ((self.ref, sha), self.ref.api_url("raw", sha) + "/")
        return known[1] + quote(safe_repo_path(path), safe="/")

    def read_bytes(self, path: str, start: Optional[int] = None, end: Optional[int] = None, *,
                   url: Optional[str] = None) -> bytes:
        """Bytes ``[start, end)`` of a file (whole file by default); short bodies are retried, never returned."""
        import io

        buf = io.BytesIO()
        self.download(path, buf, start=start, end=end, url=url)
        return buf.getvalue()

    def download(self, path: str, fileobj: BinaryIO, *, start: Optional[int] = None, end: Optional[int] = None,
                 expected_size: Optional[int] = None, on_size: Optional[Callable[[int], None]] = None,
                 url: Optional[str] = None) -> int:
        """Stream a file (or the range ``[start, end)``) into ``fileobj``; returns the byte count.

        A retry restarts the transfer from the beginning of the range (``fileobj`` is truncated back to where it was),
        so ``fileobj`` holds exactly the requested bytes or an exception is raised. Checked on the way: the length
        against ``Content-Length`` and ``expected_size`` (reading stops as soon as a body runs past it), a 206's
        ``Content-Range`` against the range asked for; a server that ignores ``Range`` (200, whole body) is sliced.
        A 403 from another host than the API's (an expired presigned URL) starts again from the raw URL.
        ``on_size(total)`` is told the file's total size once an answer reveals it. ``url``: where the bytes are
        (default: the raw URL of ``path`` at the pinned commit; e.g. :meth:`storage_raw_url` for a bucket object).
        """
        path = safe_repo_path(path)
        url = url or self.raw_url(path)
        origin = fileobj.tell()
        start = start or 0
        if end is not None and end <= start:
            return 0
        ranged = bool(start or end is not None)
        headers = {"Range": f"bytes={start}-" + ("" if end is None else str(end - 1))} if ranged else None
        api_origin = origin_of(self.ref.host)
        mismatches = []

        def attempt() -> int:
            fileobj.seek(origin)
            fileobj.truncate()
            try:
                body = self.transport.get(url, headers)
            except TransportError as exc:
                raise Transient(str(exc), outcome=exc.outcome) from None
            with body:
                if body.status == 403 and body.url and origin_of(body.url) != api_origin:
                    # a presigned storage URL that expired (or was refused): ask the raw URL again for a new one
                    raise Transient(f"HTTP 403 from the storage host {origin_of(body.url)} (expired link?)", 403)
                self._raise_for_status(body.status, body.headers, url, path)
                if body.status not in (200, 206):
                    # a 204, a 304 never asked for, a redirect without a Location...: no answer holds the file's
                    # bytes but these two, whatever body came with it
                    raise Transient(f"HTTP {body.status} for a file's bytes (only 200 and 206 carry them)",
                                    body.status)
                return receive_body(body, fileobj, path, url, start, end, ranged, expected_size, on_size,
                                    mismatches)

        return self._call(attempt, f"download of {path!r}", url)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


_LIVE_CLIENTS: "weakref.WeakSet[DagsHubClient]" = weakref.WeakSet()


def _renew_locks_after_fork() -> None:
    for client in list(_LIVE_CLIENTS):
        client._after_fork()


_forksafe.register(after_in_child=_renew_locks_after_fork)
