"""The cross-process lock of one cache entry (see :class:`EntryLock`)."""
from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
from typing import Dict, List, Optional, Set

from filelock import FileLock, Timeout

from streamloader import _forksafe
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
_FLOCK_FDS: Set[int] = set()  # fds of the per-entry flock files this process holds (closed in a forked child)


class EntryLock:
    """Exclusive lock of one entry, for threads of other processes and other processes (``with``, or
    ``acquire``/``release``). Threads of one process must serialize on their own first (FileCache does).

    On Linux it is a one-byte open-file-description lock (``F_OFD_SETLK``) at an offset derived from the entry's
    key in one shared file, ``locks/entries.lock``: no file is created per entry (a per-entry lock file costs an
    inode and ~0.1 ms to create on a journaling file system, for every file of a dataset). A process takes all of
    its locks there through one open file of it (:class:`_SharedFile`: no ``open`` and ``close`` per lock, nor the
    walk of the file's whole lock list that each ``close`` of a locked file makes), and the set of offsets it
    holds keeps two locks of one process apart, as two open files would be. Like ``flock`` the lock belongs to the
    open file, so the kernel drops it when the holder exits or dies (a forked child closes its inherited copy: the
    parent's locks never outlive the parent). Where those locks are missing (other systems, some network file
    systems) each entry gets its own lock file under ``flock``, and where even that fails, filelock's fallbacks on
    the same file. Acquiring is one non-blocking lock call in the common, uncontended case; a wait polls from 1 ms,
    doubling to 50 ms (a holder elsewhere is usually downloading a small file that lands within milliseconds).
    """

    def __init__(self, locks_dir: str, kind: str, digest: str, timeout: float, shared_path: Optional[str] = None):
        self.locks_dir, self.timeout = locks_dir, timeout
        self._kind, self._digest = kind, digest
        # (``shared_path``: the caller's precomputed join of the two: a prefetch makes ~4 locks per file)
        self.shared_path = shared_path or os.path.join(locks_dir, SHARED_LOCK_FILE)
        self._offset = int.from_bytes(hashlib.sha1(f"{kind}/{digest}".encode()).digest()[:8], "big") >> 4
        self._shared: Optional[_SharedFile] = None  # where it is held, in the shared file
        self._fd: Optional[int] = None  # a per-entry lock file's fd (the flock fallback)...
        self._fd_pid = 0  # ... and the process that opened it
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
            shared = _SharedFile.of(self.shared_path)
            state = shared.lock(self._offset)
            if state == "held":
                self._shared = shared
            if state != "unsupported":
                return state
            _NO_OFD_DIRS.add(self.locks_dir)
        makedirs_private(os.path.dirname(self.path))
        fd = _open_lock_file(self.path)
        if fd is None:
            return "unsupported"  # let filelock report (or work around) whatever is wrong with the lock file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            return "busy" if exc.errno in _BUSY else "unsupported"
        self._fd, self._fd_pid = fd, os.getpid()
        _FLOCK_FDS.add(fd)
        return "held"

    def release(self) -> None:
        """Release the lock (no-op when not held). Unlocks explicitly: a child forked meanwhile may share the file.
        One held since before a fork is only forgotten in the child (it is the parent's)."""
        if self._shared is not None:
            shared, self._shared = self._shared, None
            shared.unlock(self._offset)
        elif self._fd is not None:
            fd, self._fd = self._fd, None
            if self._fd_pid != os.getpid():
                return  # inherited: the fork handler closed this process's copy, the lock is the parent's
            _FLOCK_FDS.discard(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        elif self._slow is not None:
            slow, self._slow = self._slow, None
            slow.release()

    def forget(self) -> None:
        """Drop this process's hold of the lock without unlocking (a forked child's inherited lock: the open
        file, and so the lock, stays the parent's). In the process that took it, that frees it, as closing its
        open file always did."""
        fd, slow, shared = self._fd, self._slow, self._shared
        self._fd, self._slow, self._shared = None, None, None
        if shared is not None:
            shared.unlock(self._offset)  # (a no-op in a forked child: the file is the parent's)
        if fd is not None and self._fd_pid == os.getpid():  # (an inherited one: the fork handler closed it)
            _FLOCK_FDS.discard(fd)
            os.close(fd)
        if slow is not None:
            _FORGOTTEN.append(slow)  # a FileLock unlocks when collected, which would free the parent's lock

    def __enter__(self) -> "EntryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _SharedFile:
    """This process's open file of one shared lock file, and the offsets it holds there (:meth:`lock`,
    :meth:`unlock`: one byte each, ``F_OFD_SETLK``). OFD locks of one open file never conflict with each other, so
    the held set makes a second lock of this process on an offset busy, as another open file's would be.

    A forked child must not use its parent's open file (its locks would be the parent's): :meth:`of` keys the
    files by process, and the child closes its inherited copies (:func:`_after_fork_in_child`)."""

    _files: Dict[str, "_SharedFile"] = {}
    _guard = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self._fd: Optional[int] = None
        self._fds: List[int] = []  # every fd opened (one of a file deleted meanwhile stays open: see _open)
        self._held: Dict[int, int] = {}  # offset -> the fd it is locked through
        self._lock = threading.Lock()  # makes check-and-lock of an offset one step for this process's threads

    @classmethod
    def of(cls, path: str) -> "_SharedFile":
        shared = cls._files.get(path)
        if shared is None or shared.pid != os.getpid():  # (a child that no fork handler reset)
            with cls._guard:
                shared = cls._files.get(path)
                if shared is None or shared.pid != os.getpid():
                    shared = cls._files[path] = cls(path)
        return shared

    def _open(self) -> Optional[int]:
        """The fd, with the file opened anew when it was deleted meanwhile (a lock in a deleted file excludes no one
        who opens the new one). Offsets still held there stay on the old file until they are released."""
        fd = self._fd
        if fd is not None:
            try:
                if os.fstat(fd).st_nlink:
                    return fd
            except OSError:
                pass
            self._fd = None
            self._close_if_unused(fd)
        fd = _open_lock_file(self.path)
        if fd is not None:
            self._fd = fd
            self._fds.append(fd)
        return fd

    def lock(self, offset: int) -> str:
        """Lock ``offset``: "held", "busy" (held by this process or another) or "unsupported" (no OFD locks, or the
        file cannot be opened)."""
        with self._lock:
            if offset in self._held:
                return "busy"
            fd = self._open()
            if fd is None:
                return "unsupported"
            try:
                fcntl.fcntl(fd, _OFD, _flock_struct(fcntl.F_WRLCK, offset))
            except OSError as exc:
                return "busy" if exc.errno in _BUSY else "unsupported"
            self._held[offset] = fd
            return "held"

    def unlock(self, offset: int) -> None:
        """Unlock ``offset`` if this process holds it here (in a forked child, the parent's: nothing to do)."""
        if self.pid != os.getpid():
            return
        with self._lock:
            fd = self._held.pop(offset, None)
            if fd is None:
                return
            fcntl.fcntl(fd, _OFD, _flock_struct(fcntl.F_UNLCK, offset))
            if fd != self._fd:  # (locked in a file deleted meanwhile)
                self._close_if_unused(fd)

    def _close_if_unused(self, fd: int) -> None:
        """Close ``fd``, an open file of a deleted lock file, once no offset is held through it."""
        if fd not in self._held.values():
            self._fds.remove(fd)
            _close_quietly(fd)


def _after_fork_in_child() -> None:
    """Close the inherited lock files (the parent's locks stay the parent's, and end with it); start afresh."""
    files, _SharedFile._files = _SharedFile._files, {}
    _SharedFile._guard = threading.Lock()
    inherited = [fd for shared in files.values() for fd in shared._fds] + list(_FLOCK_FDS)
    _FLOCK_FDS.clear()
    for fd in inherited:
        _close_quietly(fd)


_forksafe.register(after_in_child=_after_fork_in_child)


def _open_lock_file(path: str) -> Optional[int]:
    """An fd of lock file ``path``, made (with its directory, if that was deleted under a running process) when
    missing; None when it cannot be opened."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            makedirs_private(os.path.dirname(path))
            return os.open(path, flags, 0o600)
    except OSError:
        return None


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _flock_struct(lock_type: int, offset: int) -> bytes:
    # struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;} with the C compiler's
    # alignment (native struct mode); l_pid must be 0 for OFD locks. Zero tail: room for any trailing padding.
    return struct.pack("@hhqqi", lock_type, os.SEEK_SET, offset, 1, 0) + bytes(16)
