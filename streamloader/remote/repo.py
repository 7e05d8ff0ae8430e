"""One repository at one pinned commit, as the upper layers see it: cached listings, stat, cached file access.

Both the fsspec filesystem and the hooks stand on :class:`RemoteRepo`. Listings cannot go stale because everything
is read at the commit sha resolved once at first use, so they are kept in memory and, when there is a cache, on disk
under ``<cache>/listings/<repo>/<sha>/`` — a new process reading the same commit lists nothing over the network.

Offline mode (``offline=True`` or ``STREAMLOADER_OFFLINE=1``): the branch resolves to the commit this machine last
resolved it to, and only cached listings and files are used; anything missing is a clear error, never a request.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterable, List, Optional

from streamloader._files import atomic_write
from streamloader.cache import CacheKey, FileCache
from streamloader.errors import RemoteError, RemoteFileNotFoundError
from streamloader.remote.client import DagsHubClient, RemoteEntry
from streamloader.remote.parallel import (  # noqa: F401 - PREFETCH_PROCESS_MIN_FILES, PrefetchJob re-exported
    PREFETCH_PROCESS_MIN_FILES, PrefetchJob, ProcessPrefetch, prefetch_in_threads, process_count, settle)
from streamloader.remote.urls import safe_repo_path

log = logging.getLogger(__name__)

__all__ = ["RemoteRepo", "PrefetchResult"]

_LIVE_REPOS: "weakref.WeakSet[RemoteRepo]" = weakref.WeakSet()


@dataclass
class PrefetchResult:
    """What a prefetch did: counts, bytes, wall time and the paths that failed (with their errors)."""

    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed: Dict[str, BaseException] = field(default_factory=dict)

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"{self.files} files, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s "
                f"({self.files_per_s:.0f} files/s), {len(self.failed)} failed")


class RemoteRepo:
    """A pinned snapshot of a repo: ``RemoteRepo(DagsHubClient(url, branch="main"))``."""

    def __init__(self, client: DagsHubClient, cache: Optional[FileCache] = None, use_cache: bool = True,
                 offline: Optional[bool] = None):
        self.client = client
        self.cache = cache if cache is not None else (FileCache() if use_cache else None)
        if offline is None:
            offline = os.environ.get("STREAMLOADER_OFFLINE", "").lower() in ("1", "true", "yes")
        self.offline = offline
        if offline and self.cache is None:
            raise ValueError("offline mode needs the cache")
        self._listings: Dict[str, Dict[str, RemoteEntry]] = {}
        self._missing_dirs: set = set()
        self._lock = threading.Lock()
        self._dir_locks: Dict[str, threading.Lock] = {}
        _LIVE_REPOS.add(self)

    def __repr__(self) -> str:
        return f"RemoteRepo({self.client!r})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_dir_locks"] = {}
        # With a cache, listings are persisted per commit: a spawned worker reloads what it needs from disk instead
        # of unpickling every listing (540k entries pickle to ~60 MB). Without one, ship a snapshot (dict() of a
        # dict is atomic under the GIL, so a thread adding a listing meanwhile cannot break pickling).
        state["_listings"] = {} if self.cache is not None else dict(self._listings)
        state["_missing_dirs"] = set() if self.cache is not None else set(self._missing_dirs)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _LIVE_REPOS.add(self)

    def _after_fork(self) -> None:
        # A lock held by another thread at fork time would stay locked forever in the child.
        self._lock = threading.Lock()
        self._dir_locks = {}

    # -- revision and persisted listings ---------------------------------------------------------------------------
    def _repo_dir(self) -> Optional[str]:
        if self.cache is None:
            return None
        ref = self.client.ref
        digest = hashlib.sha256(f"{ref.host}\x00{ref.owner}\x00{ref.repo}".encode()).hexdigest()[:32]
        return os.path.join(self.cache.root, "listings", digest)

    def revision(self) -> str:
        """The pinned commit sha (resolving it on first use; from the local record in offline mode)."""
        client = self.client
        if client.is_resolved:
            return client.revision
        repo_dir = self._repo_dir()
        wanted = client.requested_revision
        if repo_dir and wanted and re.fullmatch(r"[0-9a-f]{40}", wanted) and os.path.isdir(os.path.join(repo_dir, wanted)):
            client.pin(wanted)  # a commit we have listed before exists: no need to ask
        elif self.offline:
            head_file = os.path.join(repo_dir or "", "heads", _safe_name(wanted or "<default>"))
            try:
                with open(head_file, encoding="utf-8") as f:
                    client.pin(f.read().strip())
            except (OSError, ValueError):
                raise RemoteError(f"offline mode: {client.ref.url} at {wanted or 'the default branch'} was never "
                                  "resolved on this machine; run once online first") from None
        else:
            sha = client.resolve_revision()
            if repo_dir:
                atomic_write(os.path.join(repo_dir, "heads", _safe_name(wanted or "<default>")), sha.encode())
        return client.revision

    def _listing_file(self, path: str) -> Optional[str]:
        repo_dir = self._repo_dir()
        if repo_dir is None:
            return None
        return os.path.join(repo_dir, self.revision(), hashlib.sha256(path.encode()).hexdigest() + ".json")

    def _load_listing(self, path: str) -> Optional[List[RemoteEntry]]:
        file = self._listing_file(path)
        if file is None:
            return None
        try:
            with open(file, encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable listing cache %s: %s", file, exc)
            return None
        if record.get("dir") != path:
            return None
        if record.get("missing"):
            raise RemoteFileNotFoundError(path)
        return [RemoteEntry(**e) for e in record["entries"]]

    def _save_listing(self, path: str, entries: Optional[List[RemoteEntry]]) -> None:
        file = self._listing_file(path)
        if file is None:
            return
        record = {"dir": path, "missing": entries is None,
                  "entries": [e.__dict__ for e in entries] if entries is not None else []}
        atomic_write(file, json.dumps(record).encode())

    def _fetch_listing(self, path: str) -> List[RemoteEntry]:
        self.revision()
        entries = self._load_listing(path)
        if entries is not None:
            return entries
        if self.offline:
            raise RemoteError(f"offline mode: the listing of {path or '/'!r} is not cached")
        try:
            entries = self.client.list_dir(path)
        except FileNotFoundError:
            self._save_listing(path, None)
            raise
        self._save_listing(path, entries)
        return entries

    # -- listings -------------------------------------------------------------------------------------------------
    def listing(self, path: str = "") -> Dict[str, RemoteEntry]:
        """``{name: RemoteEntry}`` of a directory (cached). Missing or not a directory → FileNotFoundError."""
        path = safe_repo_path(path)
        cached = self._listings.get(path)
        if cached is not None:
            return cached
        if path in self._missing_dirs:
            raise RemoteFileNotFoundError(path)
        with self._lock:
            dir_lock = self._dir_locks.setdefault(path, threading.Lock())
        with dir_lock:  # many threads asking for one directory make one request
            cached = self._listings.get(path)
            if cached is None:
                try:
                    entries = self._fetch_listing(path)
                except FileNotFoundError:
                    self._missing_dirs.add(path)
                    raise
                cached = {e.name: e for e in entries}
                self._listings[path] = cached
        return cached

    def ls(self, path: str = "") -> List[RemoteEntry]:
        """Entries of a directory, sorted by name."""
        return [entry for _name, entry in sorted(self.listing(path).items())]

    def info(self, path: str) -> RemoteEntry:
        """The entry of a file or directory (real size). Missing → FileNotFoundError (errno ENOENT)."""
        path = safe_repo_path(path)
        if not path:
            return RemoteEntry("", "dir", 0)
        parent, name = posixpath.split(path)
        try:
            entry = self.listing(parent).get(name)
        except FileNotFoundError:
            entry = None
        if entry is None:
            raise RemoteFileNotFoundError(path)
        return entry

    def exists(self, path: str) -> bool:
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    # -- content --------------------------------------------------------------------------------------------------
    def cache_key(self, entry: RemoteEntry) -> CacheKey:
        """Content hash when the listing has one, else (host, repo, commit sha, path): never stale either way."""
        if entry.hash:
            return CacheKey.from_hash(entry.versioning, entry.hash)
        ref = self.client.ref
        return CacheKey.from_location(ref.host, ref.owner, ref.repo, self.revision(), entry.path)

    def _file_entry(self, path: str) -> RemoteEntry:
        entry = self.info(path)
        if entry.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)
        return entry

    def _fill(self, entry: RemoteEntry):
        def fill(f):
            if self.offline:
                raise RemoteError(f"offline mode: {entry.path!r} is not in the cache")
            self.client.download(entry.path, f, expected_size=entry.size)
        return fill

    def local_path(self, path: str) -> str:
        """Download ``path`` into the cache if needed and return the cached file's local path."""
        if self.cache is None:
            raise RuntimeError("this RemoteRepo has no cache (use_cache=False)")
        entry = self._file_entry(path)
        return self.cache.fetch(self.cache_key(entry), self._fill(entry), entry.size)

    def cached_path(self, path: str) -> Optional[str]:
        """The cached file's path if ``path`` is already in the cache (no download), else None."""
        if self.cache is None:
            return None
        return self.cache.get(self.cache_key(self._file_entry(path)))

    def open(self, path: str, opener: Optional[Callable[[str], IO]] = None) -> IO:
        """An open file with the whole content of ``path`` through the cache (binary; ``opener(local_path)``
        opens it otherwise). Without a cache: an in-memory binary file (``opener`` is not allowed then)."""
        entry = self._file_entry(path)
        if self.cache is None:
            if opener is not None:
                raise RuntimeError("this RemoteRepo has no cache (use_cache=False): it cannot open local files")
            import io

            return io.BytesIO(self.client.read_bytes(entry.path))
        return self.cache.open(self.cache_key(entry), self._fill(entry), entry.size, opener)

    def read_bytes(self, path: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """Bytes ``[start, end)`` (whole file by default); served from the cache when the file is there."""
        entry = self._file_entry(path)
        handle: Optional[IO[bytes]] = None
        if self.cache is not None:
            key = self.cache_key(entry)
            if start is None and end is None:
                # cache.open re-fetches if another process evicts the entry between download and open
                handle = self.cache.open(key, self._fill(entry), entry.size)
            else:
                local = self.cache.get(key)
                try:
                    handle = open(local, "rb") if local is not None else None
                except FileNotFoundError:  # evicted since get(): read the range remotely instead
                    handle = None
        if handle is not None:
            with handle as f:
                if start:
                    f.seek(start)
                return f.read(-1 if end is None else max(0, end - (start or 0)))
        return self.client.read_bytes(entry.path, start, end)

    def prefetch(self, paths: Iterable[str], max_concurrency: Optional[int] = None, progress: bool = True,
                 on_error: str = "raise", processes: Optional[int] = None, wait: bool = True) -> Any:
        """Warm the cache for many files concurrently, with a progress bar; returns a PrefetchResult.

        ``on_error="raise"`` raises the first failure after the others finish; ``"skip"`` records failures in the
        result (and logs them) and carries on. ``processes`` spreads the downloads over that many worker processes
        (``max_concurrency`` requests in flight in all): one process spends ~1 ms of CPU per small file under the
        GIL, which caps a cold epoch well below what the network allows. None = 1 below
        ``PREFETCH_PROCESS_MIN_FILES`` files, else ``min(cpu_count, 4)``. ``wait=False`` returns a
        :class:`PrefetchJob` at once and downloads in the background (training starts meanwhile). Example::

            repo.prefetch([e.path for e in repo.ls("data")], max_concurrency=32, on_error="skip")
        """
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        paths = list(dict.fromkeys(paths))
        workers = max(1, min(max_concurrency or self.client.max_concurrency, len(paths) or 1))
        n_procs = process_count(processes, len(paths), workers)
        if n_procs > 1 and self.cache is not None:
            try:
                self.revision()  # resolved once here, not once per worker process
            except Exception:  # noqa: BLE001 - every path would fail alike: let the in-process path report it
                n_procs = 1
        else:
            n_procs = 1
        result = PrefetchResult()
        started = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(paths), unit="file", desc="prefetch", leave=False)

        def record(path: str, size: int, exc: Optional[BaseException]) -> None:
            if exc is None:
                result.files += 1
                result.bytes += size
            else:
                result.failed[path] = exc
                log.warning("prefetch of %s failed: %s", path, exc)
            if bar is not None:
                bar.update(1)

        try:  # worker processes start here, in the caller's thread; the job's thread only collects their reports
            fanout = ProcessPrefetch(self, paths, workers, n_procs) if n_procs > 1 else None
        except BaseException:
            if bar is not None:
                bar.close()
            raise

        def run(cancelled: threading.Event) -> PrefetchResult:
            try:
                if fanout is not None:
                    fanout.collect(record, cancelled)
                else:
                    prefetch_in_threads(self, paths, workers, record, cancelled)
            finally:
                if bar is not None:
                    bar.close()
            result.seconds = time.perf_counter() - started
            return result

        return settle(PrefetchJob(run, on_error), wait)


def _safe_name(name: str) -> str:
    """A file name for a branch/revision name (hashed: branch names may contain '/')."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _renew_locks_after_fork() -> None:
    for repo in list(_LIVE_REPOS):
        repo._after_fork()


os.register_at_fork(after_in_child=_renew_locks_after_fork)
