"""A crash-safe, content-addressed file cache shared by threads, DataLoader workers and processes.

Layout under the root (default: ``$STREAMLOADER_CACHE`` or the platform's user cache dir / streamloader)::

    objects/<kind>/<d[:2]>/<d>            finished, verified files (mode 0400 once renamed into place)
    tmp/<kind>-<d>.<pid>.<random>.part     downloads in progress (never read; swept once nobody writes them)
    locks/entries.lock                     one byte-range lock per entry (released by the kernel if the holder
                                           dies; per-entry files locks/<d[:2]>/<kind>-<d>.lock where such locks
                                           are missing); locks/usage, locks/last-sweep: see streamloader._cachescan

Guarantees: a reader sees a whole verified file or nothing (download to a unique temp file, verify size and hash,
fsync, atomic rename); concurrent processes download an entry once (per-entry lock, re-checked after locking);
keys are content hashes or (commit sha, path), so a moved branch can never return stale bytes, and hashes the
cache cannot check are scoped to their repo (:meth:`CacheKey.from_hash`); eviction takes the entry lock and files
are opened under it, so an evicted entry never breaks a reader that already opened it. Every use checks the size
(a truncated or grown object is dropped, counted and downloaded again; ``verify="full"`` also re-hashes).

Private to the user: dirs 0700, finished objects 0400 (writing to a cached path fails instead of corrupting the
entry; unlinking needs only the directory's permission); a root others can write is tightened or refused
(:func:`streamloader._files.secure_private_dir`). Deleted directories (``tmp/``, ``locks/``, the whole root) are
made again when needed; a failure of the cache itself is a CacheError, never a FileNotFoundError ("no such file").

Usage::

    cache = FileCache()                         # or FileCache("/scratch/cache", max_size="50GB")
    key = CacheKey.from_hash("git", blob_sha1)
    path = cache.fetch(key, lambda f: client.download("data/a.jpg", f), size=1234)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import weakref
from typing import IO, BinaryIO, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from streamloader import _cachescan
from streamloader._cachekey import HEX, CacheKey, file_matches
from streamloader._entrylock import EntryLock, Timeout
from streamloader._files import TempFileVanished, makedirs_private, rename_into_place, secure_private_dir
from streamloader._offpath import QUEUE, OffPathTask
from streamloader._verify import HashingWriter
from streamloader.errors import CacheError, IntegrityError

log = logging.getLogger(__name__)

__all__ = ["CacheKey", "FileCache", "cache_info", "default_cache_dir", "parse_size", "prune"]

_TOUCH_INTERVAL = 60.0  # seconds between LRU timestamp updates of one entry
_USAGE_RESCAN = 10.0  # seconds: how stale the shared running total of the cache size may get (see _land)


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
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgtp]?)(i?)b?\s*", str(size).lower())
    if not m:
        raise ValueError(f"invalid size {size!r}; use e.g. 500MB, 10GB, 1.5TiB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgtp".index(m.group(2) or " "))


class FileCache:
    """The shared on-disk cache (see module docstring). ``max_size`` (bytes or "10GB") enables LRU eviction.

    ``verify``: True (default) checks downloads against size and hash and every use against the size; "full" also
    re-hashes an entry ("git", "md5" keys) on its first use in this process; False checks sizes only.
    ``corrupt_entries`` counts entries dropped. Starting sweeps dead temp files (at most every
    ``_cachescan.SWEEP_INTERVAL`` seconds per root).
    """

    def __init__(self, root: Optional[str] = None, max_size: Union[int, str, None] = None,
                 verify: Union[bool, str] = True, lock_timeout: float = 600.0):
        if verify not in (True, False, "full"):
            raise ValueError(f"verify must be True, False or 'full'; got {verify!r}")
        self.root = os.path.abspath(os.path.expanduser(root)) if root else default_cache_dir()
        self.max_size = parse_size(max_size)
        self.verify = verify
        self.lock_timeout = lock_timeout
        self.corrupt_entries = 0
        self._full = verify == "full"
        self._checked: Set[CacheKey] = set()  # verify="full": entries this process hashed or downloaded
        self._local_locks: Dict[str, threading.Lock] = {}
        self._local_guard = threading.Lock()
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
        state["_local_locks"] = {}
        state["_local_guard"] = state["_usage"] = None
        state["_checked"] = set()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._after_fork()
        _LIVE_CACHES.add(self)

    def _after_fork(self) -> None:
        # locks held by other threads at fork time would never be released in the child; "full" re-hashes per process
        self._local_locks = {}
        self._local_guard = threading.Lock()
        self._usage = _cachescan.SharedUsage(self.root)
        self._checked = set()

    # -- layout ---------------------------------------------------------------------------------------------------
    def _ensure_dirs(self) -> None:
        for sub in ("", "objects", "tmp", "locks"):
            makedirs_private(os.path.join(self.root, sub))

    def path_for(self, key: CacheKey) -> str:
        """Where the finished file for ``key`` lives (always inside the cache root)."""
        if not HEX.match(key.digest) or not re.fullmatch(r"[a-z0-9]+", key.kind):
            raise ValueError(f"invalid cache key {key!r}")
        return os.path.join(self.root, "objects", key.kind, key.digest[:2], key.digest)

    def _lock_for(self, kind: str, digest: str) -> EntryLock:
        return EntryLock(os.path.join(self.root, "locks"), kind, digest, self.lock_timeout)

    def _file_lock(self, key: CacheKey) -> EntryLock:
        return self._lock_for(key.kind, key.digest)

    def _thread_lock(self, key: CacheKey) -> threading.Lock:
        # the entry lock belongs to an open file, not a thread: serialize threads of one process before taking it.
        with self._local_guard:
            return self._local_locks.setdefault(f"{key.kind}/{key.digest}", threading.Lock())

    # -- reading --------------------------------------------------------------------------------------------------
    def get(self, key: CacheKey, size: Optional[int] = None) -> Optional[str]:
        """The cached file's path, or None when absent. Marks the entry recently used.

        With ``size`` (what the listing says), an entry of any other size is corrupt: it is dropped, counted in
        ``corrupt_entries`` and logged, and None returned so that the caller downloads it again. ``verify="full"``
        also re-hashes the entry on its first use in this process.
        """
        return self._lookup(key, size, False)

    def __contains__(self, key: CacheKey) -> bool:
        return os.path.exists(self.path_for(key))

    def _lookup(self, key: CacheKey, size: Optional[int], locked: bool) -> Optional[str]:
        """:meth:`get`; ``locked``: the caller holds the entry's locks (a corrupt entry is dropped without them)."""
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if (size is not None and st.st_size != size) or (self._full and key not in self._checked):
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
        if size is not None and st.st_size != size:
            return f"{st.st_size} bytes, expected {size}"
        if self._full and key not in self._checked:
            if not file_matches(key, path):
                return "content hash mismatch"
            self._checked.add(key)
        return None

    def _drop(self, key: CacheKey, path: str, st: os.stat_result, problem: str, locked: bool) -> None:
        """Remove the corrupt entry ``st`` describes, unless a fresh download replaced it meanwhile."""
        if not locked:
            with self.locked(key):
                return self._drop(key, path, st, problem, True)
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                return
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

    def _download_and_open(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int],
                           opener: Callable[[str], IO]) -> Optional[IO]:
        thread_lock = self._thread_lock(key)
        thread_lock.acquire()
        entry_lock: Optional[EntryLock] = self._file_lock(key)
        try:
            try:
                entry_lock.acquire()
            except Timeout:
                raise self._lock_timeout_error(key) from None
            if self._lookup(key, size, True) is not None:
                return None
            tmp, raw = self._write_temp(key, fill, size)
            commit = _PendingCommit(self, key, tmp, raw, entry_lock, thread_lock)
            entry_lock = None  # the commit releases both locks once the entry is in place
            try:
                handle = opener(tmp)
            except FileNotFoundError:
                commit.run()
                if os.path.exists(tmp):
                    raise
                return None  # the temp file vanished (tmp/ deleted): nothing was stored; the caller tries again
            except BaseException:
                commit.run()
                raise
            QUEUE.submit(commit)
            return handle
        finally:
            if entry_lock is not None:
                entry_lock.release()
                thread_lock.release()

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

    def warm(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int] = None) -> Tuple[int, bool]:
        """Make sure ``key`` is cached, like :meth:`fetch`, without waiting for the disk: ``(its size, whether it was
        there already)``. A new entry is verified before this returns; making it durable (``fsync``) and renaming it
        into place is left to a background thread (the entry's locks stay held until then, so every other thread
        and process that asks for it waits and never downloads it twice). :meth:`flush` waits for those commits.
        What a prefetch uses: it needs no path, and ``fsync`` costs ~0.3-3 ms per file."""
        for _ in range(3):
            path = self.get(key, size)
            if path is not None:
                try:
                    return os.stat(path).st_size, True
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

    def _download_and_commit(self, key: CacheKey, fill: Callable[[BinaryIO], None],
                             size: Optional[int]) -> Optional[int]:
        """Download ``key`` under its locks and queue its commit: its size, or None when another thread or process
        stored it meanwhile."""
        thread_lock = self._thread_lock(key)
        thread_lock.acquire()
        entry_lock: Optional[EntryLock] = self._file_lock(key)
        try:
            try:
                entry_lock.acquire()
            except Timeout:
                raise self._lock_timeout_error(key) from None
            if self._lookup(key, size, True) is not None:
                return None
            tmp, raw = self._write_temp(key, fill, size)
            stored = raw.tell()
            commit = _PendingCommit(self, key, tmp, raw, entry_lock, thread_lock)
            entry_lock = None  # the commit releases both locks once the entry is in place
            QUEUE.submit(commit)
            return stored
        finally:
            if entry_lock is not None:
                entry_lock.release()
                thread_lock.release()

    def _lock_timeout_error(self, key: CacheKey) -> IntegrityError:
        return IntegrityError(f"timed out after {self.lock_timeout}s waiting for another process to download "
                              f"cache entry {key.digest}")

    def _store(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int]) -> str:
        try:
            return self._publish(key, *self._write_temp(key, fill, size))
        except TempFileVanished:  # tmp/ was deleted under the download: once more, then it is a CacheError
            self._ensure_dirs()
            return self._publish(key, *self._write_temp(key, fill, size))

    def _create_temp(self, key: CacheKey) -> Tuple[str, BinaryIO]:
        tmp = os.path.join(self.root, "tmp", _cachescan.temp_name(key.kind, key.digest))
        for _attempt in range(2):
            try:
                # unbuffered: downloads write whole chunks (a buffer would copy them, and ask isatty)
                return tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb", buffering=0)
            except FileNotFoundError:
                self._ensure_dirs()  # deleted under a running process: make it again
        raise CacheError(f"cannot create a temp file in {os.path.dirname(tmp)}: the directory keeps disappearing")

    def _write_temp(self, key: CacheKey, fill: Callable[[BinaryIO], None],
                    size: Optional[int]) -> Tuple[str, BinaryIO]:
        """Download into a new temp file and verify size and hash; returns its path and still-open file."""
        verifier = key.hasher() if self.verify else None
        tmp, raw = self._create_temp(key)
        try:
            streamed = verifier is not None and verifier.can_stream(size)
            target: BinaryIO = HashingWriter(raw, verifier, size) if streamed else raw  # type: ignore[arg-type]
            fill(target)
            raw.flush()
            got = raw.tell()
            if size is not None and got != size:
                raise IntegrityError(f"downloaded {got} bytes, expected {size} (cache entry {key.digest})")
            try:
                matches = verifier is None or verifier.verify(tmp, streamed)
            except FileNotFoundError:  # it re-reads the temp file, which tmp/ being deleted took away
                raise TempFileVanished(f"the temp file of cache entry {key.digest} vanished ({tmp})") from None
            if not matches:
                raise IntegrityError(f"content hash mismatch for cache entry {key.digest} ({key.kind})")
        except BaseException:
            _discard(tmp, raw)
            raise
        return tmp, raw

    def _publish(self, key: CacheKey, tmp: str, raw: BinaryIO) -> str:
        """Make a verified temp file durable and move it into place (readers see all of it or nothing)."""
        final = self.path_for(key)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(raw.fileno(), 0o400)  # read-only: writing to a cached file's path cannot corrupt it
            os.fsync(raw.fileno())
            size = os.fstat(raw.fileno()).st_size
            raw.close()
            if self.max_size is None:
                rename_into_place(tmp, final)
            else:
                self._land(size, lambda: rename_into_place(tmp, final))
        except BaseException:
            _discard(tmp, raw)
            raise
        if self._full:
            self._checked.add(key)
        return final

    def _land(self, size: int, rename: Callable[[], None]) -> None:
        """Enforce ``max_size`` for a new ``size``-byte entry, then ``rename`` it into place, both under the lock of
        the running total every process shares (:class:`~streamloader._cachescan.SharedUsage`; scanning costs
        ~3 us per entry, 1.5 s for 500k files, so the cache is scanned only when the total would pass the cap or
        the last scan is ``_USAGE_RESCAN`` seconds old). The new entry then finds the cache at most 90% full."""
        cap = self.max_size
        assert cap is not None

        def scan() -> int:
            entries = list(self._entries())
            total = sum(st.st_size for _p, st in entries)
            target = int(cap * 0.9) - size
            return _cachescan.evict(entries, total, target, self._lock_for)[1] if total > target else total

        self._usage.add(size, cap, _USAGE_RESCAN, scan, self.lock_timeout, rename)

    def put_file(self, key: CacheKey, src_path: str) -> str:
        """Copy a local file into the cache under ``key`` (verified like a download)."""
        import shutil

        def fill(f: BinaryIO) -> None:
            with open(src_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        return self.fetch(key, fill, os.path.getsize(src_path))

    # -- maintenance ----------------------------------------------------------------------------------------------
    def _entries(self) -> Iterator[Tuple[str, os.stat_result]]:
        return _cachescan.scan_objects(self.root)

    def info(self) -> Dict[str, object]:
        """``{"root", "files", "bytes", "max_size", "temp_files", "total_files", "total_bytes", "parts", ...}``:
        ``files``/``bytes`` count finished entries, the rest every part (:mod:`streamloader.cache_report`)."""
        from streamloader.cache_report import cache_report

        self.flush()
        return dict(cache_report(self.root, by_repo=False).as_dict(), max_size=self.max_size)

    def _evict(self, entries: List[Tuple[str, os.stat_result]], total: int, target: int) -> Tuple[int, int]:
        """:func:`streamloader._cachescan.evict` with this cache's locks: (entries removed, bytes left)."""
        return _cachescan.evict(entries, total, target, self._lock_for)

    def sweep_temp(self) -> int:
        """Delete temp files that nobody writes any more (their process is gone, or their entry's lock is free).
        Returns how many were removed. Runs on start too, at most every ``_cachescan.SWEEP_INTERVAL`` seconds."""
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
        from streamloader.cache_report import clear_parts

        return sum(clear_parts(self).values())


def _open_binary(path: str) -> IO[bytes]:
    return open(path, "rb")


def _close_quietly(raw: BinaryIO) -> None:
    try:
        raw.close()
    except OSError:
        pass


def _discard(tmp: str, raw: BinaryIO) -> None:
    _close_quietly(raw)
    try:
        os.unlink(tmp)
    except OSError:
        pass


class _PendingCommit(OffPathTask):
    """A verified download already handed to its reader: fsync, rename into place, then release the entry's locks."""

    def __init__(self, cache: FileCache, key: CacheKey, tmp: str, raw: BinaryIO, entry_lock: EntryLock,
                 thread_lock: threading.Lock):
        self.cache, self.key, self.tmp, self.raw = cache, key, tmp, raw
        self.entry_lock, self.thread_lock = entry_lock, thread_lock

    def __repr__(self) -> str:
        return f"<cache commit {self.key.kind}/{self.key.digest} in {self.cache.root}>"

    def run(self) -> None:
        try:
            self.cache._publish(self.key, self.tmp, self.raw)
        except Exception as exc:
            # The reader already has the verified bytes; only the cached copy is lost (the next read downloads it).
            log.warning("could not store cache entry %s/%s: %s", self.key.kind, self.key.digest, exc)
        finally:
            self.entry_lock.release()
            self.thread_lock.release()

    def abandon(self) -> None:
        # In a forked child: close the inherited copies of the fds (never unlock: the lock is the parent's).
        self.entry_lock.forget()
        _close_quietly(self.raw)


_LIVE_CACHES: "weakref.WeakSet[FileCache]" = weakref.WeakSet()


def _renew_locks_after_fork() -> None:
    for cache in list(_LIVE_CACHES):
        cache._after_fork()


os.register_at_fork(after_in_child=_renew_locks_after_fork)


def cache_info(cache_dir: Optional[str] = None) -> Dict[str, object]:
    """Summary of the cache at ``cache_dir`` (default cache dir), as :meth:`FileCache.info`; creates nothing."""
    from streamloader.cache_report import cache_report

    QUEUE.drain()
    return dict(cache_report(cache_dir, by_repo=False).as_dict(), max_size=None)


def prune(max_size: Union[int, str, None] = None, cache_dir: Optional[str] = None) -> Dict[str, int]:
    """Evict LRU entries of the cache at ``cache_dir`` until it fits ``max_size``; sweep dead temp files."""
    return FileCache(cache_dir).prune(max_size)
