"""The cache's housekeeping, off the read path: walking objects/, sweeping dead temp files, the shared size total.

Package-internal: :class:`streamloader.cache.FileCache` is the only user. Everything here works on a cache root
and the entry locks (``lock_for(kind, digest)`` returns an :class:`~streamloader.cache.entrylock.EntryLock`), never
on the FileCache itself.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import uuid
from typing import Callable, Iterator, List, Optional, Tuple

from streamloader.cache.entrylock import EntryLock, Timeout

log = logging.getLogger("streamloader.cache")

__all__ = ["SWEEP_INTERVAL", "SWEEP_STAMP", "SharedUsage", "evict", "scan_objects", "sweep_due", "sweep_temp",
           "temp_name"]

SWEEP_STAMP = os.path.join("locks", "last-sweep")  # mtime = when a process last swept tmp/ on start
SWEEP_INTERVAL = 300.0  # seconds: a starting FileCache sweeps tmp/ at most this often per cache root
LEGACY_TMP_AGE = 3600.0  # a temp file named without its entry's kind (older versions) is swept after this long
USAGE_FILE = "usage"  # locks/usage: "<bytes in objects/> <time of the last full scan>", rewritten under a lock
_USAGE_FORMAT = "%20d %20.3f\n"
_TEMP_NAME = re.compile(r"(?:([a-z0-9]+)-)?([0-9a-f]+)\.(\d+)\.[0-9a-f]+\.part")

LockFor = Callable[[str, str], EntryLock]


def scan_objects(root: str) -> Iterator[Tuple[str, os.stat_result]]:
    """(path, stat) of every finished object under ``root/objects`` (entries removed meanwhile are skipped)."""
    for dirpath, _dirs, files in os.walk(os.path.join(root, "objects")):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                yield path, os.stat(path)
            except FileNotFoundError:
                continue


def evict(entries: List[Tuple[str, os.stat_result]], total: int, target: int,
          lock_for: LockFor) -> Tuple[int, int]:
    """Remove least recently used entries until ``total`` <= ``target``: (entries removed, bytes left).

    An entry whose lock is held (being downloaded or checked right now) is skipped; a reader that already opened
    an entry keeps its inode after the unlink.
    """
    removed = 0
    for path, st in sorted(entries, key=lambda e: e[1].st_mtime):
        if total <= target:
            break
        lock = lock_for(os.path.basename(os.path.dirname(os.path.dirname(path))), os.path.basename(path))
        try:
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


def sweep_due(root: str, interval: float) -> bool:
    """True (and the stamp renewed) when no process swept ``root``'s temp files in the last ``interval`` seconds.

    One ``stat`` when a sweep is not due; processes starting together may both sweep, which is harmless.
    """
    stamp = os.path.join(root, SWEEP_STAMP)
    try:
        if 0 <= time.time() - os.stat(stamp).st_mtime < interval:
            return False
    except OSError:
        pass
    try:
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600))
        os.utime(stamp)
    except OSError:  # a read-only cache can still be read; it just is not swept
        return False
    return True


def sweep_temp(root: str, lock_for: LockFor) -> int:
    """Delete temp files nobody is writing any more; returns how many. This process's own are never touched.

    A temp file is named ``<kind>-<digest>.<pid>.<random>.part`` and exists only while its writer holds the entry's
    lock, so it is left over exactly when that lock is free: the kernel released it with its dead process. That
    also holds where pids mislead (reused, or a writer in another container's pid namespace). Names without the
    kind (older versions) go by pid and age.
    """
    tmpdir = os.path.join(root, "tmp")
    try:
        names = os.listdir(tmpdir)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        path = os.path.join(tmpdir, name)
        pid, kind, digest = _parse_temp_name(name)
        if pid == os.getpid():
            continue
        if digest:
            removed += _unlink_if_unlocked(path, lock_for(kind, digest))
        elif not _pid_alive(pid) or _age(path) >= LEGACY_TMP_AGE:
            removed += _unlink(path)
    return removed


def temp_name(kind: str, digest: str) -> str:
    """A fresh temp file name for an entry (see :func:`sweep_temp`): the pid, then a random tag drawn once per
    process and a counter (unique without a ``uuid4`` per download; a forked child has another pid)."""
    return f"{kind}-{digest}.{os.getpid()}.{_TEMP_TAG}{next(_TEMP_COUNTER):x}.part"


_TEMP_TAG = uuid.uuid4().hex[:8]
_TEMP_COUNTER = itertools.count()


def _parse_temp_name(name: str) -> Tuple[int, str, str]:
    """(pid, kind, digest) of a temp file name; pid -1 when unreadable, kind and digest "" for old-style names."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return -1, "", ""
    return int(match.group(3)), match.group(1) or "", match.group(2) if match.group(1) else ""


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def _unlink_if_unlocked(path: str, lock: EntryLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False  # its writer is at work
    try:
        return _unlink(path)
    finally:
        lock.release()


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


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


class SharedUsage:
    """The bytes in a cache's ``objects/``, one running total for every process that stores into it.

    A capped cache lands each new entry under this lock (``locks/usage``, ~50 us): the entry's size is added and it
    is renamed into place, so the total never lags behind the disk. Only when the total would pass the cap, or the
    last full scan is older than ``rescan_after`` seconds (files stored by uncapped caches or other versions, removed
    by hand, ...), does the storing process scan and evict, still holding the lock, so the others wait for it
    instead of scanning (and evicting) too. Processes that share the root then never exceed the cap together
    (one entry larger than the cap still lands).
    """

    def __init__(self, root: str):
        self.locks_dir = os.path.join(root, "locks")
        self.path = os.path.join(self.locks_dir, USAGE_FILE)
        self._thread_lock = threading.Lock()  # the entry lock belongs to an open file: threads queue up here first

    def add(self, added: int, cap: int, rescan_after: float, scan: Callable[[], int], timeout: float,
            land: Callable[[], None]) -> None:
        """Count ``added`` new bytes and call ``land()`` (which puts them on disk) under the lock. When the total
        would pass ``cap`` (or is stale), ``scan()`` must first make room and return the bytes left. After
        ``timeout`` seconds of waiting for the lock, ``land()`` runs uncounted (the next scan catches up)."""
        if not self._thread_lock.acquire(timeout=timeout if timeout >= 0 else -1):
            land()
            return
        try:
            lock = EntryLock(self.locks_dir, "usage", "0" * 40, timeout)  # a kind no entry has
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                log.warning("cache size total: timed out after %.0fs waiting for another process's scan", timeout)
                land()
                return
            try:
                self._add_locked(added, cap, rescan_after, scan, land)
            finally:
                lock.release()
        finally:
            self._thread_lock.release()

    def _add_locked(self, added: int, cap: int, rescan_after: float, scan: Callable[[], int],
                    land: Callable[[], None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:  # locks/ deleted meanwhile, or not writable: enforce the cap without the shared total
            scan()
            land()
            return
        try:
            total: Optional[int] = None
            try:
                fields = os.pread(fd, 64, 0).split()
                total, scanned_at = int(fields[0]), float(fields[1])
            except (ValueError, IndexError):  # new, or torn by a crash: scan
                scanned_at = 0.0
            if total is None or not 0 <= time.time() - scanned_at < rescan_after or total + added > cap:
                total, scanned_at = scan(), time.time()  # makes room while the others wait
            land()
            total += added
            os.pwrite(fd, (_USAGE_FORMAT % (max(total, 0), scanned_at)).encode(), 0)  # fixed width: no truncate
        finally:
            os.close(fd)
