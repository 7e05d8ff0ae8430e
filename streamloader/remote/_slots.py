"""Where a host's limiter keeps its state (see streamloader/remote/limits.py): a shared file, or this process.

Both backends give the limiter ``header`` (a writable buffer: mmapped file bytes, or a bytearray), slots
(``take``/``give``), one probe lock, ``count`` of slots held, and a header lock. In the file, slot ``i`` is a one-byte
open-file-description lock (``F_OFD_SETLK``) at offset ``4096 + i``, the header lock byte 0 and the probe lock byte
1: the kernel drops the locks of a process that exits or is killed, so a dead process never keeps a slot. Unlike
``flock``, OFD locks of one file conflict between different open files of one process, so each slot in flight has
its own fd (a pool of them per process); the threads of one process still serialize header updates on a
``threading.Lock``, as they share one fd for the header.
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
from typing import Any, List, Optional, Tuple

try:
    import fcntl
except ImportError:  # Windows: per-process limits
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileSlots", "LocalSlots", "OFD_LOCKS", "HEADER_SIZE"]

_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_GETLK = getattr(fcntl, "F_OFD_GETLK", None)
#: whether this system has open-file-description locks (Linux >= 3.15)
OFD_LOCKS = _SETLK is not None and _GETLK is not None
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
_FLOCK = struct.Struct("@hhqqi")
_HEADER_LOCK, _PROBE_LOCK, _SLOT0 = 0, 1, 4096
#: bytes of header the limiter may use (the first page of the file, mmapped)
HEADER_SIZE = 4096


def _flock(kind: int, offset: int, length: int = 1) -> bytes:
    # struct flock with the C compiler's alignment; l_pid must be 0 for OFD locks; zero tail for trailing padding
    return _FLOCK.pack(kind, os.SEEK_SET, offset, length, 0) + bytes(16)


class _SlotArgs:
    """``args[i]``: the ``struct flock`` bytes of ``kind`` for slot ``i``, packed at its first use; ``len()``: the
    number of slots."""

    def __init__(self, kind: int, size: int):
        self._kind, self._made = kind, [b""] * size

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, index: int) -> bytes:
        made = self._made[index]
        if not made:
            made = self._made[index] = _flock(self._kind, _SLOT0 + index)
        return made


class FileSlots:
    """Header and slots in a shared file (see module docstring); raises OSError where OFD locks do not work."""

    shared = True

    def __init__(self, path: str, max_slots: int):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if os.fstat(fd).st_size < HEADER_SIZE:
                os.ftruncate(fd, HEADER_SIZE)
            try:
                fcntl.fcntl(fd, _GETLK, _flock(fcntl.F_WRLCK, _HEADER_LOCK))  # EINVAL where OFD locks are missing
            except OSError as exc:
                if exc.errno not in _BUSY:
                    raise
            self.header: Any = mmap.mmap(fd, HEADER_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.path, self._hfd, self.closed = path, fd, False
        self._fds, self._free = [fd], []  # every fd we opened; fds holding no lock, ready for a slot
        # each slot's lock and unlock arguments, made at its first use (all 2 x max_slots up front: ~5 ms per process)
        self._lock_slot = _SlotArgs(fcntl.F_WRLCK, max_slots)
        self._unlock_slot = _SlotArgs(fcntl.F_UNLCK, max_slots)
        self._thread_lock = threading.Lock()  # OFD locks of one fd do not exclude our own threads
        self._header_locked = False
        self._given: List[int] = []  # slots this process gave back, newest last: most likely still free

    def _take_given(self, fd: int, limit: int) -> Optional[int]:
        """A slot this process gave back lately, locked on ``fd`` (one try each for the newest few), or None."""
        given, locks = self._given, self._lock_slot
        for _attempt in range(3):
            try:
                index = given.pop()
            except IndexError:
                return None
            if index >= limit:
                continue
            try:
                fcntl.fcntl(fd, _SETLK, locks[index])
                return index
            except OSError as exc:  # another process took it meanwhile
                if exc.errno not in _BUSY:
                    raise
        return None

    def _in_use(self) -> int:
        """Fds of ours holding a slot (or the probe) now: every fd but the header's and the free ones."""
        return len(self._fds) - 1 - len(self._free)

    def _fd(self) -> int:
        try:
            return self._free.pop()
        except IndexError:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            self._fds.append(fd)
            return fd

    def take(self, start: int, limit: int) -> Optional[Tuple[int, int]]:
        """Lock a free slot below ``limit``: one this process gave back lately, else the first free one from
        ``start`` on; ``(fd, index)``, or None when all are busy.

        (With many in flight, a scan from one place meets the slots held, one failed lock call each: ~6 per
        request with ~100 in flight, where a slot given back is free at the first try. And while this process
        holds ``limit`` slots itself, none is free: no scan.)"""
        if self._in_use() >= limit:
            return None
        fd = self._fd()
        try:
            index = self._take_given(fd, limit)
        except BaseException:
            self._free.append(fd)
            raise
        if index is not None:
            return fd, index
        locks = self._lock_slot
        for k in range(limit):
            index = (start + k) % limit
            try:
                fcntl.fcntl(fd, _SETLK, locks[index])
                return fd, index
            except OSError as exc:
                if exc.errno not in _BUSY:
                    self._free.append(fd)
                    raise
        self._free.append(fd)
        return None

    def give(self, fd: int, index: int) -> None:
        fcntl.fcntl(fd, _SETLK, self._unlock_slot[index])
        self._free.append(fd)
        given = self._given
        given.append(index)
        if len(given) > 4 * len(self._lock_slot):  # (stale entries cost one try each, then are dropped)
            del given[: len(given) // 2]

    def take_probe(self) -> Optional[int]:
        fd = self._fd()
        try:
            fcntl.fcntl(fd, _SETLK, _flock(fcntl.F_WRLCK, _PROBE_LOCK))
            return fd
        except OSError:
            self._free.append(fd)
            return None

    def give_probe(self, fd: int) -> None:
        fcntl.fcntl(fd, _SETLK, _flock(fcntl.F_UNLCK, _PROBE_LOCK))
        self._free.append(fd)

    def count(self, limit: int) -> int:
        """Slots below ``limit`` held by anyone (~2 F_OFD_GETLK per held slot)."""
        held, ranges = 0, [(_SLOT0, _SLOT0 + limit)]
        while ranges:  # GETLK names *a* conflicting lock in the range, not the first: split around it
            start, end = ranges.pop()
            found = _FLOCK.unpack_from(fcntl.fcntl(self._hfd, _GETLK, _flock(fcntl.F_WRLCK, start, end - start)))
            if found[0] == fcntl.F_UNLCK:
                continue
            lo, hi = max(found[2], start), min(found[2] + max(1, found[3]), end)
            held += hi - lo
            ranges += [r for r in ((start, lo), (hi, end)) if r[0] < r[1]]
        return held

    def lock_header(self) -> None:
        self._thread_lock.acquire()
        deadline, delay = time.monotonic() + 0.5, 0.0002
        while True:
            try:
                fcntl.fcntl(self._hfd, _SETLK, _flock(fcntl.F_WRLCK, _HEADER_LOCK))
                self._header_locked = True
                return
            except OSError:
                if time.monotonic() > deadline:  # a holder stopped mid-update must not stop us: go on unlocked
                    self._header_locked = False
                    return
                time.sleep(delay)
                delay = min(delay * 2, 0.005)

    def unlock_header(self) -> None:
        if self._header_locked:
            self._header_locked = False
            fcntl.fcntl(self._hfd, _SETLK, _flock(fcntl.F_UNLCK, _HEADER_LOCK))
        self._thread_lock.release()

    def abandon(self) -> None:
        """In a forked child: close our copies of the fds without unlocking (the parent's locks stay the parent's)."""
        self.closed = True
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.header.close()


class LocalSlots:
    """The same interface within one process (where OFD locks are missing)."""

    shared = False

    def __init__(self, header_size: int) -> None:
        self.header: Any = bytearray(header_size)
        self.closed = False
        self._held: set = set()
        self._probe = False
        self._lock = threading.Lock()

    def take(self, start: int, limit: int) -> Optional[Tuple[int, int]]:
        with self._lock:
            for k in range(limit):
                index = (start + k) % limit
                if index not in self._held:
                    self._held.add(index)
                    return 0, index
        return None

    def give(self, fd: int, index: int) -> None:
        with self._lock:
            self._held.discard(index)

    def take_probe(self) -> Optional[int]:
        with self._lock:
            if self._probe:
                return None
            self._probe = True
            return 0

    def give_probe(self, fd: int) -> None:
        self._probe = False

    def count(self, limit: int) -> int:
        return sum(1 for index in list(self._held) if index < limit)

    def lock_header(self) -> None:
        self._lock.acquire()

    def unlock_header(self) -> None:
        self._lock.release()

    def abandon(self) -> None:
        self.closed = True
