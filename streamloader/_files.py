"""Small file-system primitives shared by the cache layers: private directories and atomic, private writes."""
from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import tempfile
from typing import Any, List, Optional

from streamloader import _realos
from streamloader.errors import CacheError

log = logging.getLogger(__name__)

__all__ = ["makedirs_private", "atomic_write", "record_size", "recorded_size", "recorded_sha256", "rename_into_place",
           "reserve_fds", "secure_private_dir", "sync_files", "TempFileVanished"]

#: the extended attribute that holds a cache object's size, written as it is stored (see :func:`record_size`)
SIZE_XATTR = "user.streamloader.size"
#: the sha256 of the bytes of an object whose key no hash checks (a path key), noted as it is stored
SHA256_XATTR = "user.streamloader.sha256"
_XATTRS = hasattr(os, "setxattr")  # Linux; elsewhere nothing is recorded (the listing's size is then all there is)


def _is_dir(path: str) -> bool:
    """Whether ``path`` is a directory on this disk (the real stat: install_hooks' never answers for our own paths)."""
    try:
        return stat.S_ISDIR(_realos.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def makedirs_private(path: str) -> None:
    """Create ``path`` and any missing parents with mode 0700 (``os.makedirs`` gives ``mode`` to the leaf only)."""
    missing = []
    while path and not _is_dir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # another process or thread made it first
            pass


_syncfs: Any = None  # libc's syncfs, looked up once (Linux); False where there is none


def _libc_syncfs() -> Any:
    global _syncfs
    if _syncfs is None:
        _syncfs = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                function = ctypes.CDLL(None, use_errno=True).syncfs
                function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
                _syncfs = function
            except (OSError, AttributeError):
                pass
    return _syncfs


def sync_files(fds: List[int]) -> None:
    """Make the written data of every open file in ``fds`` durable, as ``os.fsync`` on each would; OSError if
    that fails.

    Several files are synced with one ``syncfs`` per file system they are on (Linux): one journal commit for the
    lot. An ``fsync`` each costs a commit each (0.4-0.9 ms per small file on ext4 here), and every file created on
    that file system meanwhile waits behind them (measured: a cold prefetch's temp files took 1.2 ms each to
    create; 0.15 ms with one sync per batch). The price: ``syncfs`` also writes out other programs' unsynced data
    on that file system, so a batch may take longer when someone else has much of it (it is bounded by what the
    kernel lets stay dirty). Elsewhere, and for one file, each is fsync'ed.
    """
    syncfs = _libc_syncfs() if len(fds) > 1 else False
    if not syncfs:
        for fd in fds:
            os.fsync(fd)
        return
    done = set()
    for fd in fds:
        device = os.fstat(fd).st_dev
        if device in done:
            continue
        if syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}")
        done.add(device)


def reserve_fds(more: int) -> None:
    """Make room for ``more`` open file descriptors beyond those open now, in this process's table, in one step.

    Why: Linux grows a process's descriptor table as descriptors are opened (to 128, 256, 512...), and in a process
    with threads each growth waits for an RCU grace period (``synchronize_rcu``): 10-20 ms here, while the thread
    that opens holds the GIL, so the whole interpreter stands still. A prefetch opens two descriptors per request
    in flight (a socket, a slot of the host limiter): its first hundred requests met two such stalls, and a forked
    worker process starts from a table sized for the few descriptors its parent had open. Grown at once (before a
    worker starts threads: no wait at all), the table costs at most one wait.

    Linux only (elsewhere, or when anything fails, it does nothing); capped by ``RLIMIT_NOFILE``."""
    try:
        import fcntl
        import resource

        open_now = len(os.listdir("/proc/self/fd"))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        target = open_now + more
        if soft != resource.RLIM_INFINITY:
            target = min(target, soft)
        if target <= 128:
            return  # the size every table has (on 64-bit Linux): nothing to grow
        fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            # F_DUPFD takes the lowest free descriptor >= target - 1: it never replaces one in use (dup2 would)
            os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, target - 1))
        finally:
            os.close(fd)
    except (ImportError, OSError, ValueError, AttributeError) as exc:
        log.debug("could not reserve %d file descriptors: %s", more, exc)


class TempFileVanished(CacheError):
    """A finished temp file disappeared before it was renamed into place (its directory was deleted)."""


_UNSUPPORTED = frozenset(getattr(errno, name) for name in ("ENOTSUP", "EOPNOTSUPP", "ENOSYS") if hasattr(errno, name))


def record_size(fd: int, size: int, sha256: Optional[str] = None) -> bool:
    """Note ``size`` (and ``sha256``, the hex digest of its bytes) on the open file ``fd`` (user extended
    attributes, which move with the inode through the rename into place), so that a later read can tell the file
    was cut or grown on disk even when no listing says its size (and ``verify="full"`` that it was altered where no
    listed hash can tell). False where the file system keeps no such attributes (then nothing is recorded, and reads there check
    only listed sizes: :func:`recorded_size` says None); True otherwise, even if this one could not be noted (a
    warning: a later read without a listed size then takes the file for a replaced one and downloads it again)."""
    if not _XATTRS:
        return False
    try:
        os.setxattr(fd, SIZE_XATTR, str(size).encode("ascii"))
        if sha256 is not None:
            os.setxattr(fd, SHA256_XATTR, sha256.encode("ascii"))
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:  # (e.g. some network or old tmpfs mounts)
            log.debug("cannot record cache object sizes here (%s): only sizes the listings know are checked", exc)
            return False
        log.warning("could not note a cache object's size (%s): it may be downloaded again", exc)
    return True


def recorded_size(path: str) -> Optional[int]:
    """The size :func:`record_size` noted on ``path`` (not following a symlink); None where none can be known
    (the file system keeps no such attributes); -1, which no file's size matches, where one could be but is not
    there or unreadable (the file was not stored by the cache, or was replaced by another: not to be trusted)."""
    if not _XATTRS:
        return None
    try:
        value = os.getxattr(path, SIZE_XATTR, follow_symlinks=False)
    except OSError as exc:
        return None if exc.errno in _UNSUPPORTED else -1  # (ENODATA: none noted on it)
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return -1


def recorded_sha256(path: str) -> Optional[str]:
    """The sha256 :func:`record_size` noted on ``path`` (not following a symlink); None where the file system
    keeps no such attributes; "" (which no digest matches) where it could but none is there or it is unreadable."""
    if not _XATTRS:
        return None
    try:
        value = os.getxattr(path, SHA256_XATTR, follow_symlinks=False)
    except OSError as exc:
        return None if exc.errno in _UNSUPPORTED else ""
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return ""


def rename_into_place(tmp: str, final: str) -> None:
    """``os.replace(tmp, final)``, making ``final``'s directory (0700) when it is missing (at first, or deleted
    meanwhile); :class:`TempFileVanished` when ``tmp`` itself is gone (or the directory keeps vanishing)."""
    for attempt in range(3):
        try:
            os.replace(tmp, final)  # (tried first: the directory is there but for a new cache's first entries)
            return
        except FileNotFoundError:
            if attempt == 2 or not os.path.exists(tmp):
                raise TempFileVanished(f"cannot move {tmp} to {final}: one of them vanished (was the cache "
                                       "deleted?)") from None
            makedirs_private(os.path.dirname(final))


def secure_private_dir(path: str) -> None:
    """Make sure no other user can write into the directory ``path`` (like ssh does for its keys).

    A cache root that group or others can write would let other local users plant files in it. When it is ours
    (and not a shared sticky directory such as /tmp) it is tightened to 0700, with a warning; otherwise it is
    refused with a :class:`~streamloader.errors.CacheError` saying how to fix it. Readable by others is left alone.
    """
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):  # (a file is left as it is: its mode is not ours to change)
        raise CacheError(f"the cache directory {path} is not a directory: choose another one (STREAMLOADER_CACHE or "
                         "cache_dir=)")
    if os.name == "nt":  # POSIX modes mean nothing there
        return
    if not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise CacheError(f"cache directory {path} is writable by other users (mode {mode:04o}) and could not be "
                             f"made private ({exc}); run `chmod 700 {path}` or choose another directory") from None
        log.warning("cache directory %s was writable by other users (mode %04o); changed it to 0700", path, mode)
        return
    raise CacheError(f"cache directory {path} is writable by other users (mode {mode:04o}, owner uid {st.st_uid}), "
                     f"who could plant files in it: run `chmod 700 {path}` as its owner, or choose another directory "
                     "(STREAMLOADER_CACHE or cache_dir=)")


def atomic_write(path: str, data: bytes, tmp_dir: Optional[str] = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The temp file is created 0600 (mkstemp), in ``tmp_dir`` (same file system!) or next to ``path``, then renamed
    over ``path``. Missing directories are created 0700.
    """
    directory = tmp_dir or os.path.dirname(os.path.abspath(path))
    makedirs_private(directory)
    makedirs_private(os.path.dirname(os.path.abspath(path)))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
