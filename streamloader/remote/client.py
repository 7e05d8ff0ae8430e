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
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Union

import requests

from streamloader.errors import (
    AuthenticationError,
    PagingError,
    RemoteError,
    RemoteFileNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from streamloader.remote.credentials import Credentials, OriginBearerAuth, TokenAcquired, take_url_token
from streamloader.remote.entries import RemoteEntry, file_entry, parse_entries
from streamloader.remote.jsonstream import JSONStreamError, JSONTooLarge, iter_json
from streamloader.remote.limits import HostLimiter, host_limiter, parse_retry_after
from streamloader.remote.transport import (MIN_RATE, QuickAckAdapter, RawTransport, Session, TransportError,
                                           origin_of, pace, request_error)
from streamloader.remote.urls import RepoRef, safe_repo_path

log = logging.getLogger(__name__)

__all__ = ["DagsHubClient", "RemoteEntry", "RetryPolicy"]

_CHUNK = 1 << 18
_MAX_LISTING_ITEM = 1 << 20  # bytes of JSON for one listing entry (real ones are ~300)
_MAX_PAGES = 100_000  # pages of one paged listing (100 entries each by default: 10M entries)
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry transient failures (connection errors, timeouts, 5xx, 429, short bodies).

    Failures count against ``attempts`` and ``max_time`` (from the first failure); pushbacks (429, 503 with
    Retry-After) only against ``max_throttled_time`` (from the start of the call), so that a rate-limited job slows
    down instead of failing. A body must average ``min_rate`` bytes/s once ``read_timeout`` has passed.
    """

    attempts: int = 8
    max_time: float = 120.0
    initial_backoff: float = 0.05
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_throttled_time: float = 900.0
    min_rate: float = MIN_RATE


class _Transient(Exception):
    """A retryable failure; ``retry_after`` is the server's hint in seconds; ``outcome`` what it tells the host's
    limiter: "throttled" (a pushback), "unreachable" (no usable answer) or "answered" (an error answer)."""

    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[float] = None,
                 outcome: str = "answered"):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.outcome = outcome


def _response_chunks(resp: requests.Response) -> Iterator[bytes]:
    """A streamed response's (decoded) body; a dropped connection is retryable."""
    try:
        yield from resp.iter_content(_CHUNK)
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError, requests.Timeout) as exc:
        raise _Transient(f"connection dropped: {type(exc).__name__}") from None
    except TransportError as exc:  # dropped or too slow (the deadline, see DagsHubClient._get)
        raise _Transient(str(exc), outcome=exc.outcome) from None


def _stream_json(resp: requests.Response) -> Any:
    """``iter_json`` over a streamed response, with its errors made ours."""
    try:
        return iter_json(_response_chunks(resp), max_value=_MAX_LISTING_ITEM)
    except JSONTooLarge as exc:
        raise RemoteError(f"answer refused: {exc}") from None
    except JSONStreamError as exc:
        raise _Transient(f"invalid JSON answer: {exc}") from None


def _json_values(values: Iterator[Any]) -> Iterator[Any]:
    """Values of a streamed JSON answer; a broken stream is retryable, an oversized one is not."""
    try:
        yield from values
    except JSONTooLarge as exc:
        raise RemoteError(f"answer refused: {exc}") from None
    except JSONStreamError as exc:
        raise _Transient(f"invalid JSON answer: {exc}") from None


_parse_retry_after = parse_retry_after  # seconds or an HTTP date


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
        self._credentials = Credentials(self.ref, token, url_token)  # anonymous until a token is needed
        self.max_concurrency = max(1, int(max_concurrency))
        self.retry = retry or RetryPolicy()
        self._lock = threading.Lock()  # guards revision resolution
        self._session_lock = threading.Lock()
        self._session: Optional[requests.Session] = None
        self._transport: Optional[RawTransport] = None
        self._limiter: Optional[HostLimiter] = None
        self._pid = os.getpid()

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

    def _retrying(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, again after each :class:`_Transient` failure until the retry policy is spent (then that
        failure is raised); anything else is raised at once. A plain loop: a retry library's per-call objects cost
        ~60 us of CPU per download, a tenth of what a small file costs in all."""
        policy = self.retry
        started = time.monotonic()
        failures, first_failure, number = 0, 0.0, 0
        while True:
            number += 1
            try:
                return attempt()
            except _Transient as exc:
                now = time.monotonic()
                if exc.outcome == "throttled":  # pushbacks spend the throttled-time budget, not the attempts
                    if now - started >= policy.max_throttled_time:
                        raise
                else:
                    failures += 1
                    if failures == 1:
                        first_failure = now
                    if failures >= policy.attempts or now - first_failure >= policy.max_time:
                        raise
                delay = self._backoff(exc, number)
                log.debug("retrying after %s (attempt %d)", type(exc).__name__, number)
            time.sleep(delay)

    def _backoff(self, exc: _Transient, number: int) -> float:
        """Seconds to wait before retrying after the ``number``-th attempt failed with ``exc``."""
        policy = self.retry
        hint = exc.retry_after
        if hint is not None:
            if exc.outcome == "throttled":
                return random.uniform(0, 0.01)  # the limiter holds back every request to the host until then
            return min(hint, policy.max_retry_after)
        # exponential backoff with full jitter
        ceiling = min(policy.max_backoff, policy.initial_backoff * 2 ** (number - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _call(self, fn: Callable[[], Any], what: str, url: str) -> Any:
        """Run ``fn`` under the retry policy, each attempt in a slot of the host's limiter (told how the attempt
        went); translate what is left into typed errors. HostUnreachableError is never retried."""
        limiter, policy = self.limiter, self.retry
        deadline = time.time() + policy.max_throttled_time

        def attempt() -> Any:
            with limiter.slot(deadline) as slot:
                try:
                    return fn()
                except _Transient as exc:
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
                return self._retrying(attempt)
            except TokenAcquired:  # refused anonymously, and now there is a token: once more, with it
                return self._retrying(attempt)
        except TokenAcquired:
            raise AuthenticationError(f"{self.ref} refused the request again without a token") from None
        except _Transient as exc:
            raise RemoteError(f"{what} failed after retries: {exc}", status=exc.status, url=url) from None

    def _get(self, url: str, *, headers: Optional[Dict[str, str]] = None, params: Optional[Dict[str, Any]] = None,
             path: Optional[str] = None, stream: bool = False) -> requests.Response:
        """One GET with status handling; raises _Transient for retryable outcomes, typed errors for the rest. Its body
        is read under the deadline (see transport): here, or with ``stream`` as the caller reads it."""
        failure, started, resp = None, time.monotonic(), None
        try:
            resp = self.session.get(url, headers=headers, params=params, stream=True,
                                    timeout=(self.retry.connect_timeout, self.retry.read_timeout))
            pace(resp, self.retry.read_timeout, self.retry.min_rate, started)
            if not stream and resp.status_code < 400:
                resp.content  # noqa: B018 - read now, under the deadline
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Transient(type(exc).__name__, outcome="unreachable") from None
        except TransportError as exc:
            if resp is not None:
                resp.close()
            raise _Transient(str(exc), outcome=exc.outcome) from None
        except requests.RequestException as exc:  # redirect loops, redirects to file:// ...: typed, never str(exc)
            failure = request_error(exc, url)
        if failure is not None:
            raise failure  # out of the except block, so requests' text is not even the __context__
        if resp.status_code >= 400:
            resp.close()
            self._raise_for_status(resp.status_code, resp.headers, url, path)
        return resp

    def _raise_for_status(self, status: int, headers: Any, url: str, path: Optional[str]) -> None:
        """Raise _Transient (retryable) or the typed error for an HTTP error ``status``; return if it is not one."""
        if status < 400:
            return
        if status in _RETRY_STATUSES:
            hint = _parse_retry_after(headers.get("Retry-After"))
            pushback = status == 429 or (status == 503 and hint is not None)  # a bare 503 is a server error
            raise _Transient(f"HTTP {status}", status, hint, "throttled" if pushback else "answered")
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
                    self._sha = self._checked_commit_id(self._resolve_revision())
                    log.debug("%s pinned to commit %s", self.ref, self._sha)
        return self._sha

    @property
    def revision(self) -> str:
        return self.resolve_revision()

    @property
    def is_resolved(self) -> bool:
        return self._sha is not None

    def commit_time(self) -> Optional[float]:
        """The pinned commit's timestamp (POSIX seconds), or None when the server gives none.

        Asks the commit record, then (servers that leave it empty there) the branch record when its head is still
        the pinned commit: at most two requests.
        """
        import datetime

        sha = self.resolve_revision()
        lookups = [("commits", sha)] + ([("branches", self.branch)] if self.branch else [])
        for kind, name in lookups:
            data = self._get_json(self.ref.api_url(kind, name), f"{kind[:-1]} lookup")
            commit = data.get("commit", data) if isinstance(data, dict) else {}
            if not isinstance(commit, dict) or commit.get("id", sha) != sha:
                continue
            try:
                stamp = datetime.datetime.fromisoformat(str(commit.get("timestamp") or "").replace("Z", "+00:00"))
            except ValueError:
                continue
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=datetime.timezone.utc)
            if stamp.timestamp() > 0:
                return stamp.timestamp()
        return None

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
                first, values = _stream_json(resp)
                if first == "[":
                    return list(_json_values(values))
                return next(_json_values(values))

        return self._call(fetch, what, url)

    def _checked_commit_id(self, sha: str) -> str:
        # The sha becomes part of request URLs and of cache paths: a server must not be able to steer either.
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
            raise RemoteError(f"{self.ref} returned an invalid commit id {sha[:80]!r}", url=self.ref.api_base)
        return sha

    def _resolve_revision(self) -> str:
        name = self._requested_revision or self.branch
        if not name:
            try:
                repo = self._get_json(self.ref.api_base, "repository lookup")
            except RemoteFileNotFoundError:
                raise RepositoryNotFoundError(f"repository {self.ref.url} not found") from None
            name = self.branch = (repo.get("default_branch") if isinstance(repo, dict) else None) or "main"
        return self._resolve_name(name)

    def _resolve_name(self, name: str) -> str:
        """A full commit id is looked up as a commit; any other name as a branch, then a tag, then (when it looks
        like one) an abbreviated commit id. Only 404s move on to the next kind: a server error is retried and then
        reported as what it is, never as "not found"."""
        if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name):
            lookups = [("commits", "commit", self._commit_id)]
        else:
            lookups = [("branches", "branch", self._branch_commit), ("tags", "tag", self._tag_commit)]
            if re.fullmatch(r"[0-9a-f]{7,39}", name):
                lookups.append(("commits", "commit", self._commit_id))
        for endpoint, kind, parse in lookups:
            url = self.ref.api_url(endpoint, name)
            try:
                data = self._get_json(url, f"{kind} lookup")
            except RemoteFileNotFoundError:
                continue
            sha = parse(data)
            if sha is None:
                raise RemoteError(f"unexpected {kind} record for {name!r}", url=url)
            return sha
        kinds = " or ".join(kind for _endpoint, kind, _parse in lookups)
        if self._repo_missing():
            raise RepositoryNotFoundError(f"repository {self.ref.url} not found (check the owner and the name)")
        raise RevisionNotFoundError(f"no {kinds} named {name!r} in {self.ref.url}")

    def _repo_missing(self) -> bool:
        """Whether the repository itself is missing (asked only after a revision was not found)."""
        try:
            self._get_json(self.ref.api_base, "repository lookup")
        except RemoteFileNotFoundError:
            return True
        except RemoteError:
            return False
        return False

    @staticmethod
    def _commit_id(data: Any) -> Optional[str]:
        commit = data.get("commit", data) if isinstance(data, dict) else None
        if not isinstance(commit, dict):
            return None
        sha = commit.get("id") or commit.get("sha")
        return str(sha) if sha else None

    @staticmethod
    def _branch_commit(data: Any) -> Optional[str]:
        commit = data.get("commit") if isinstance(data, dict) else None
        sha = commit.get("id") or commit.get("sha") if isinstance(commit, dict) else None
        return str(sha) if sha else None

    @staticmethod
    def _tag_commit(data: Any) -> Optional[str]:
        # Gitea's tag record: {"name", "id" (the tag object), "commit": {"sha", "url"}}
        commit = data.get("commit") if isinstance(data, dict) else None
        sha = (commit.get("sha") or commit.get("id")) if isinstance(commit, dict) else None
        return str(sha) if sha else None

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
                first, values = _stream_json(resp)
                if first == "[":
                    on_listing(parse_entries(_json_values(values), path))
                    return None
                if first != "{":
                    raise _Transient(f"unexpected answer from the content API for {path or '/'!r}")
                obj = next(_json_values(values))
            if isinstance(obj.get("entries"), list):  # the paged form (older servers, storage buckets)
                on_listing(parse_entries(self._pages(url, path, obj), path))
                return None
            return file_entry(obj, path, self.ref.api_base)

        return self._call(attempt, "content lookup", url)

    def _pages(self, url: str, path: str, first: Dict[str, Any],
               params: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
        """Items of a paged listing, following ``next_token`` (an empty or missing token ends it; a repeated
        token or more than _MAX_PAGES pages is a PagingError, not an endless loop). ``params``: what every page
        request sends besides ``from_token`` (default ``paging=true``)."""
        seen: set = set()
        page = first
        for _ in range(_MAX_PAGES):
            items = page.get("entries")
            if not isinstance(items, list):
                raise RemoteError("unexpected listing page format", url=url)
            yield from items
            token = page.get("next_token")
            if token is None or token == "":
                return
            token = str(token)
            if token in seen:
                raise PagingError(f"the listing of {path or '/'!r} repeats its paging token {token[:40]!r}",
                                  url=url)
            seen.add(token)
            page = self._get_json(url, "directory listing page", path=path,
                                  params={**(params or {"paging": "true"}), "from_token": token})
            if not isinstance(page, dict):
                raise RemoteError("unexpected listing page format", url=url)
        raise PagingError(f"the listing of {path or '/'!r} has more than {_MAX_PAGES} pages", url=url)

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
                on_items(self._pages(url, path, first, params))
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
        return self.ref.api_url("raw", self.resolve_revision(), safe_repo_path(path))

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
                raise _Transient(str(exc), outcome=exc.outcome) from None
            with body:
                if body.status == 403 and body.url and origin_of(body.url) != api_origin:
                    # a presigned storage URL that expired (or was refused): ask the raw URL again for a new one
                    raise _Transient(f"HTTP 403 from the storage host {origin_of(body.url)} (expired link?)", 403)
                self._raise_for_status(body.status, body.headers, url, path)
                skip, want, total = self._plan_body(body, path, start, end, ranged)
                if total is not None and on_size is not None:
                    on_size(total)
                limit = want if want is not None else expected_size if not ranged else None
                if expected_size is not None and not ranged and want is not None and want != expected_size:
                    mismatches.append(want)
                    message = f"{path!r} is {want} bytes on the server, {expected_size} expected"
                    if len(mismatches) > 1:  # said twice: not a passing glitch
                        raise RemoteError(message, url=url)
                    raise _Transient(message)
                written = self._copy_body(body, fileobj, skip, limit, ranged and body.status == 200, path, url)
                if want is not None and written != want:
                    raise _Transient(f"short body: {written} of {want} bytes")
                if expected_size is not None and not ranged and written != expected_size:
                    raise _Transient(f"size mismatch: got {written} bytes, expected {expected_size}")
                return written

        return self._call(attempt, f"download of {path!r}", url)

    @staticmethod
    def _plan_body(body: Any, path: str, start: int, end: Optional[int], ranged: bool):
        """(bytes to skip, bytes to keep or None if unknown, the file's total size or None) for an answer."""
        # a compressed body's Content-Length counts compressed bytes: then only the expected size applies
        encoded = body.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
        length = None
        if not encoded and body.headers.get("Content-Length") is not None:
            try:
                length = int(body.headers["Content-Length"])
                if length < 0:
                    raise ValueError
            except ValueError:
                raise _Transient(f"invalid Content-Length {str(body.headers['Content-Length'])[:40]!r}") from None
        if not ranged:
            return 0, length, length
        if body.status == 206:
            m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", body.headers.get("Content-Range", ""))
            if not m:
                raise _Transient(f"206 without a valid Content-Range for {path!r}")
            first, last = int(m.group(1)), int(m.group(2))
            total = int(m.group(3)) if m.group(3) != "*" else None
            wanted_last = (end - 1) if end is not None else None
            if total is not None and wanted_last is not None:
                wanted_last = min(wanted_last, total - 1)
            if (first != start or last < first or (wanted_last is not None and last != wanted_last)
                    or (total is not None and last >= total) or (wanted_last is None and total is not None
                                                                  and last != total - 1)):
                raise _Transient(f"206 for bytes {first}-{last} of {path!r}, asked for {start}-"
                                 f"{'' if end is None else end - 1}")
            if length is not None and length != last - first + 1:
                raise _Transient(f"206 Content-Length {length} does not match its Content-Range {first}-{last}")
            return 0, last - first + 1, total
        # 200: the server ignored Range (allowed): keep the asked slice of the whole body
        if length is not None:
            stop = length if end is None else min(end, length)
            return start, max(0, stop - start), length
        return start, (None if end is None else end - start), None

    @staticmethod
    def _copy_body(body: Any, fileobj: BinaryIO, skip: int, limit: Optional[int], slicing: bool, path: str,
                   url: str) -> int:
        """Copy the body to ``fileobj``, dropping ``skip`` leading bytes and keeping at most ``limit``. Past the
        limit a slice of an ignored-Range answer simply ends; any other body that runs past it is refused at once
        (it cannot be the file asked for, and reading it to its end could mean gigabytes)."""
        written = 0
        try:
            for chunk in body.chunks(_CHUNK):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if limit is not None and written + len(chunk) > limit:
                    if not slicing:
                        raise RemoteError(f"the server sent more than the {limit} bytes expected for {path!r}",
                                          url=url)
                    fileobj.write(chunk[:limit - written])
                    return limit
                fileobj.write(chunk)
                written += len(chunk)
                if slicing and written == limit:
                    return written
        except TransportError as exc:
            raise _Transient(str(exc), outcome=exc.outcome) from None
        return written

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
