"""The write path of :class:`~streamloader.cache.store.FileCache`: download into a temp file, verify, make it
durable and rename it into place, enforcing the size cap on the way in.

:class:`CacheWriter` is a mixin of ``FileCache`` (it uses the store's layout, locks and lookups, declared below for
type checkers only); :class:`_PendingCommit` is the part of a miss that a reader need not wait for, handed to the
background :data:`~streamloader.cache.commit_queue.QUEUE`.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import threading
import time
import weakref
from typing import IO, TYPE_CHECKING, BinaryIO, Callable, Iterator, List, Optional, Set, Tuple, cast

from streamloader import _forksafe
from streamloader._files import TempFileVanished, record_size, rename_into_place, sync_files
from streamloader.cache import scan as _cachescan
from streamloader.cache.commit_queue import QUEUE, CommitTask
from streamloader.cache.entrylock import EntryLock, Timeout
from streamloader.cache.key import CacheKey
from streamloader.cache.verify import HashingWriter, Verifier
from streamloader.errors import CacheError, IntegrityError, StreamloaderError

log = logging.getLogger("streamloader.cache")

__all__ = ["CacheWriter", "CommitBatch", "DownloadClaim", "HeldLocks"]

_USAGE_RESCAN = 10.0  # seconds: how stale the shared running total of the cache size may get (see _land)


#: errors of a disk that refuses writes: full (or over quota), read-only, not ours to write
_DISK_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM")
                         if hasattr(errno, name))


class CacheWriter:
    """Storing new entries: the methods of :class:`~streamloader.cache.store.FileCache` that write."""

    #: each new object's size is noted on it (:func:`streamloader._files.record_size`) until the file system says
    #: it keeps no such notes
    record_sizes = True

    if TYPE_CHECKING:  # provided by FileCache
        root: str
        max_size: Optional[int]
        verify: object
        lock_timeout: float
        _full: bool
        _checked: Set[CacheKey]
        _usage: _cachescan.SharedUsage

        def _ensure_dirs(self) -> None: ...
        def path_for(self, key: CacheKey) -> str: ...
        def _lock_for(self, kind: str, digest: str) -> EntryLock: ...
        def _file_lock(self, key: CacheKey) -> EntryLock: ...
        def _thread_lock(self, key: CacheKey) -> threading.Lock: ...
        def _lookup(self, key: CacheKey, size: Optional[int], locked: bool) -> Optional[str]: ...
        def _lock_timeout_error(self, key: CacheKey) -> IntegrityError: ...
        def _entries(self) -> Iterator[Tuple[str, os.stat_result]]: ...
        def fetch(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int] = None) -> str: ...

    def _download_locked(self, key: CacheKey, fill: Callable[[BinaryIO], None],
                         size: Optional[int]) -> Optional["_PendingCommit"]:
        """Download ``key`` into a verified temp file under its thread and entry locks: the pending commit, which
        holds both locks until it runs, or None (locks released) when another thread or process stored it
        meanwhile."""
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
            return commit
        finally:
            if entry_lock is not None:
                entry_lock.release()
                thread_lock.release()

    def try_lock(self, key: CacheKey) -> Optional["HeldLocks"]:
        """:meth:`~streamloader.cache.store.FileCache.locked` without waiting (for an event loop): ``key``'s
        thread and entry locks, now held (``release()`` them), or None while any other thread or process holds
        them."""
        thread_lock = self._thread_lock(key)
        if not thread_lock.acquire(blocking=False):
            return None
        entry_lock = self._file_lock(key)
        try:
            taken = entry_lock.try_acquire()
        except BaseException:
            thread_lock.release()
            raise
        if not taken:
            thread_lock.release()
            return None
        return HeldLocks(entry_lock, thread_lock)

    def try_claim(self, key: CacheKey, size: Optional[int]) -> Tuple[str, Optional["DownloadClaim"]]:
        """Start a download of ``key`` without waiting (for an event loop): ``("claimed", claim)`` with the entry's
        locks held by the claim, ``("cached", None)`` when it is stored already, or ``("busy", None)`` when another
        thread or process holds its locks (most likely downloading it: :meth:`warm` waits for that)."""
        held = self.try_lock(key)
        if held is None:
            return "busy", None
        try:
            if self._lookup(key, size, True) is not None:
                held.release()
                return "cached", None
        except BaseException:
            held.release()
            raise
        return "claimed", DownloadClaim(self, key, size, held)

    def _download_and_open(self, key: CacheKey, fill: Callable[[BinaryIO], None], size: Optional[int],
                           opener: Callable[[str], IO]) -> Optional[IO]:
        commit = self._download_locked(key, fill, size)
        if commit is None:
            return None
        try:
            handle = opener(commit.tmp)
        except FileNotFoundError:
            commit.run()
            if os.path.exists(commit.tmp):
                raise
            return None  # the temp file vanished (tmp/ deleted): nothing was stored; the caller tries again
        except BaseException:
            commit.run()
            raise
        QUEUE.submit(commit)
        return handle

    def _download_and_commit(self, key: CacheKey, fill: Callable[[BinaryIO], None],
                             size: Optional[int]) -> Optional[int]:
        """Download ``key`` under its locks and queue its commit: its size, or None when another thread or process
        stored it meanwhile."""
        commit = self._download_locked(key, fill, size)
        if commit is None:
            return None
        stored = commit.raw.tell()
        QUEUE.submit(commit)
        return stored

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
                return tmp, cast(BinaryIO, io.FileIO(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"))
            except FileNotFoundError:
                self._ensure_dirs()  # deleted under a running process: make it again
            except OSError as exc:
                if exc.errno in _DISK_ERRNOS:
                    raise self._disk_error(exc) from None
                raise
        raise CacheError(f"cannot create a temp file in {os.path.dirname(tmp)}: the directory keeps disappearing")

    def _disk_error(self, exc: OSError) -> CacheError:
        """The CacheError for a write the cache's disk refused (full, read-only, not ours to write)."""
        return CacheError(f"cannot write to the cache at {self.root}: {exc.strerror or exc} (free some space, or "
                          "choose another directory: STREAMLOADER_CACHE or cache_dir=)")

    def _write_temp(self, key: CacheKey, fill: Callable[[BinaryIO], None],
                    size: Optional[int]) -> Tuple[str, BinaryIO]:
        """Download into a new temp file and verify size and hash; returns its path and still-open file."""
        verifier = key.hasher() if self.verify else None
        # a key no hash checks gets the sha256 of its bytes noted on it: what verify="full" checks it against later
        noting = Verifier("sha256", "") if self.record_sizes and key.hasher() is None else None
        tmp, raw = self._create_temp(key)
        try:
            streamed = verifier is not None and verifier.can_stream(size)
            target: BinaryIO = raw
            if streamed or noting is not None:
                target = HashingWriter(raw, verifier if streamed else noting, size)  # type: ignore[arg-type]
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
            if self.record_sizes:
                # what every later read checks the file against when no listing says its size
                self.record_sizes = record_size(raw.fileno(), got, None if noting is None else noting.hexdigest())
        except OSError as exc:
            _discard(tmp, raw)
            # the disk refusing the bytes is the cache's failure; a download's own errors (a missing file, a
            # dropped connection, a bad size) pass as they are
            if exc.errno in _DISK_ERRNOS and not isinstance(exc, StreamloaderError):
                raise self._disk_error(exc) from None
            raise
        except BaseException:
            _discard(tmp, raw)
            raise
        return tmp, raw

    def _publish(self, key: CacheKey, tmp: str, raw: BinaryIO, synced: bool = False) -> str:
        """Make a verified temp file durable (unless ``synced``: it is already) and move it into place (readers see
        all of it or nothing)."""
        final = self.path_for(key)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(raw.fileno(), 0o400)  # read-only: writing to a cached file's path cannot corrupt it
            if not synced:
                os.fsync(raw.fileno())
            if self.max_size is None:
                raw.close()
                rename_into_place(tmp, final)
            else:
                size = os.fstat(raw.fileno()).st_size
                raw.close()
                self._land(size, lambda: rename_into_place(tmp, final))
        except BaseException:
            _discard(tmp, raw)
            raise
        if self._full:
            self._checked.add(key)
        return final

    def _land(self, size: int, rename: Callable[[], None]) -> None:
        """Enforce ``max_size`` for a new ``size``-byte entry, then ``rename`` it into place, both under the lock of
        the running total every process shares (:class:`~streamloader.cache.scan.SharedUsage`; scanning costs
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


class _PendingCommit(CommitTask):
    """A verified download already handed to its reader: fsync, rename into place, then release the entry's locks.
    Several waiting in a row are made durable together (:meth:`run_batch`)."""

    batch_max = 64

    def __init__(self, cache: CacheWriter, key: CacheKey, tmp: str, raw: BinaryIO, entry_lock: EntryLock,
                 thread_lock: threading.Lock):
        self.cache, self.key, self.tmp, self.raw = cache, key, tmp, raw
        self.entry_lock, self.thread_lock = entry_lock, thread_lock

    def __repr__(self) -> str:
        return f"<cache commit {self.key.kind}/{self.key.digest} in {self.cache.root}>"

    def run(self, synced: bool = False) -> None:
        try:
            self.cache._publish(self.key, self.tmp, self.raw, synced)
        except Exception as exc:
            # The reader already has the verified bytes; only the cached copy is lost (the next read downloads it).
            log.warning("could not store cache entry %s/%s: %s", self.key.kind, self.key.digest, exc)
        finally:
            self.entry_lock.release()
            self.thread_lock.release()

    @classmethod
    def run_batch(cls, tasks: "list[CommitTask]") -> None:
        """Commit ``tasks`` with one sync for all of them (:func:`~streamloader._files.sync_files`), then rename each
        into place and release its locks; if that sync fails, each is committed on its own (``fsync`` each)."""
        commits = cast("list[_PendingCommit]", tasks)
        synced = cls.sync_batch(commits)
        for commit in commits:
            commit.run(synced)

    @staticmethod
    def sync_batch(commits: "list[_PendingCommit]") -> bool:
        """Make the files of ``commits`` durable with one sync (the part of a batch that waits for the disk);
        False when that failed (then each :meth:`run` fsyncs its own)."""
        try:
            sync_files([commit.raw.fileno() for commit in commits])
            return True
        except (OSError, ValueError) as exc:
            log.debug("one sync for %d cache entries failed (%s); syncing each", len(commits), exc)
            return False

    def abandon(self) -> None:
        # In a forked child: close the inherited copies of the fds (never unlock: the lock is the parent's).
        self.entry_lock.forget()
        _close_quietly(self.raw)


class CommitBatch:
    """Commits of verified downloads that their owner runs itself, together (one sync for all, then each renamed
    into place and its locks released): for a thread that lands many files in a row, an event loop's prefetch.

    Why not the background queue: its thread takes the interpreter's lock from the downloading thread for each of
    the few system calls a commit makes (measured: ~20 futex calls and as many thread switches per file). The owner
    lands the batch when it holds :attr:`max_len` commits, when its oldest commit is :attr:`max_age` seconds old
    (:meth:`due`), and when it ends: :meth:`run` here and now, or :meth:`take` the commits, :meth:`sync` them in
    another thread (the one step that waits for the disk), then :meth:`finish` them. A commit not finished yet
    holds its entry's locks (readers of it wait, as they do for a download). A forked child drops the commits its
    batches held (their files and locks stay the parent's)."""

    def __init__(self, max_len: int = 32, max_age: float = 0.02):
        self.max_len, self.max_age = max_len, max_age
        self._commits: List[_PendingCommit] = []
        self._taken: List[List[_PendingCommit]] = []  # handed over by take(), not finished yet (a fork drops them)
        self._since = 0.0
        _LIVE_BATCHES.add(self)

    def __len__(self) -> int:
        return len(self._commits)

    def add(self, commit: "_PendingCommit") -> None:
        """Add ``commit`` (its owner then runs the batch if it holds :attr:`max_len` commits)."""
        if not self._commits:
            self._since = time.monotonic()
        self._commits.append(commit)

    def due(self) -> bool:
        """Whether the oldest commit waiting has waited :attr:`max_age` seconds."""
        return bool(self._commits) and time.monotonic() - self._since >= self.max_age

    def run(self) -> None:
        """Commit every entry added, here and now (see :meth:`_PendingCommit.run_batch`)."""
        commits = self.take()
        self.finish(commits, self.sync(commits))  # (one file's sync is its fsync)

    def take(self) -> List["_PendingCommit"]:
        """Every commit added, handed over (the batch is empty after): :meth:`sync` them (in a thread that may
        wait for the disk), then :meth:`finish` them. Until then they hold their entries' locks."""
        commits, self._commits = self._commits, []
        if commits:
            self._taken.append(commits)
        return commits

    @staticmethod
    def sync(commits: List["_PendingCommit"]) -> bool:
        """Make ``commits``' files durable with one sync; False if that failed (or there are none)."""
        return bool(commits) and _PendingCommit.sync_batch(commits)

    def finish(self, commits: List["_PendingCommit"], synced: bool) -> None:
        """Rename each of ``commits`` (what :meth:`take` gave) into place and release its locks (each one fsynced
        first unless ``synced``); a failure is logged, never raised: the entry is then not cached, nothing else is
        lost."""
        try:
            for commit in commits:
                try:
                    commit.run(synced)
                except Exception:  # noqa: BLE001 - run() logs its own failures; this is a last resort
                    log.warning("cache commit %r failed", commit, exc_info=True)
        finally:
            self._taken = [taken for taken in self._taken if taken is not commits]

    def _abandon(self) -> None:
        commits, self._commits = self._commits, []
        taken, self._taken = self._taken, []
        for commit in commits + [one for batch in taken for one in batch]:
            commit.abandon()


_LIVE_BATCHES: "weakref.WeakSet[CommitBatch]" = weakref.WeakSet()


def _abandon_batches_in_child() -> None:
    for batch in list(_LIVE_BATCHES):
        batch._abandon()


_forksafe.register(after_in_child=_abandon_batches_in_child)


class HeldLocks:
    """A cache entry's thread and entry locks, held (see :meth:`CacheWriter.try_lock`); ``release()`` is
    idempotent."""

    __slots__ = ("entry_lock", "thread_lock")

    def __init__(self, entry_lock: EntryLock, thread_lock: threading.Lock):
        self.entry_lock: Optional[EntryLock] = entry_lock
        self.thread_lock = thread_lock

    def release(self) -> None:
        entry_lock, self.entry_lock = self.entry_lock, None
        if entry_lock is not None:
            try:
                entry_lock.release()
            finally:
                self.thread_lock.release()


class DownloadClaim:
    """The right to download one entry, held without waiting (:meth:`CacheWriter.try_claim`): the bytes are
    fetched elsewhere (an event loop), then :meth:`store` writes, verifies and queues them like :meth:`warm` does;
    :meth:`release` gives the claim up (e.g. the download failed: a waiting reader then downloads it itself)."""

    def __init__(self, cache: CacheWriter, key: CacheKey, size: Optional[int], held: HeldLocks):
        self.cache, self.key, self.size = cache, key, size
        self._held: Optional[HeldLocks] = held

    def store(self, fill: Callable[[BinaryIO], None], batch: Optional["CommitBatch"] = None) -> int:
        """``fill(fileobj)`` into a temp file, verified against the size and hash of the key, then its commit
        (fsync, rename) queued in the background, or added to ``batch`` (its owner runs it), the claim's locks
        handed to it; returns the size. On any failure nothing is stored, the locks are released and the error
        raised."""
        held = self._held
        if held is None or held.entry_lock is None:
            raise RuntimeError("this download claim was released already")
        try:
            tmp, raw = self.cache._write_temp(self.key, fill, self.size)
        except BaseException:
            self.release()
            raise
        commit = _PendingCommit(self.cache, self.key, tmp, raw, held.entry_lock, held.thread_lock)
        self._held = None  # the commit releases both locks once the entry is in place
        stored = raw.tell()
        if batch is None:
            QUEUE.submit(commit)
        else:
            batch.add(commit)
        return stored

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()
