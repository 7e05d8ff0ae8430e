"""One repository at one pinned commit, as the upper layers see it: listings, stat, cached file access.

Both the fsspec filesystem and the hooks stand on :class:`RemoteRepo`. Everything is read at the commit sha
resolved once at first use, so nothing learnt can go stale: listings and single-path answers are kept in the
commit's :class:`~streamloader.remote.listings.ListingStore` (with a cache, ``<cache>/listings/<repo>/<sha>.sqlite``,
shared by every process and DataLoader worker on the machine: a new process lists nothing it was told before).

Offline mode (``offline=True`` or ``STREAMLOADER_OFFLINE=1``): the branch resolves to the commit this machine last
resolved it to, and only stored listings and cached files are used; anything missing is a clear error, never a
request.

The listings and single-path lookups (``listing``, ``ls``, ``info``, ``stat``, ``exists``) are mixed in from
:mod:`streamloader.remote.lookups`; the cache folders of listings and branch heads are :mod:`streamloader.remote.heads`.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import weakref
from typing import IO, Any, BinaryIO, Callable, Dict, Iterable, Optional, Sequence, Tuple

from streamloader import _forksafe, _realos
from streamloader.cache import CacheKey, FileCache
from streamloader.cache.writing import CommitBatch, DownloadClaim, HeldLocks
from streamloader.errors import IntegrityError, RemoteError, RemoteFileNotFoundError
from streamloader.remote import heads
from streamloader.remote.buckets import Buckets, is_bucket_path
from streamloader.remote.client import DagsHubClient
from streamloader.remote.entries import RemoteEntry
from streamloader.remote.listings import ListingStore
from streamloader.remote.lookups import PathLookups
from streamloader.remote.prefetch import fetch_to_cache
from streamloader.remote.urls import safe_repo_path

log = logging.getLogger(__name__)

__all__ = ["ListPrimer", "PRIME_WINDOW", "RemoteRepo", "WarmClaim"]

#: files whose listing lookups a prefetch makes together (:meth:`RemoteRepo.prime`)
PRIME_WINDOW = 256

_LIVE_REPOS: "weakref.WeakSet[RemoteRepo]" = weakref.WeakSet()


class RemoteRepo(PathLookups):
    """A pinned snapshot of a repo: ``RemoteRepo(DagsHubClient(url, branch="main"))``.

    Opening, stat-ing or testing ONE path never lists its folder (a folder may hold 540k entries): ``open`` goes
    straight to the raw download when nothing is known about the path yet, ``info`` asks the content API about that
    path alone. Folders are listed only when a listing is asked for (``listing``/``ls``), without sizes; a file's
    size is learnt when it is needed (``stat``) or downloaded. Everything learnt is kept in the commit's
    :class:`~streamloader.remote.listings.ListingStore`, shared by processes through the cache directory.
    """

    def __init__(self, client: DagsHubClient, cache: Optional[FileCache] = None, use_cache: bool = True,
                 offline: Optional[bool] = None):
        self.client = client
        self.cache = cache if cache is not None else (FileCache() if use_cache else None)
        if offline is None:
            offline = os.environ.get("STREAMLOADER_OFFLINE", "").lower() in ("1", "true", "yes")
        self.offline = offline
        if offline and self.cache is None:
            raise ValueError("offline mode needs the cache")
        self._store: Optional[ListingStore] = None
        self._missing: Dict[str, float] = {}  # path -> when it was found missing (forgotten after _MISSING_TTL)
        self._location_keys: Dict[str, CacheKey] = {}  # (sha256 per lookup shows in a warm epoch)
        self._lock = threading.Lock()
        self._dir_locks: Dict[str, threading.Lock] = {}
        self._buckets = Buckets(self)
        _LIVE_REPOS.add(self)

    def __repr__(self) -> str:
        return f"RemoteRepo({self.client!r})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_dir_locks"] = {}
        state["_missing"] = dict(self._missing)
        return state  # the listing store pickles as its file's path: a worker opens it, loading nothing

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _LIVE_REPOS.add(self)

    def _after_fork(self) -> None:
        # A lock held by another thread at fork time would stay locked forever in the child.
        self._lock = threading.Lock()
        self._dir_locks = {}

    # -- revision and the listing store ----------------------------------------------------------------------------
    def _repo_dir(self) -> Optional[str]:
        return heads.repo_dir(self.cache, self.client.ref)

    def revision(self) -> str:
        """The pinned commit sha (resolving it on first use; from the local record in offline mode)."""
        client = self.client
        if client.is_resolved:
            return client.revision
        return heads.pin_revision(self.client, self._repo_dir(), self.offline)

    @property
    def store(self) -> ListingStore:
        """What is known of this commit's folders and files (opened on first use; nothing is loaded)."""
        store = self._store
        if store is None:
            sha = self.revision()
            with self._lock:
                if self._store is None:
                    repo_dir = self._repo_dir()
                    self._store = ListingStore(os.path.join(repo_dir, sha + ".sqlite") if repo_dir else None)
                store = self._store
        return store

    @property
    def buckets(self) -> Buckets:
        """The connected storage buckets, at ``.dagshub/storage/<protocol>/<bucket>/...`` (every method of this
        class hands such paths to it; see :mod:`streamloader.remote.buckets`)."""
        return self._buckets

    # -- content --------------------------------------------------------------------------------------------------
    def cache_key(self, entry: RemoteEntry) -> CacheKey:
        """Content hash when the listing has one, else (host, repo, commit sha, path): never stale either way."""
        if is_bucket_path(entry.path):
            return self._buckets.cache_key(entry)
        if entry.hash:
            return CacheKey.from_hash(entry.versioning, entry.hash, scope=self.client.ref.url)
        return self._location_key(entry.path)

    def _location_key(self, path: str) -> CacheKey:
        keys = self._location_keys
        key = keys.get(path)
        if key is None:
            ref = self.client.ref
            key = CacheKey.from_location(ref.host, ref.owner, ref.repo, self.revision(), path)
            if len(keys) >= 1 << 16:
                keys.clear()
            keys[path] = key
        return key

    def _known(self, path: str, hint: bool = False) -> Optional[RemoteEntry]:
        """What the store knows of ``path`` without asking the server: its entry, or None when nothing is known
        (then a download finds out). FileNotFoundError when it is known to be missing. ``hint``: a first look,
        repeated under the path's lock before a download (see ListingStore.entry)."""
        entry = self.store.entry(path, hint=hint)
        if entry is None and self._proven_missing(path):
            raise RemoteFileNotFoundError(path)
        return entry

    def _cached_file(self, path: str, entry: Optional[RemoteEntry]) -> Optional[str]:
        """The cached copy of ``path``: under its content key, or under its location key (downloaded before its
        hash was known)."""
        if self.cache is None:
            return None
        size = entry.size if entry is not None else None
        content = self.cache_key(entry) if entry is not None and entry.hash else None
        if content is not None:
            found = self.cache.get(content, size)
            if found is not None:
                return found
        # (stored under its location before its hash was known: it must hash as that, now it is)
        return self.cache.get(self._location_key(path), size, content=content)

    def _target(self, path: str, hint: bool = False) -> Tuple[Optional[RemoteEntry], CacheKey]:
        """The entry known of ``path`` and the cache key it is (or will be) stored under; ``hint`` for a first look
        that only picks where to look in the cache (a cold read looks again under the path's lock)."""
        path = safe_repo_path(path)
        entry = self._known(path, hint)
        if entry is not None and entry.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)
        return entry, (self.cache_key(entry) if entry is not None else self._location_key(path))

    def _fill(self, path: str, entry: Optional[RemoteEntry]) -> Callable[[BinaryIO], None]:
        def fill(f: BinaryIO) -> None:
            if self.offline:
                raise RemoteError(f"offline mode: {path!r} is not in the cache")
            try:
                self.client.download(path, f, expected_size=entry.size if entry is not None else None)
            except FileNotFoundError:
                if entry is None:
                    self._explain_missing(path)
                raise
            # The size is not written to the listing store here: the cached copy tells it (see info/stat), and a
            # store write per download would make 4 prefetch processes x 32 threads queue on SQLite's write lock.
        return fill

    def _through_cache(self, path: str, use: Callable[[CacheKey, Callable[[BinaryIO], None], Optional[int]], Any]) -> Any:
        """``use(key, fill, size)`` with the cache key that holds (or will hold) ``path``.

        A file is stored under its content hash when that is known, else under its location (host, repo, commit,
        path) — so processes that know different things about one path could pick different keys. A cold read
        therefore takes the path's own lock first (threads and processes), then looks again under both keys
        (waiting for a commit under way): one download per path, whoever asks.
        """
        path = safe_repo_path(path)
        entry, key = self._target(path, hint=True)
        found = self._cached_key(path, entry, key, settled=False)
        if found is not None:
            return use(found, self._fill(path, entry), entry.size if entry else None)
        cache = self.cache
        assert cache is not None
        with cache.locked(CacheKey("fetch", self._location_key(path).digest)):
            entry, key = self._target(path)  # another process may have learnt the hash meanwhile
            found = self._cached_key(path, entry, key, settled=True) or key
            return use(found, self._fill(path, entry), entry.size if entry else None)

    def _cached_key(self, path: str, entry: Optional[RemoteEntry], key: CacheKey, settled: bool) -> Optional[CacheKey]:
        cache = self.cache
        assert cache is not None
        size = entry.size if entry is not None else None
        location = self._location_key(path)
        for candidate in (key, location) if key != location else (key,):
            # the key about to be downloaded into needs no wait here: fetch/open re-check it under its own lock
            if settled and candidate != key and cache.get_settled(candidate) is None:
                continue
            # a copy of another size is corrupt: dropped, not used; so is a location's copy that does not hash as
            # the content key now known
            if cache.get(candidate, size, content=key if candidate != key else None) is not None:
                return candidate
        return None

    def _explain_missing(self, path: str) -> None:
        """A raw download of an unknown path found nothing: a folder (IsADirectoryError), else missing."""
        probed = self._probe(path)
        if probed is not None and probed.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)
        if probed is None:
            self._note_missing(path)

    def local_path(self, path: str) -> str:
        """Download ``path`` into the cache if needed and return the cached file's local path."""
        if self.cache is None:
            raise RuntimeError("this RemoteRepo has no cache (use_cache=False)")
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.local_path(path)
        return self._through_cache(path, self.cache.fetch)

    def warm(self, path: str) -> Tuple[int, bool]:
        """Bring ``path`` into the cache without waiting for the disk (what a prefetch does): ``(its size, whether it
        was cached already)``. Same keys, locks and checks as :meth:`local_path`; a new entry's commit may still be
        under way in the background when this returns (``self.cache.flush()`` waits for it)."""
        if self.cache is None:
            raise RuntimeError("this RemoteRepo has no cache (use_cache=False)")
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            local = self._buckets.cached_path(path)
            cached = local is not None
            local = local or self._buckets.local_path(path)
            return _size_of(local), cached
        cache = self.cache
        entry, key = self._target(path, hint=True)
        found = self._cached_key(path, entry, key, settled=False)
        if found is not None:
            size, cached = cache.warm(found, self._fill(path, entry), entry.size if entry else None)
            return size, cached
        with cache.locked(CacheKey("fetch", self._location_key(path).digest)):
            known = self.store.entry(path)  # another process may have learnt the hash meanwhile
            if known is not None and not known.is_dir:
                entry, key = known, self.cache_key(known)
            found = self._cached_key(path, entry, key, settled=True)
            size, cached = cache.warm(found or key, self._fill(path, entry), entry.size if entry else None,
                                      looked=found is None)
            return size, cached and found is not None

    def prime(self, paths: Sequence[str]) -> None:
        """Look up what the listing store knows of ``paths`` in a few queries, ahead of the :meth:`try_warm` or
        :meth:`warm` of each (a prefetch primes its list in windows): one query per folder and 500 files instead
        of one per file. Only a hint: what another process stores meanwhile is still seen by the look those
        calls take under the file's lock. Paths that are malformed or in a bucket are left to those calls."""
        wanted = []
        for path in paths:
            try:
                path = safe_repo_path(path)
            except ValueError:
                continue
            if not self._buckets.handles(path):
                wanted.append(path)
        if wanted:
            self.store.prime(wanted)

    def primer(self, paths: Sequence[str]) -> "ListPrimer":
        """A :class:`ListPrimer` of ``paths`` for this repo (what a prefetch engine calls per file it takes)."""
        return ListPrimer(self, paths)

    def try_warm(self, path: str) -> Tuple[str, Any]:
        """The first half of :meth:`warm`, without waiting (what an event loop's prefetch calls): ``("cached",
        size)``; ``("claimed", WarmClaim)``: this process may download ``path`` now (the claim holds the locks
        :meth:`warm` would take, names the URL and the size expected, and its ``store(fill)`` ends the download);
        ``("busy", None)``: another thread or process holds a lock of it (downloading it, most likely: ask again
        later, or let :meth:`warm` wait); or ``("other", None)``: only :meth:`warm` can do this one (a bucket
        path; offline; no cache; a folder or a missing path, which warm reports)."""
        cache = self.cache
        if cache is None or self.offline:
            return "other", None
        try:
            path = safe_repo_path(path)
            if self._buckets.handles(path):
                return "other", None
            entry, key = self._target(path, hint=True)
        except (OSError, ValueError):
            return "other", None
        found = self._cached_key(path, entry, key, settled=False)
        if found is not None:
            try:
                return "cached", _realos.stat(cache.path_for(found)).st_size
            except FileNotFoundError:  # evicted just now
                return "other", None
        location = self._location_key(path)
        fetch = cache.try_lock(CacheKey("fetch", location.digest))
        if fetch is None:
            return "busy", None
        try:
            if entry is None or not entry.hash:
                known = self.store.entry(path)  # another process may have learnt the hash meanwhile
                if known is not None and not known.is_dir:
                    entry, key = known, self.cache_key(known)
            size = entry.size if entry is not None else None
            if key != location:  # stored under its location by a process that did not know the hash?
                other = cache.try_lock(location)
                if other is None:
                    fetch.release()
                    return "busy", None
                other.release()
                if cache.get(location, size) is not None:
                    fetch.release()
                    return "other", None
            url = self.client.raw_url(path)
            state, claim = cache.try_claim(key, size)
        except BaseException:
            fetch.release()
            raise
        if claim is None:
            fetch.release()
            if state == "cached":
                try:
                    return "cached", _realos.stat(cache.path_for(key)).st_size
                except FileNotFoundError:
                    pass
            return ("busy" if state == "busy" else "other"), None
        return "claimed", WarmClaim(path, url, size, claim, fetch)

    def cached_path(self, path: str) -> Optional[str]:
        """The cached file's path if ``path`` is already in the cache (no download, no request), else None."""
        if self.cache is None:
            return None
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.cached_path(path)
        entry = self._known(path)
        if entry is not None and entry.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)
        return self._cached_file(path, entry)

    def cached_copy(self, entry: RemoteEntry) -> Optional[str]:
        """:meth:`cached_path` for an entry the caller has from a listing (no store lookup): the cached file's
        path, checked against the entry's size like every cache lookup, or None."""
        if self.cache is None or entry.is_dir:
            return None
        if self._buckets.handles(entry.path):
            return self._buckets.cached_path(entry.path)
        return self._cached_file(entry.path, entry)

    def open(self, path: str, opener: Optional[Callable[[str], IO]] = None) -> IO:
        """An open file with the whole content of ``path`` through the cache (binary; ``opener(local_path)``
        opens it otherwise). Without a cache: an in-memory binary file (``opener`` is not allowed then)."""
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.open(path, opener)
        if self.cache is None:
            if opener is not None:
                raise RuntimeError("this RemoteRepo has no cache (use_cache=False): it cannot open local files")
            path = safe_repo_path(path)
            entry, key = self._target(path)
            return io.BytesIO(self._read_verified(path, entry, key))
        cache = self.cache
        return self._through_cache(path, lambda key, fill, size: cache.open(key, fill, size, opener))

    def _read_verified(self, path: str, entry: Optional[RemoteEntry], key: CacheKey) -> bytes:
        """The whole file in memory, checked like a cached download (size and content hash)."""
        buf = io.BytesIO()
        self._fill(path, entry)(buf)
        data = buf.getvalue()
        verifier = key.hasher()
        if verifier is not None and not verifier.verify_bytes(data):
            raise IntegrityError(f"content hash mismatch for {path!r} ({key.kind})")
        return data

    def read_bytes(self, path: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """Bytes ``[start, end)`` (whole file by default); served from the cache when the file is there."""
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.read_bytes(path, start, end)
        if start is None and end is None:
            with self.open(path) as f:
                return f.read()
        entry, _key = self._target(path, hint=True)  # (not cached: the range is read remotely, whatever the key)
        local = self._cached_file(path, entry)
        if local is not None:
            try:
                with open(local, "rb") as f:
                    if start:
                        f.seek(start)
                    return f.read(-1 if end is None else max(0, end - (start or 0)))
            except FileNotFoundError:  # evicted since: read the range remotely instead
                pass
        return self.client.read_bytes(path, start, end)

    def prefetch(self, paths: Iterable[str], max_concurrency: Optional[int] = None, progress: bool = True,
                 on_error: str = "raise", processes: Optional[int] = None, wait: bool = True) -> Any:
        """Warm the cache for many files concurrently, with a progress bar; returns a PrefetchResult.

        ``on_error="raise"`` raises the first failure after the others finish; ``"skip"`` records failures in the
        result (and logs them) and carries on. ``max_concurrency``: at most that many requests in flight; None (the
        default) lets the host's limiter decide: 32 at first, more while the host keeps answering as fast (up to
        its ceiling, 256 unless ``STREAMLOADER_HOST_LIMITS`` says otherwise), fewer when it pushes back.
        The downloads run on an event loop (``STREAMLOADER_PREFETCH_ENGINE=threads``: a thread per request).
        ``processes`` spreads them over that many worker processes (the requests in flight are counted
        for all of them together): one process spends ~1 ms of CPU per small file under the
        GIL, which caps a cold epoch below what the network allows. None = 1 below
        ``PREFETCH_PROCESS_MIN_FILES`` files, else ``min(cpu_count, 4)``. ``wait=False`` returns a
        :class:`PrefetchJob` at once and downloads in the background (training starts meanwhile). Example::

            repo.prefetch([e.path for e in repo.ls("data")], max_concurrency=32, on_error="skip")
        """
        return fetch_to_cache(self, paths, max_concurrency=max_concurrency, progress=progress, on_error=on_error,
                              processes=processes, wait=wait)


class WarmClaim:
    """A download :meth:`RemoteRepo.try_warm` gave this process: GET ``url`` (``size`` bytes expected, or
    unknown), then :meth:`store` the body; or :meth:`release` it (then :meth:`RemoteRepo.warm` can do it)."""

    def __init__(self, path: str, url: str, size: Optional[int], claim: DownloadClaim, fetch: HeldLocks):
        self.path, self.url, self.size = path, url, size
        self._claim, self._fetch = claim, fetch

    def store(self, fill: Callable[[BinaryIO], None], batch: Optional[CommitBatch] = None) -> int:
        """Write, verify and queue the commit of the bytes ``fill(fileobj)`` writes, or add it to ``batch`` (see
        :meth:`~streamloader.cache.writing.DownloadClaim.store`); the size stored. Raises on a mismatch."""
        try:
            return self._claim.store(fill, batch)
        finally:
            self._fetch.release()

    def release(self) -> None:
        self._claim.release()
        self._fetch.release()


def _size_of(local: str) -> int:
    try:
        return os.stat(local).st_size
    except OSError:  # evicted already by a tight cap: the count still holds
        return 0


def _renew_locks_after_fork() -> None:
    for repo in list(_LIVE_REPOS):
        repo._after_fork()


_forksafe.register(after_in_child=_renew_locks_after_fork)


class ListPrimer:
    """:meth:`RemoteRepo.prime` of a list in windows of :data:`PRIME_WINDOW` files, each primed when the first of
    its files is taken (``took()`` once per file taken, in list order; a file taken again, put back in line, only
    moves the window on a little sooner). A priming that fails is logged and left alone: each file's own lookup
    still runs."""

    def __init__(self, repo: RemoteRepo, paths: Sequence[str]):
        self.repo, self.paths = repo, paths
        self.taken = self.primed = 0

    def took(self) -> None:
        self.taken += 1
        if self.taken <= self.primed:
            return
        window = self.paths[self.primed:self.primed + PRIME_WINDOW]
        if not window:
            return
        self.primed += len(window)  # (a list that grows as it is taken, a worker's chunks: primed as it grows)
        try:
            self.repo.prime(window)
        except Exception as exc:  # noqa: BLE001 - only a hint
            log.debug("priming %d lookups failed: %r", len(window), exc)
