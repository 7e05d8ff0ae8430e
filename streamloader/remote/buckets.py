"""Connected storage buckets (S3, GCS, Azure) at ``.dagshub/storage/<protocol>/<bucket>/<key>``, the official client's
path convention (code written for it runs unchanged). RemoteRepo hands every path below ``.dagshub/storage``, and
``.dagshub`` itself while buckets are connected, to :class:`Buckets`. Buckets have no commit, so nothing learnt
about them outlives one run (a RemoteRepo and the workers it is forked or pickled to; :meth:`Buckets.refresh`
starts a new one):

- the connected buckets (``GET .../storage``, once per run) make the folders ``.dagshub``, ``.dagshub/storage`` and
  ``.dagshub/storage/<protocol>``; the root listing does not show ``.dagshub`` (a walk of the project never crawls
  buckets);
- a bucket folder is listed through ``storage/content/...``, every page (bounded; a repeating ``next_token`` is a
  PagingError), into this run's ListingStore: a temporary file shared with the run's workers;
- an object is cached under (host, repo, protocol/bucket/key, version): the version is what this run's listing says
  (hash / ETag, else modification time), checked against the listed size (a size that changed since is a
  RemoteError). A changed object gets a new key: a later run fetches it again once its listing says so, and no run
  is served another version than the one its listing names;
- ``open`` of an object whose folder this run has not listed lists nothing (a bucket folder may hold millions): one
  raw GET, cached under a key of this run only, never served to another run nor once a listing names a version.
  List the folder first (``os.listdir``, ``fs.ls``) so that later runs reuse what did not change;
- ``stat`` / ``info`` of such an object lists its folder (as the official client does: no single-object API).

Offline mode has nothing to go on (no listing survives a run): bucket paths raise RemoteError.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import posixpath
import threading
import time
import uuid
import weakref
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from streamloader import _forksafe
from streamloader.cache import CacheKey
from streamloader.cache.entrylock import EntryLock
from streamloader.errors import RemoteError, RemoteFileNotFoundError
from streamloader.remote.entries import RemoteEntry
from streamloader.remote.listings import DirListing, ListingStore

if TYPE_CHECKING:
    from streamloader.remote.repo import RemoteRepo

log = logging.getLogger(__name__)

__all__ = ["Buckets", "MOUNT", "is_bucket_path"]

MOUNT = ".dagshub/storage"  #: where the connected buckets appear inside the repository
_TOP = ".dagshub"
_MISSING_TTL = 30.0  # seconds a bucket folder found missing (404) is believed missing without asking again
_VERSION_KEYS = ("hash", "etag", "version_id", "versionId", "last_modified", "lastModified", "modified", "mtime")
_LIVE: "weakref.WeakSet[Buckets]" = weakref.WeakSet()


def is_bucket_path(path: str) -> bool:
    """Whether a (normalised) repo path lies in the bucket mount ``.dagshub/storage``."""
    return path == MOUNT or path.startswith(MOUNT + "/")


def _depth(path: str) -> int:
    """-1 for ``.dagshub``, 0 for the mount, 1 for a protocol folder, 2 for a bucket's root, 3+ inside a bucket."""
    return -1 if path == _TOP else path.count("/") - 1


def _api_path(path: str) -> str:
    """``.dagshub/storage/s3/b/k`` → ``s3/b/k``, the path the storage API takes."""
    return path[len(MOUNT) + 1:]


def _segment_ok(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name)


def _version(item: Dict[str, Any]) -> Optional[str]:
    """What a listing entry says about the object's version: its hash / ETag, else its modification time."""
    for name in _VERSION_KEYS:
        value = item.get(name)
        if value not in (None, "", 0):
            text = str(value).strip().strip('"')[:200]  # an ETag may come quoted
            return text if name == "hash" else f"{name}:{text}"
    return None


def _size(item: Dict[str, Any]) -> Optional[int]:
    size = item.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return None  # 0: unknown (as in repo listings); nonsense: unknown too, the download says it
    return size


class Buckets:
    """The bucket side of one RemoteRepo (see module docstring): ``repo.buckets.listing(".dagshub/storage/s3/b")``.

    Every method takes a normalised repo path below ``.dagshub`` and answers like the RemoteRepo method of the same
    name. :meth:`refresh` starts a new run (the next question about a bucket asks the server again).
    """

    def __init__(self, repo: "RemoteRepo"):
        self._repo = repo
        self.run_id = uuid.uuid4().hex
        self._store: Optional[ListingStore] = None  # made on first use, or before a fork / pickling (below)
        self._missing: Dict[str, float] = {}
        self._lock = threading.Lock()
        self._dir_locks: Dict[str, threading.Lock] = {}
        _LIVE.add(self)

    def __getstate__(self) -> Dict[str, Any]:
        self.store  # noqa: B018 - made now: it pickles as its path, so spawned workers share this run's listings
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_dir_locks"] = {}
        state["_missing"] = dict(self._missing)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _LIVE.add(self)

    def _before_fork(self) -> None:
        # Made in the parent, so forked workers share it, and removed by the parent at exit (a store made in a
        # multiprocessing worker would outlive it: those end without running atexit). Only an empty folder.
        if self._store is None and self._lock.acquire(blocking=False):
            try:
                if self._store is None:
                    self._store = ListingStore(None)
            finally:
                self._lock.release()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._dir_locks = {}

    @property
    def store(self) -> ListingStore:
        """This run's bucket listings (a temporary file made on first use, removed when its process exits)."""
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    self._store = ListingStore(None)
                store = self._store
        return store

    def refresh(self) -> None:
        """Forget this run's bucket listings and start a new run: buckets are asked about again."""
        with self._lock:
            self._store, self.run_id, self._missing = None, uuid.uuid4().hex, {}

    # -- which paths are ours -------------------------------------------------------------------------------------
    def handles(self, path: str) -> bool:
        """Paths in the mount always; ``.dagshub`` itself while buckets are connected (else it is the repo's)."""
        if path == _TOP:
            return not self._repo.offline and self._connected()
        return is_bucket_path(path)

    def _online(self, path: str) -> None:
        if self._repo.offline:
            raise RemoteError(f"offline mode: {path!r} is in a connected bucket, which has no commit; bucket "
                              "listings and objects are not kept between runs")

    def _connected(self) -> bool:
        """Whether any bucket is connected (asked once per run; the answer makes the three top folders)."""
        store = self.store
        if not store.is_listed(MOUNT):
            self._online(MOUNT)
            with self._lock:
                dir_lock = self._dir_locks.setdefault(MOUNT, threading.Lock())
            with dir_lock, self._listing_lock(MOUNT):
                if not store.is_listed(MOUNT):
                    self._store_connected(store)
        return store.count(MOUNT) > 0

    def _store_connected(self, store: ListingStore) -> None:
        try:
            records = self._repo.client.storages()
        except FileNotFoundError:
            records = []
        buckets: Dict[str, List[str]] = {}
        for record in records:
            protocol, name = record.get("protocol"), record.get("name")
            if not (_segment_ok(protocol) and _segment_ok(name)):
                log.warning("leaving out a connected storage with an unusable name: %.80r/%.80r", protocol, name)
                continue
            buckets.setdefault(protocol, [])
            if name not in buckets[protocol]:
                buckets[protocol].append(name)

        def folders(parent: str, names: Iterable[str]) -> Iterator[RemoteEntry]:
            return (RemoteEntry(f"{parent}/{name}", "dir", 0, None, "bucket") for name in names)

        for protocol, names in buckets.items():
            store.put_listing(f"{MOUNT}/{protocol}", folders(f"{MOUNT}/{protocol}", names))
        if buckets:
            store.put_listing(_TOP, folders(_TOP, ["storage"]))
        store.put_listing(MOUNT, folders(MOUNT, buckets))  # last: it marks the question answered
        log.debug("%s: %d connected buckets", self._repo.client.ref, sum(len(n) for n in buckets.values()))

    # -- listings -------------------------------------------------------------------------------------------------
    def listing(self, path: str) -> DirListing:
        """A bucket folder's entries (every page, once per run); the three top folders from the connected buckets."""
        store = self.store
        if store.is_listed(path):
            return DirListing(store, path)
        if _depth(path) <= 1:
            self._connected()
            if store.is_listed(path):
                return DirListing(store, path)
            raise RemoteFileNotFoundError(path)
        known = store.entry(path)
        if known is not None and not known.is_dir:
            raise NotADirectoryError(20, "Not a directory", path)
        if self._proven_missing(path):
            raise RemoteFileNotFoundError(path)
        self._online(path)
        with self._lock:
            dir_lock = self._dir_locks.setdefault(path, threading.Lock())
        with dir_lock:  # many threads asking for one folder make one listing
            if not store.is_listed(path):
                with self._listing_lock(path):  # and so do the processes of this run
                    if not store.is_listed(path):
                        self._fetch_listing(path)
        return DirListing(store, path)

    def _listing_lock(self, path: str) -> Any:
        cache = self._repo.cache
        if cache is None:
            return contextlib.nullcontext()
        digest = hashlib.sha256(f"{self.store.path}\x00{path}".encode()).hexdigest()
        return EntryLock(os.path.join(cache.root, "locks"), "listing", digest, cache.lock_timeout)

    def _fetch_listing(self, path: str) -> None:
        store = self.store
        api = _api_path(path)
        try:
            single = self._repo.client.storage_content(api, lambda items: store.put_listing(
                path, self._entries(items, api, path)))
        except FileNotFoundError:
            self._note_missing(path)
            raise RemoteFileNotFoundError(path) from None
        if single is not None:  # the server answered a file path with the file's own record
            entry = self._entry(single, api, path, child=False)
            if entry is None or entry.is_dir:
                raise RemoteError(f"unexpected bucket listing answer for {path!r}")
            store.put_entry(entry)
            raise NotADirectoryError(20, "Not a directory", path)

    def _entries(self, items: Iterable[Any], api: str, path: str) -> Iterator[RemoteEntry]:
        for item in items:
            entry = self._entry(item, api, path, child=True)
            if entry is not None:
                yield entry

    @staticmethod
    def _entry(item: Any, api: str, path: str, child: bool) -> Optional[RemoteEntry]:
        """The entry of one listed object or folder (its ``path`` in the storage API's ``protocol/bucket/key``
        form or relative to the bucket), or None (logged) when it is not a direct child / the object asked for."""
        try:
            kind = item.get("type")
            raw = str(item["path"]).rstrip("/")
        except (AttributeError, KeyError, TypeError):
            log.warning("skipping a malformed bucket listing entry under %r", path)
            return None
        if kind not in ("file", "dir"):
            log.debug("bucket listing of %r: leaving out %.200r of type %.40r", path, raw, kind)
            return None
        in_bucket = api.split("/", 2)[2] if api.count("/") >= 2 else ""
        if not child:
            if raw not in (api, in_bucket):
                log.warning("bucket answer for %r names %.200r", path, raw)
                return None
            return RemoteEntry(path, kind, _size(item) if kind == "file" else 0, _version(item), "bucket")
        for prefix in (api + "/", in_bucket + "/" if in_bucket else ""):
            name = raw[len(prefix):] if raw.startswith(prefix) else None
            if name is not None and _segment_ok(name):
                size = _size(item) if kind == "file" else 0
                return RemoteEntry(f"{path}/{name}", kind, size, _version(item) if kind == "file" else None, "bucket")
        log.warning("skipping bucket listing entry %.200r outside folder %r", raw, path)
        return None

    def _note_missing(self, path: str) -> None:
        if len(self._missing) > 100_000:
            self._missing.clear()
        self._missing[path] = time.monotonic()

    def _proven_missing(self, path: str) -> bool:
        seen = self._missing.get(path)
        if seen is not None and time.monotonic() - seen < _MISSING_TTL:
            return True
        parent = posixpath.dirname(path)
        return self.store.is_listed(parent) and self.store.entry(path) is None

    # -- single paths ---------------------------------------------------------------------------------------------
    def info(self, path: str) -> RemoteEntry:
        """The entry of a bucket path; an unlisted one's folder is listed first (once per run)."""
        store = self.store
        entry = store.entry(path)
        if entry is not None:
            return entry
        if _depth(path) <= 1:
            self._connected()
        elif not store.is_listed(posixpath.dirname(path)):
            try:
                self.listing(posixpath.dirname(path))
            except NotADirectoryError:
                raise RemoteFileNotFoundError(path) from None
        entry = store.entry(path)
        if entry is None:
            raise RemoteFileNotFoundError(path)
        return entry

    def stat(self, path: str) -> RemoteEntry:
        """Like :meth:`info`, with an object's real size (from the cached copy, else by downloading it: the
        storage API has no single-object question)."""
        entry = self.info(path)
        if entry.is_dir or entry.size is not None:
            return entry
        local = self.cached_path(path)
        if local is not None:
            size = os.stat(local).st_size
        elif self._repo.cache is not None:
            size = os.stat(self.local_path(path)).st_size
        else:
            size = len(self.read_bytes(path))
        self.store.set_size(path, size)
        return dataclasses.replace(entry, size=size)

    # -- objects --------------------------------------------------------------------------------------------------
    def cache_key(self, entry: RemoteEntry) -> CacheKey:
        """(host, repo, protocol/bucket/key, listed version); without a version, a key of this run only."""
        ref = self._repo.client.ref
        if entry.hash:
            return CacheKey.from_location(ref.host, ref.owner, ref.repo, "bucket-object", _api_path(entry.path),
                                          entry.hash)
        return CacheKey.from_location(ref.host, ref.owner, ref.repo, "bucket-run", self.run_id, _api_path(entry.path))

    def _target(self, path: str) -> Tuple[Optional[RemoteEntry], CacheKey]:
        if _depth(path) <= 2:  # the top folders and bucket roots are folders, whatever else is known
            self.info(path)
            raise IsADirectoryError(21, "Is a directory", path)
        entry = self.store.entry(path)
        if entry is None and self._proven_missing(path):
            raise RemoteFileNotFoundError(path)
        if entry is not None and entry.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)
        return entry, self.cache_key(entry if entry is not None else RemoteEntry(path, "file", None))

    def _fill(self, path: str, entry: Optional[RemoteEntry]) -> Callable[[BinaryIO], None]:
        def fill(f: BinaryIO) -> None:
            self._online(path)
            client = self._repo.client
            try:
                got = client.download(path, f, expected_size=entry.size if entry is not None else None,
                                      url=client.storage_raw_url(_api_path(path)))
            except FileNotFoundError:
                if entry is None:
                    self._explain_missing(path)
                raise RemoteFileNotFoundError(path) from None
            if entry is None:
                self.store.put_entry(RemoteEntry(path, "file", got, None, "bucket"))
            elif entry.size is None:
                self.store.set_size(path, got)
        return fill

    def _explain_missing(self, path: str) -> None:
        """A raw GET of an unlisted path found nothing: a folder (IsADirectoryError), else missing."""
        try:
            found = self.info(path)
        except FileNotFoundError:
            return
        if found.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)

    def local_path(self, path: str) -> str:
        """Download ``path`` into the cache if needed; the cached file's local path."""
        cache = self._repo.cache
        if cache is None:
            raise RuntimeError("this RemoteRepo has no cache (use_cache=False)")
        entry, key = self._target(path)
        return cache.fetch(key, self._fill(path, entry), entry.size if entry is not None else None)

    def cached_path(self, path: str) -> Optional[str]:
        """The cached copy of ``path`` for this run's idea of it, or None (no request)."""
        cache = self._repo.cache
        if cache is None:
            return None
        entry, key = self._target(path)
        found = cache.get(key)
        if found is not None and entry is not None and entry.size is not None:
            with contextlib.suppress(OSError):
                if os.stat(found).st_size != entry.size:
                    return None
        return found

    def open(self, path: str, opener: Optional[Callable[[str], IO]] = None) -> IO:
        """The whole object through the cache (``opener(local_path)``; binary by default), or in memory."""
        cache = self._repo.cache
        entry, key = self._target(path)
        if cache is None:
            if opener is not None:
                raise RuntimeError("this RemoteRepo has no cache (use_cache=False): it cannot open local files")
            buf = io.BytesIO()
            self._fill(path, entry)(buf)
            buf.seek(0)
            return buf
        return cache.open(key, self._fill(path, entry), entry.size if entry is not None else None, opener)

    def read_bytes(self, path: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """Bytes ``[start, end)`` of an object (whole by default), from the cached copy when there is one."""
        if start is None and end is None:
            with self.open(path) as f:
                return f.read()
        local = self.cached_path(path)
        if local is not None:
            with contextlib.suppress(FileNotFoundError), open(local, "rb") as f:
                f.seek(start or 0)
                return f.read(-1 if end is None else max(0, end - (start or 0)))
        self._online(path)
        client = self._repo.client
        return client.read_bytes(path, start, end, url=client.storage_raw_url(_api_path(path)))


def _prepare_fork() -> None:
    for buckets in list(_LIVE):
        buckets._before_fork()


def _renew_locks_after_fork() -> None:
    for buckets in list(_LIVE):
        buckets._after_fork()


_forksafe.register(before=_prepare_fork, after_in_child=_renew_locks_after_fork)
