"""What a remote repo entry looks like to code that expects local files: ``os.stat_result`` and ``os.DirEntry``."""
from __future__ import annotations

import os
import stat as stat_module
from typing import TYPE_CHECKING, Any, Iterable, Iterator, List, Optional, Union

if TYPE_CHECKING:
    from streamloader.hooks.router import HookedRoot
    from streamloader.remote.entries import RemoteEntry

__all__ = ["remote_stat", "RemoteDirEntry", "ScandirIterator"]

FILE_MODE = stat_module.S_IFREG | 0o444  # read-only: writes go to a new local file, never to the repo
DIR_MODE = stat_module.S_IFDIR | 0o555
_UID = os.getuid() if hasattr(os, "getuid") else 0
_GID = os.getgid() if hasattr(os, "getgid") else 0
# stat_result's layout past the 10 sequence fields: float a/m/ctime, a/m/ctime_ns, then (POSIX) blksize, blocks, rdev
_EXTRA_POSIX = os.name == "posix" and os.stat_result.n_fields >= 19


def remote_stat(hook: "HookedRoot", entry: "RemoteEntry") -> os.stat_result:
    """A ``stat_result`` for a remote entry: real size, regular-file or directory mode, times 0 (the epoch).

    The inode is a stable hash of the repo path and ``st_dev`` the root's device, so ``os.path.samefile`` and
    ``os.path.ismount`` behave.
    """
    is_dir = entry.type == "dir"
    if not is_dir and entry.size is None:  # listed without sizes: ask for this one path's size
        entry = hook.repo.stat(entry.path)
    size = 0 if is_dir else entry.size
    fields: List[Any] = [DIR_MODE if is_dir else FILE_MODE, hook.inode(entry.path), hook.st_dev, 2 if is_dir else 1,
                         _UID, _GID, size, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0]
    if _EXTRA_POSIX:
        fields += [4096, (size + 511) // 512, 0]
    return os.stat_result(fields)


class RemoteDirEntry:
    """An ``os.DirEntry`` look-alike for a remote file or directory (``os.DirEntry`` cannot be instantiated)."""

    __slots__ = ("name", "path", "_hook", "_entry", "_stat")

    def __init__(self, name: Union[str, bytes], path: Union[str, bytes], hook: "HookedRoot", entry: "RemoteEntry"):
        self.name = name
        self.path = path
        self._hook = hook
        self._entry = entry
        self._stat: Optional[os.stat_result] = None  # built on demand: a listing may hold 500k entries

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        """True for a repo directory."""
        return self._entry.type == "dir"

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        """True for a repo file."""
        return self._entry.type != "dir"

    def is_symlink(self) -> bool:
        """Always False: a repo has no symlinks."""
        return False

    def is_junction(self) -> bool:
        """Always False (Python 3.12+ API)."""
        return False

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        """The entry's :func:`remote_stat`, built once."""
        if self._stat is None:
            self._stat = remote_stat(self._hook, self._entry)
        return self._stat

    def inode(self) -> int:
        """The stable inode number of :func:`remote_stat`."""
        return self.stat().st_ino

    def __fspath__(self) -> Union[str, bytes]:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"


class ScandirIterator:
    """What ``os.scandir`` returns: an iterator that is also a context manager with ``close()``."""

    def __init__(self, entries: Iterable[Any]):
        self._entries: Optional[Iterator[Any]] = iter(entries)

    def __iter__(self) -> "ScandirIterator":
        return self

    def __next__(self) -> Any:
        if self._entries is None:
            raise StopIteration
        return next(self._entries)

    def close(self) -> None:
        """Stop the iteration (what ``os.scandir(...).close()`` does)."""
        self._entries = None

    def __enter__(self) -> "ScandirIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
