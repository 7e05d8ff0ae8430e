"""The cross-process lock of one cache entry (see :class:`EntryLock`)."""
from __future__ import annotations

import errno
import hashlib
import os
import struct
import time
from typing import List, Optional, Set

from filelock import FileLock, Timeout

from streamloader._files import makedirs_private

try:
    import fcntl
except ImportError:  # Windows: every lock goes through filelock
    fcntl = None  # type: ignore[assignment]

__all__ = ["EntryLock", "NONBLOCKING", "SHARED_LOCK_FILE", "Timeout"]

SHARED_LOCK_FILE = "entries.lock"
#: whether :meth:`EntryLock.try_acquire` can take a lock here (it needs fcntl: not on Windows)
NONBLOCKING = fcntl is not None
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_OFD = getattr(fcntl, "F_OFD_SETLK", None)
_NO_OFD_DIRS: Set[str] = set()  # lock dirs where open-file-description locks failed: per-entry files there
_FORGOTTEN: List[FileLock] = []  # see EntryLock.forget


class EntryLock:
    """Exclusive lock of one entry, for threads of other processes and other processes (``with``, or
    ``acquire``/``release``). Threads of one process must serialize on their own first (FileCache does).

    On Linux it is a one-byte open-file-description lock (``F_OFD_SETLK``) at an offset derived from the entry's
    key in one shared file, ``locks/entries.lock``: no file is created per entry (a per-entry lock file costs an
    inode and ~0.1 ms to create on a journaling file system, for every file of a dataset). Like ``flock`` it
    belongs to the open file, so the kernel drops it when the holder exits or dies. Where those locks are missing
    (other systems, some network file systems) each entry gets its own lock file under ``flock``, and where even
    that fails, filelock's fallbacks on the same file. Acquiring is one ``open`` and one non-blocking lock call in
    the common, uncontended case; a wait polls from 1 ms, doubling to 50 ms (a holder elsewhere is usually
    downloading a small file that lands within milliseconds).
    """

    def __init__(self, locks_dir: str, kind: str, digest: str, timeout: float, shared_path: Optional[str] = None):
        self.locks_dir, self.timeout = locks_dir, timeout
        self._kind, self._digest = kind, digest
        # (``shared_path``: the caller's precomputed join of the two: a prefetch makes ~4 locks per file)
        self.shared_path = shared_path or os.path.join(locks_dir, SHARED_LOCK_FILE)
        self._offset = int.from_bytes(hashlib.sha1(f"{kind}/{digest}".encode()).digest()[:8], "big") >> 4
        self._fd: Optional[int] = None
        self._unlock = _flock_unlock
        self._slow: Optional[FileLock] = None

    @property
    def path(self) -> str:
        """The entry's own lock file: the fallback where open-file-description locks are missing."""
        return os.path.join(self.locks_dir, self._digest[:2], f"{self._kind}-{self._digest}.lock")

    def acquire(self, timeout: Optional[float] = None) -> None:
        """Take the lock; raise filelock.Timeout after ``timeout`` seconds (default: the cache's lock timeout)."""
        limit = self.timeout if timeout is None else timeout
        deadline, delay = time.monotonic() + limit, 0.001
        while True:
            state = self._try()
            if state == "held":
                return
            if state == "unsupported":
                break
            remaining = deadline - time.monotonic()
            if limit >= 0 and remaining <= 0:
                raise Timeout(self.path)
            time.sleep(delay if limit < 0 else min(delay, remaining))
            delay = min(delay * 2, 0.05)
        # thread_local=False: the lock object is shared by threads of this process via FileCache._thread_lock.
        makedirs_private(os.path.dirname(self.path))
        slow = FileLock(self.path, timeout=self.timeout, mode=0o600, thread_local=False)
        slow.acquire(timeout=limit)
        self._slow = slow

    def try_acquire(self) -> bool:
        """One attempt that never waits: True when the lock is now held; False when another process holds it, or
        where only filelock's fallbacks work (no ``fcntl``), which may block."""
        return self._try() == "held"

    def _try(self) -> str:
        """One non-blocking attempt: "held" (now ours), "busy" (held elsewhere) or "unsupported" (use filelock)."""
        if fcntl is None:
            return "unsupported"
        if _OFD is not None and self.locks_dir not in _NO_OFD_DIRS:
            state = self._try_lock(self.shared_path, self._ofd_lock)
            if state != "unsupported":
                self._unlock = self._ofd_unlock
                return state
            _NO_OFD_DIRS.add(self.locks_dir)
        makedirs_private(os.path.dirname(self.path))
        self._unlock = _flock_unlock
        return self._try_lock(self.path, lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))

    def _try_lock(self, path: str, lock) -> str:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:  # the lock directory was deleted under a running process: make it again
                makedirs_private(os.path.dirname(path))
                fd = os.open(path, flags, 0o600)
        except OSError:
            return "unsupported"  # let filelock report (or work around) whatever is wrong with the lock file
        try:
            lock(fd)
        except OSError as exc:
            os.close(fd)
            return "busy" if exc.errno in _BUSY else "unsupported"
        self._fd = fd
        return "held"

    def _ofd_lock(self, fd: int) -> None:
        fcntl.fcntl(fd, _OFD, _flock_struct(fcntl.F_WRLCK, self._offset))

    def _ofd_unlock(self, fd: int) -> None:
        fcntl.fcntl(fd, _OFD, _flock_struct(fcntl.F_UNLCK, self._offset))

    def release(self) -> None:
        """Release the lock (no-op when not held). Unlocks explicitly: a child forked meanwhile may share the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._unlock(fd)
            finally:
                os.close(fd)
        elif self._slow is not None:
            slow, self._slow = self._slow, None
            slow.release()

    def forget(self) -> None:
        """Close this process's copy of the lock fd without unlocking (a forked child's inherited lock: the open
        file, and so the lock, stays the parent's)."""
        fd, slow, self._fd, self._slow = self._fd, self._slow, None, None
        if fd is not None:
            os.close(fd)
        if slow is not None:
            _FORGOTTEN.append(slow)  # a FileLock unlocks when collected, which would free the parent's lock

    def __enter__(self) -> "EntryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock_unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def _flock_struct(lock_type: int, offset: int) -> bytes:
    # struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;} with the C compiler's
    # alignment (native struct mode); l_pid must be 0 for OFD locks. Zero tail: room for any trailing padding.
    return struct.pack("@hhqqi", lock_type, os.SEEK_SET, offset, 1, 0) + bytes(16)
