"""A crash-safe, content-addressed file cache shared by threads, DataLoader workers and processes.

Layout under the root (default: ``$STREAMLOADER_CACHE`` or the platform's user cache dir / streamloader)::

    objects/<kind>/<d[:2]>/<d>            finished, verified files (mode 0400 once renamed into place)
    tmp/<kind>-<d>.<pid>.<random>.part     downloads in progress (never read; swept once nobody writes them)
    locks/entries.lock                     one byte-range lock per entry (released by the kernel if the holder
                                           dies; per-entry files locks/<d[:2]>/<kind>-<d>.lock where such locks
                                           are missing); locks/usage, locks/last-sweep: see streamloader.cache.scan

Guarantees: a reader sees a whole verified file or nothing (download to a unique temp file, verify size and hash,
fsync, atomic rename); concurrent processes download an entry once (per-entry lock, re-checked after locking);
keys are content hashes or (commit sha, path), so a moved branch can never return stale bytes, and hashes the
cache cannot check are scoped to their repo (:meth:`CacheKey.from_hash`); eviction takes the entry lock and files
are opened under it, so an evicted entry never breaks a reader that already opened it. Every use checks the size
against the listing's, or where no listing says it against the size noted on the object as it was stored (an
extended attribute, :func:`streamloader._files.record_size`; on a file system without them only listed sizes are
checked): a cut, grown or replaced object is dropped, counted and downloaded again, and a symlink or folder at an
object's path is never followed (``verify="full"`` also re-hashes).

Private to the user: dirs 0700, finished objects 0400 (writing to a cached path fails instead of corrupting the
entry; unlinking needs only the directory's permission); a root others can write is tightened or refused
(:func:`streamloader._files.secure_private_dir`). Deleted directories (``tmp/``, ``locks/``, the whole root) are
made again when needed; a failure of the cache itself is a CacheError, never a FileNotFoundError ("no such file").

Writing new entries is :mod:`streamloader.cache.writing` (a mixin of :class:`FileCache`). Usage::

    cache = FileCache()                         # or FileCache("/scratch/cache", max_size="50GB")
    key = CacheKey.from_hash("git", blob_sha1)
    path = cache.fetch(key, lambda f: client.download("data/a.jpg", f), size=1234)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat as _stat
import threading
import time
import weakref
from typing import IO, BinaryIO, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from streamloader import _forksafe, _realos
from streamloader._files import TempFileVanished, makedirs_private, recorded_size, secure_private_dir
from streamloader.cache import scan as _cachescan
from streamloader.cache.commit_queue import QUEUE
from streamloader.cache.entrylock import SHARED_LOCK_FILE, EntryLock, Timeout
from streamloader.cache.key import HEX, CacheKey, file_matches
from streamloader.cache.writing import CacheWriter
from streamloader.errors import IntegrityError

log = logging.getLogger("streamloader.cache")

__all__ = ["CacheKey", "FileCache", "cache_info", "default_cache_dir", "parse_size", "prune"]

_TOUCH_INTERVAL = 60.0  # seconds between LRU timestamp updates of one entry
_KIND = re.compile(r"[a-z0-9]+")
_PATHS_MAX = 1 << 16  # entry paths a FileCache remembers (FileCache.path_for)


def default_cache_dir() -> str:
    """``$STREAMLOADER_CACHE`` or the platform user cache directory (``~/.cache/streamloader`` on Linux)."""
    env = os.environ.get("STREAMLOADER_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    import platformdirs

    return platformdirs.user_cache_dir("streamloader", appauthor=False)


def parse_size(size: Union[int, str, None]) -> Optional[int]:
    """``"10GB"`` → 10_000_000_000, ``"512MiB"`` → 536870912, ints pass through, None stays None."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgtp]?)(i?)b?\s*", str(size).lower())
    if not m:
        raise ValueError(f"invalid size {size!r}; use e.g. 500MB, 10GB, 1.5TiB or a byte count")
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** " kmgtp".index(m.group(2) or " ")
    if 0 < value < 1:
        raise ValueError(f"invalid size {size!r}: less than one byte")
    return int(value)


def _verify_from_env() -> Union[bool, str]:
    value = os.environ.get("STREAMLOADER_VERIFY", "").strip().lower()
    if value in ("", "1", "true", "yes"):
        return True
    if value == "full":
        return "full"
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"STREAMLOADER_VERIFY={value[:20]!r}: use full, 1 or 0")


class FileCache(CacheWriter):
    """The shared on-disk cache (see module docstring). ``max_size`` (bytes or "10GB") enables LRU eviction.

    ``verify``: True (default) checks downloads against size and hash and every use against the size; "full" also
    re-hashes an entry on its first use in this process (against its "git" or "md5" key, or, for a key no hash
    checks, against the sha256 noted on it as it was stored); False checks sizes only. None (the
    default): ``$STREAMLOADER_VERIFY`` (``full``, ``1``, ``0``) or True, so that "full" reaches every cache a job
    makes (file systems, hooks, DataLoader workers) with one setting.
    ``corrupt_entries`` counts entries dropped. Starting sweeps dead temp files (at most every
    ``scan.SWEEP_INTERVAL`` seconds per root).
    """

    def __init__(self, root: Optional[str] = None, max_size: Union[int, str, None] = None,
                 verify: Union[bool, str, None] = None, lock_timeout: float = 600.0):
        if verify is None:
            verify = _verify_from_env()
        if verify not in (True, False, "full"):
            raise ValueError(f"verify must be True, False or 'full'; got {verify!r}")
        self.root = os.path.abspath(os.path.expanduser(root)) if root else default_cache_dir()
        self._locks_dir = os.path.join(self.root, "locks")
        self._shared_lock_path = os.path.join(self._locks_dir, SHARED_LOCK_FILE)
        self.max_size = parse_size(max_size)
        self.verify = verify
        self.lock_timeout = lock_timeout
        self.corrupt_entries = 0
        self._full = verify == "full"
        self._checked: Set[CacheKey] = set()  # verify="full": entries this process hashed or downloaded
        self._vouched: Set[CacheKey] = set()  # entries this process found to hash as the content asked (see get)
        # threads' locks of the entries in use: a lock lives while someone holds it or waits for it (kept for good,
        # one to three per file read at ~250 bytes each, an epoch of the user's 540k files held up to 0.4 GB)
        self._local_locks: "weakref.WeakValueDictionary[str, threading.Lock]" = weakref.WeakValueDictionary()
        self._local_guard = threading.Lock()
        self._paths: Dict[CacheKey, str] = {}  # see path_for
        self._usage = _cachescan.SharedUsage(self.root)
        _LIVE_CACHES.add(self)
        makedirs_private(self.root)
        secure_private_dir(self.root)
        self._ensure_dirs()
        if _cachescan.sweep_due(self.root, _cachescan.SWEEP_INTERVAL):
            self.sweep_temp()

    def __repr__(self) -> str:
        return f"FileCache({self.root!r}, max_size={self.max_size})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local_locks"] = None
        state["_paths"] = {}
        state["_local_guard"] = state["_usage"] = None
        state["_checked"] = set()
        state["_vouched"] = set()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._after_fork()
        _LIVE_CACHES.add(self)

    def _after_fork(self) -> None:
        # locks held by other threads at fork time would never be released in the child; "full" re-hashes per process
        self._local_locks = weakref.WeakValueDictionary()
        self._local_guard = threading.Lock()
        self._usage = _cachescan.SharedUsage(self.root)
        self._checked = set()
        self._vouched = set()

    # -- layout ---------------------------------------------------------------------------------------------------
    def _ensure_dirs(self) -> None:
        for sub in ("", "objects", "tmp", "locks"):
            makedirs_private(os.path.join(self.root, sub))

    def path_for(self, key: CacheKey) -> str:
        """Where the finished file for ``key`` lives (always inside the cache root)."""
        paths = self._paths
        path = paths.get(key)
        if path is None:  # (validated and joined once per key: a prefetch asks ~4 times per file)
            if not HEX.match(key.digest) or not _KIND.fullmatch(key.kind):
                raise ValueError(f"invalid cache key {key!r}")
            path = os.path.join(self.root, "objects", key.kind, key.digest[:2], key.digest)
            if len(paths) >= _PATHS_MAX:
                paths.clear()
            paths[key] = path
        return path

    def _lock_for(self, kind: str, digest: str) -> EntryLock:
        return EntryLock(self._locks_dir, kind, digest, self.lock_timeout, self._shared_lock_path)

    def _file_lock(self, key: CacheKey) -> EntryLock:
        return self._lock_for(key.kind, key.digest)

    def _thread_lock(self, key: CacheKey) -> threading.Lock:
        # the entry lock belongs to an open file, not a thread: serialize threads of one process before taking it.
        name = f"{key.kind}/{key.digest}"
        with self._local_guard:
            lock = self._local_locks.get(name)
            if lock is None:  # (held by the caller from here: the table keeps it while anyone has it)
                lock = self._local_locks[name] = threading.Lock()
            return lock

    # -- reading --------------------------------------------------------------------------------------------------
    def get(self, key: CacheKey, size: Optional[int] = None, content: Optional[CacheKey] = None) -> Optional[str]:
        """The cached file's path, or None when absent. Marks the entry recently used.

        With ``size`` (what the listing says), an entry of any other size is corrupt: it is dropped, counted in
        ``corrupt_entries`` and logged, and None returned so that the caller downloads it again. ``verify="full"``
        also re-hashes the entry on its first use in this process. ``content``: the content key the bytes of
        ``key`` (e.g. a location key, stored before the hash was known) must hash as, once the hash is known; a
        checkable one is checked on the entry's first such use in this process (a mismatch is corrupt too).
        """
        if content is not None and (content == key or content.hasher() is None or key in self._vouched):
            content = None
        path = self._lookup(key, size, False)
        if path is not None and content is not None:
            try:
                st = _realos.lstat(path)
            except FileNotFoundError:
                return None
            if not file_matches(content, path):
                self._drop(key, path, st, f"its bytes do not hash as the listed {content.kind} {content.digest}",
                           False)
                return None
            if len(self._vouched) >= _PATHS_MAX:
                self._vouched.clear()
            self._vouched.add(key)
        return path

    def __contains__(self, key: CacheKey) -> bool:
        return os.path.exists(self.path_for(key))

    def _lookup(self, key: CacheKey, size: Optional[int], locked: bool) -> Optional[str]:
        """:meth:`get`; ``locked``: the caller holds the entry's locks (a corrupt entry is dropped without them)."""
        path = self.path_for(key)
        try:
            # the real lstat: what is on this disk (install_hooks' os.stat would also ask whether a missing path is a
            # repository's, at a few microseconds for each of the ~7 looks a cold read takes), and never through a
            # symlink planted in the cache
            st = _realos.lstat(path)
        except FileNotFoundError:
            return None
        if size is None:  # no listing says its size: check it against the size noted as it was stored
            size = recorded_size(path)
        if (size is not None and st.st_size != size) or not _stat.S_ISREG(st.st_mode) or \
                (self._full and key not in self._checked):
            problem = self._problem(key, path, st, size)
            if problem is not None:
                self._drop(key, path, st, problem, locked)
                return None
        if time.time() - st.st_mtime > _TOUCH_INTERVAL:
            try:
                os.utime(path)
            except OSError:
                pass
        return path

    def get_settled(self, key: CacheKey) -> Optional[str]:
        """Like :meth:`get`, but first waits for a download or commit of ``key`` under way in any thread or
        process (it takes the entry's locks for a moment)."""
        path = self.get(key)
        if path is not None:
            return path
        with self.locked(key):
            return self._lookup(key, None, True)

    @contextlib.contextmanager
    def locked(self, key: CacheKey) -> Iterator[None]:
        """Hold ``key``'s lock against every other thread and process (what a download of ``key`` holds)."""
        with self._thread_lock(key):
            lock = self._file_lock(key)
            try:
                lock.acquire()
            except Timeout:
                raise self._lock_timeout_error(key) from None
            try:
                yield
            finally:
                lock.release()

    def _problem(self, key: CacheKey, path: str, st: os.stat_result, size: Optional[int]) -> Optional[str]:
        """Why the entry at ``path`` cannot be served (None: it can)."""
        if not _stat.S_ISREG(st.st_mode):
            return "a symlink" if _stat.S_ISLNK(st.st_mode) else "not a regular file"
        if size is not None and st.st_size != size:
            return f"{st.st_size} bytes, expected {size}"
        if self._full and key not in self._checked:
            if not file_matches(key, path):
                return "content hash mismatch" if key.hasher() is not None else \
                    "its bytes do not hash as the sha256 noted on it as it was stored (or none is noted)"
            self._checked.add(key)
        return None

    def _drop(self, key: CacheKey, path: str, st: os.stat_result, problem: str, locked: bool) -> None:
        """Remove the corrupt entry ``st`` describes, unless a fresh download replaced it meanwhile."""
        if not locked:
            with self.locked(key):
                return self._drop(key, path, st, problem, True)
        try:
            now = _realos.lstat(path)
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                return
            if _stat.S_ISDIR(now.st_mode):  # (rmtree never follows a symlink inside it)
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return
        with self._local_guard:
            self.corrupt_entries += 1
        log.warning("dropped corrupt cache entry %s/%s (%s); it will be downloaded again", key.kind, key.digest,
                    problem)

    def open(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int] = None,
             opener: Optional[Callable[[str], IO]] = None) -> IO:
        """An open file for ``key`` (``opener(path)``, default binary read), downloading it first if needed.

        On a miss the caller reads the verified bytes at once: the new file is opened before it is made durable
        (``fsync``) and renamed into place, which a background thread finishes off the reader's path (``fsync``
        alone is ~0.8 ms per file on a local SSD, several ms on network block storage). Until then the entry's
        locks stay held, so another thread or process that asks for the same key waits for the commit and never
        downloads it twice. See :meth:`flush`.
        """
        opener = opener or _open_binary
        for _ in range(3):
            path = self.get(key, size)
            if path is None:
                try:
                    handle = self._download_and_open(key, fill, size, opener)
                except TempFileVanished:  # tmp/ deleted under the download: make it again, download again
                    self._ensure_dirs()
                    continue
                if handle is not None:
                    return handle
                continue  # stored by another process while this one waited for the lock
            try:
                return opener(path)
            except FileNotFoundError:
                continue  # evicted between get() and open by another process: fetch again
        raise IntegrityError(f"cache entry {key.digest} keeps disappearing; is the cache cap too small?")

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until entries this process downloaded through :meth:`open` are stored; False on timeout."""
        return QUEUE.drain(timeout)

    # -- writing --------------------------------------------------------------------------------------------------
    def fetch(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int] = None) -> str:
        """Return the path of ``key``, calling ``fill(fileobj)`` to produce the bytes if it is not cached yet.

        ``fill`` writes the content into the given binary file object and may be called again after a failure.
        The result is verified against ``size`` and the key's hash before it becomes visible. Exactly one caller
        (thread or process) runs ``fill`` for a key at a time; the others wait and reuse its result.
        """
        path = self.get(key, size)
        if path is not None:
            return path
        with self.locked(key):
            return self._lookup(key, size, True) or self._store(key, fill, size)

    def warm(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int] = None,
             looked: bool = False) -> Tuple[int, bool]:
        """Make sure ``key`` is cached, like :meth:`fetch`, without waiting for the disk: ``(its size, whether it was
        there already)``. A new entry is verified before this returns; making it durable (``fsync``) and renaming it
        into place is left to a background thread (the entry's locks stay held until then, so every other thread
        and process that asks for it waits and never downloads it twice). :meth:`flush` waits for those commits.
        What a prefetch uses: it needs no path, and ``fsync`` costs ~0.3-3 ms per file. ``looked``: the caller found
        no entry for ``key`` just now (the first unlocked look is skipped; the look under the entry's lock stays)."""
        for attempt in range(3):
            path = None if looked and attempt == 0 else self.get(key, size)
            if path is not None:
                try:
                    return _realos.stat(path).st_size, True
                except FileNotFoundError:
                    continue  # evicted just now: fetch it again
            try:
                stored = self._download_and_commit(key, fill, size)
            except TempFileVanished:  # tmp/ deleted under the download: make it again, download again
                self._ensure_dirs()
                continue
            if stored is not None:
                return stored, False
        raise IntegrityError(f"cache entry {key.digest} keeps disappearing; is the cache cap too small?")

    def _lock_timeout_error(self, key: CacheKey) -> IntegrityError:
        return IntegrityError(f"timed out after {self.lock_timeout}s waiting for another process to download "
                              f"cache entry {key.digest}")

    # -- maintenance ----------------------------------------------------------------------------------------------
    def _entries(self) -> Iterator[Tuple[str, os.stat_result]]:
        return _cachescan.scan_objects(self.root)

    def info(self) -> Dict[str, object]:
        """``{"root", "files", "bytes", "max_size", "temp_files", "total_files", "total_bytes", "parts", ...}``:
        ``files``/``bytes`` count finished entries, the rest every part (:mod:`streamloader.cache.report`)."""
        from streamloader.cache.report import cache_report

        self.flush()
        return dict(cache_report(self.root, by_repo=False).as_dict(), max_size=self.max_size)

    def _evict(self, entries: List[Tuple[str, os.stat_result]], total: int, target: int) -> Tuple[int, int]:
        """:func:`streamloader.cache.scan.evict` with this cache's locks: (entries removed, bytes left)."""
        return _cachescan.evict(entries, total, target, self._lock_for)

    def sweep_temp(self) -> int:
        """Delete temp files that nobody writes any more (their process is gone, or their entry's lock is free).
        Returns how many were removed. Runs on start too, at most every ``scan.SWEEP_INTERVAL`` seconds."""
        return _cachescan.sweep_temp(self.root, self._lock_for)

    def prune(self, max_size: Union[int, str, None] = None) -> Dict[str, int]:
        """Sweep dead temp files and evict least-recently-used entries until the cache fits ``max_size`` (default:
        the cache's cap; with neither, only the sweep)."""
        cap = parse_size(max_size) if max_size is not None else self.max_size
        self.flush()
        swept = self.sweep_temp()
        entries = list(self._entries())
        total = sum(st.st_size for _p, st in entries)
        removed = 0
        if cap is not None and total > cap:
            removed = _cachescan.evict(entries, total, cap, self._lock_for)[0]
        return {"removed": removed, "temp_removed": swept}

    def clear(self) -> int:
        """Remove every cached file, listing, feature vector and dead temp file (not downloads in progress)."""
        from streamloader.cache.report import clear_parts

        return sum(clear_parts(self).values())


def _open_binary(path: str) -> IO[bytes]:
    return open(path, "rb")


_LIVE_CACHES: "weakref.WeakSet[FileCache]" = weakref.WeakSet()


def _renew_locks_after_fork() -> None:
    for cache in list(_LIVE_CACHES):
        cache._after_fork()


_forksafe.register(after_in_child=_renew_locks_after_fork)


def cache_info(cache_dir: Optional[str] = None) -> Dict[str, object]:
    """Summary of the cache at ``cache_dir`` (default cache dir), as :meth:`FileCache.info`; creates nothing."""
    from streamloader.cache.report import cache_report

    QUEUE.drain()
    return dict(cache_report(cache_dir, by_repo=False).as_dict(), max_size=None)


def prune(max_size: Union[int, str, None] = None, cache_dir: Optional[str] = None) -> Dict[str, int]:
    """Evict LRU entries of the cache at ``cache_dir`` until it fits ``max_size``; sweep dead temp files."""
    return FileCache(cache_dir).prune(max_size)
