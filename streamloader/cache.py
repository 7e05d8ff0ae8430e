"""A crash-safe, content-addressed file cache shared by threads, DataLoader workers and processes.

Layout under the root (default: ``$STREAMLOADER_CACHE`` or the platform's user cache dir / streamloader)::

    objects/<kind>/<d[:2]>/<d>     finished, verified files (read-only once renamed into place)
    tmp/<d>.<pid>.<random>.part     downloads in progress (never read; swept when their process is gone)
    locks/entries.lock              one byte-range lock per entry (released by the kernel if the holder dies;
                                    per-entry files locks/<d[:2]>/<kind>-<d>.lock where such locks are missing)

Guarantees: a reader sees a whole verified file or nothing (download to a unique temp file, verify size and hash,
fsync, atomic rename); concurrent processes download an entry once (per-entry lock, re-checked after locking);
keys are content hashes or (commit sha, path), so a moved branch can never return stale bytes; eviction takes the
entry lock and files are opened under it, so an evicted entry never breaks a reader that already opened it.
Files are private to the user (dirs 0700, files 0600).

Usage::

    cache = FileCache()                         # or FileCache("/scratch/cache", max_size="50GB")
    key = CacheKey.from_hash("git", blob_sha1)
    path = cache.fetch(key, lambda f: client.download("data/a.jpg", f), size=1234)
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import IO, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

from streamloader._entrylock import EntryLock, Timeout
from streamloader._files import makedirs_private
from streamloader._offpath import QUEUE, OffPathTask
from streamloader._verify import HashingWriter, Verifier
from streamloader.errors import IntegrityError

log = logging.getLogger(__name__)

__all__ = ["CacheKey", "FileCache", "cache_info", "default_cache_dir", "parse_size", "prune"]

_HEX = re.compile(r"^[0-9a-f]+$")
_TOUCH_INTERVAL = 60.0  # seconds between LRU timestamp updates of one entry
_STALE_TMP_AGE = 3600.0  # a temp file this old is swept even if its pid looks alive (pid reuse)
_USAGE_RESCAN = 10.0  # seconds: how stale this process's running total of the cache size may get (see _maybe_evict)


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


@dataclass(frozen=True)
class CacheKey:
    """Identity of cached content: ``kind`` names how ``digest`` was made ("git" blob sha1, "md5", or "path")."""

    kind: str
    digest: str

    @classmethod
    def from_hash(cls, versioning: Optional[str], value: str) -> "CacheKey":
        """A key from a listing's content hash (git blob sha1 for "git", md5 for "dvc")."""
        value = value.lower()
        if not _HEX.match(value) or not 16 <= len(value) <= 128:
            # Unknown format: hash it so the key is still a safe file name.
            return cls("opaque", hashlib.sha256(f"{versioning}:{value}".encode()).hexdigest())
        kind = "git" if (versioning in (None, "git") and len(value) == 40) else ("md5" if len(value) == 32 else "opaque")
        return cls(kind, value)

    @classmethod
    def from_location(cls, *parts: str) -> "CacheKey":
        """A key for content known only by where it lives (e.g. host, repo, commit sha, path)."""
        return cls("path", hashlib.sha256("\x00".join(parts).encode()).hexdigest())

    def hasher(self) -> Optional["Verifier"]:
        if self.kind == "git":
            return Verifier("sha1", self.digest, git_blob=True)
        if self.kind == "md5":
            return Verifier("md5", self.digest)
        return None


class FileCache:
    """The shared on-disk cache (see module docstring). ``max_size`` (bytes or "10GB") enables LRU eviction."""

    def __init__(self, root: Optional[str] = None, max_size: Union[int, str, None] = None, verify: bool = True,
                 lock_timeout: float = 600.0):
        self.root = os.path.abspath(os.path.expanduser(root)) if root else default_cache_dir()
        self.max_size = parse_size(max_size)
        self.verify = verify
        self.lock_timeout = lock_timeout
        self._local_locks: Dict[str, threading.Lock] = {}
        self._local_guard = threading.Lock()
        self._usage: Optional[int] = None  # bytes in objects/ at the last scan, plus what this process added since
        self._usage_scanned_at = 0.0
        _LIVE_CACHES.add(self)
        self._ensure_dirs()

    def __repr__(self) -> str:
        return f"FileCache({self.root!r}, max_size={self.max_size})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local_locks"] = {}
        state["_local_guard"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local_guard = threading.Lock()
        _LIVE_CACHES.add(self)

    def _after_fork(self) -> None:
        # locks held by other threads at fork time would never be released in the child
        self._local_locks = {}
        self._local_guard = threading.Lock()

    # -- layout ---------------------------------------------------------------------------------------------------
    def _ensure_dirs(self) -> None:
        for sub in ("", "objects", "tmp", "locks"):
            makedirs_private(os.path.join(self.root, sub))

    def path_for(self, key: CacheKey) -> str:
        """Where the finished file for ``key`` lives (always inside the cache root)."""
        if not _HEX.match(key.digest) or not re.fullmatch(r"[a-z0-9]+", key.kind):
            raise ValueError(f"invalid cache key {key!r}")
        return os.path.join(self.root, "objects", key.kind, key.digest[:2], key.digest)

    def _file_lock(self, key: CacheKey) -> EntryLock:
        return EntryLock(os.path.join(self.root, "locks"), key.kind, key.digest, self.lock_timeout)

    def _thread_lock(self, key: CacheKey) -> threading.Lock:
        # the entry lock belongs to an open file, not a thread: serialize threads of one process before taking it.
        with self._local_guard:
            return self._local_locks.setdefault(f"{key.kind}/{key.digest}", threading.Lock())

    # -- reading --------------------------------------------------------------------------------------------------
    def get(self, key: CacheKey) -> Optional[str]:
        """The cached file's path, or None when absent. Marks the entry recently used."""
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
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
            return self.get(key)

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

    def __contains__(self, key: CacheKey) -> bool:
        return os.path.exists(self.path_for(key))

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
            path = self.get(key)
            if path is None:
                handle = self._download_and_open(key, fill, size, opener)
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
            if self.get(key) is not None:
                return None
            tmp, raw = self._write_temp(key, fill, size)
            commit = _PendingCommit(self, key, tmp, raw, size, entry_lock, thread_lock)
            entry_lock = None  # the commit releases both locks once the entry is in place
            try:
                handle = opener(tmp)
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
        path = self.get(key)
        if path is not None:
            return path
        stored = False
        with self._thread_lock(key):
            try:
                with self._file_lock(key):
                    path = self.get(key)
                    if path is None:
                        path, stored = self._store(key, fill, size), True
            except Timeout:
                raise self._lock_timeout_error(key) from None
        if stored and self.max_size is not None:
            self._maybe_evict(keep=path, added=_size_of(path, size))
        return path

    def _lock_timeout_error(self, key: CacheKey) -> IntegrityError:
        return IntegrityError(f"timed out after {self.lock_timeout}s waiting for another process to download "
                              f"cache entry {key.digest}")

    def _store(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int]) -> str:
        tmp, raw = self._write_temp(key, fill, size)
        return self._publish(key, tmp, raw)

    def _write_temp(self, key: CacheKey, fill: Callable[[BinaryIO], None],
                    size: Optional[int]) -> Tuple[str, BinaryIO]:
        """Download into a new temp file and verify size and hash; returns its path and still-open file."""
        tmp = os.path.join(self.root, "tmp", f"{key.digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        verifier = key.hasher() if self.verify else None
        raw = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        try:
            streamed = verifier is not None and verifier.can_stream(size)
            target: BinaryIO = HashingWriter(raw, verifier, size) if streamed else raw  # type: ignore[arg-type]
            fill(target)
            raw.flush()
            got = raw.tell()
            if size is not None and got != size:
                raise IntegrityError(f"downloaded {got} bytes, expected {size} (cache entry {key.digest})")
            if verifier is not None and not verifier.verify(tmp, streamed):
                raise IntegrityError(f"content hash mismatch for cache entry {key.digest} ({key.kind})")
        except BaseException:
            _discard(tmp, raw)
            raise
        return tmp, raw

    def _publish(self, key: CacheKey, tmp: str, raw: BinaryIO) -> str:
        """Make a verified temp file durable and move it into place (readers see all of it or nothing)."""
        final = self.path_for(key)
        try:
            os.fsync(raw.fileno())
            raw.close()
            makedirs_private(os.path.dirname(final))
            os.replace(tmp, final)
        except BaseException:
            _discard(tmp, raw)
            raise
        return final

    def put_file(self, key: CacheKey, src_path: str) -> str:
        """Copy a local file into the cache under ``key`` (verified like a download)."""
        import shutil

        def fill(f: BinaryIO) -> None:
            with open(src_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        return self.fetch(key, fill, os.path.getsize(src_path))

    # -- maintenance ----------------------------------------------------------------------------------------------
    def _entries(self) -> Iterator[Tuple[str, os.stat_result]]:
        objects = os.path.join(self.root, "objects")
        for dirpath, _dirs, files in os.walk(objects):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    yield p, os.stat(p)
                except FileNotFoundError:
                    continue

    def info(self) -> Dict[str, object]:
        """``{"root", "files", "bytes", "max_size", "temp_files", "total_files", "total_bytes", "parts", ...}``:
        ``files``/``bytes`` count finished entries, the rest every part (:mod:`streamloader.cache_report`)."""
        from streamloader.cache_report import cache_report

        self.flush()
        return dict(cache_report(self.root, by_repo=False).as_dict(), max_size=self.max_size)

    def _maybe_evict(self, keep: Optional[str] = None, added: int = 0) -> None:
        """Enforce ``max_size`` after storing ``added`` bytes (at ``keep``, which is never evicted).

        Scanning the cache costs ~3 us per entry (a 500k-file cache: 1.5 s), so it is not done per file: this
        process keeps a running total (the last scan + what it stored since) and scans again only when that total
        passes the cap or the last scan is older than ``_USAGE_RESCAN`` seconds (other processes' additions are
        seen then; they enforce the cap on their own additions too).
        """
        assert self.max_size is not None
        with self._local_guard:
            if self._usage is not None and time.monotonic() - self._usage_scanned_at < _USAGE_RESCAN:
                self._usage += added
                if self._usage <= self.max_size:
                    return
        entries = list(self._entries())
        total = sum(st.st_size for _p, st in entries)
        if total > self.max_size:
            total = self._evict(entries, total, int(self.max_size * 0.9), keep)[1]
        with self._local_guard:
            self._usage, self._usage_scanned_at = total, time.monotonic()

    def _evict(self, entries: List[Tuple[str, os.stat_result]], total: int, target: int,
               keep: Optional[str] = None) -> Tuple[int, int]:
        """Remove least recently used entries until ``total`` <= ``target``: (entries removed, bytes left)."""
        removed = 0
        for path, st in sorted(entries, key=lambda e: e[1].st_mtime):
            if total <= target:
                break
            if path == keep:
                continue
            kind = os.path.basename(os.path.dirname(os.path.dirname(path)))
            key = CacheKey(kind, os.path.basename(path))
            lock = self._file_lock(key)
            try:
                # Skip entries being downloaded right now; an already-open reader keeps its inode after unlink.
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                os.unlink(path)
                total -= st.st_size
                removed += 1
            except FileNotFoundError:
                pass
            finally:
                lock.release()
        if removed:
            log.info("evicted %d cache entries (cache now %.1f MB)", removed, total / 1e6)
        return removed, total

    def sweep_temp(self) -> int:
        """Delete temp files left by dead processes (or older than an hour). Returns how many were removed."""
        tmpdir = os.path.join(self.root, "tmp")
        removed = 0
        for name in os.listdir(tmpdir):
            p = os.path.join(tmpdir, name)
            try:
                pid = int(name.split(".")[1])
                age = time.time() - os.stat(p).st_mtime
            except (IndexError, ValueError, OSError):
                pid, age = -1, _STALE_TMP_AGE
            if pid != os.getpid() and (age >= _STALE_TMP_AGE or not _pid_alive(pid)):
                try:
                    os.unlink(p)
                    removed += 1
                except OSError:
                    pass
        return removed

    def prune(self, max_size: Union[int, str, None] = None) -> Dict[str, int]:
        """Evict least-recently-used entries until the cache fits ``max_size`` (default: the cache's cap)."""
        cap = parse_size(max_size) if max_size is not None else self.max_size
        self.flush()
        swept = self.sweep_temp()
        entries = list(self._entries())
        total = sum(st.st_size for _p, st in entries)
        removed = self._evict(entries, total, cap, None)[0] if cap is not None and total > cap else 0
        return {"removed": removed, "temp_removed": swept}

    def clear(self) -> int:
        """Remove every cached file, listing, feature vector and dead temp file (not downloads in progress)."""
        from streamloader.cache_report import clear_parts

        return sum(clear_parts(self).values())


def _size_of(path: str, known: Optional[int]) -> int:
    if known is not None:
        return known
    try:
        return os.stat(path).st_size
    except OSError:  # evicted meanwhile by another process
        return 0


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

    def __init__(self, cache: FileCache, key: CacheKey, tmp: str, raw: BinaryIO, size: Optional[int],
                 entry_lock: EntryLock, thread_lock: threading.Lock):
        self.cache, self.key, self.tmp, self.raw, self.size = cache, key, tmp, raw, size
        self.entry_lock, self.thread_lock = entry_lock, thread_lock

    def __repr__(self) -> str:
        return f"<cache commit {self.key.kind}/{self.key.digest} in {self.cache.root}>"

    def run(self) -> None:
        try:
            final = self.cache._publish(self.key, self.tmp, self.raw)
        except Exception as exc:
            # The reader already has the verified bytes; only the cached copy is lost (the next read downloads it).
            log.warning("could not store cache entry %s/%s: %s", self.key.kind, self.key.digest, exc)
            return
        finally:
            self.entry_lock.release()
            self.thread_lock.release()
        if self.cache.max_size is not None:
            self.cache._maybe_evict(keep=final, added=_size_of(final, self.size))

    def abandon(self) -> None:
        # In a forked child: close the inherited copies of the fds (never unlock: the lock is the parent's).
        self.entry_lock.forget()
        _close_quietly(self.raw)


_LIVE_CACHES: "weakref.WeakSet[FileCache]" = weakref.WeakSet()


def _renew_locks_after_fork() -> None:
    for cache in list(_LIVE_CACHES):
        cache._after_fork()


os.register_at_fork(after_in_child=_renew_locks_after_fork)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cache_info(cache_dir: Optional[str] = None) -> Dict[str, object]:
    """Summary of the cache at ``cache_dir`` (default cache dir), as :meth:`FileCache.info`; creates nothing."""
    from streamloader.cache_report import cache_report

    QUEUE.drain()
    return dict(cache_report(cache_dir, by_repo=False).as_dict(), max_size=None)


def prune(max_size: Union[int, str, None] = None, cache_dir: Optional[str] = None) -> Dict[str, int]:
    """Evict LRU entries of the cache at ``cache_dir`` until it fits ``max_size``; sweep dead temp files."""
    return FileCache(cache_dir).prune(max_size)
