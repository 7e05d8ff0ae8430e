"""The FUSE operations of ``streamloader mount``: a read-only view of one :class:`RemoteRepo` folder.

Everything is served from streamloader's shared cache, so a file is downloaded once for the mount, the hooks and
every other process. Files up to ``whole_file_max`` are downloaded whole on first read and read at any offset
from the cached file (``pread``); larger ones that are not cached yet are read through HTTP ranges in blocks.
The commit is pinned for the life of the mount, so the kernel may keep names, attributes and pages for as long
as it likes (long timeouts, ``kernel_cache``): a second read of a file never reaches this process.

Opens cost nothing here: with libfuse 3 on a kernel that allows it, ``open`` answers ENOSYS once and the kernel
stops sending opens and releases at all. Lookups too: a listing carries every attribute it knows (readdirplus,
see :class:`RepoFUSE`), so a warm read of a small file found by ``find`` or ``ls`` is one read callback in this
process, a re-read none. Files are therefore fetched on their first read and kept open in a bounded table keyed
by path; a download error shows as EIO on read, a missing file as ENOENT on lookup. Serve with
:class:`RepoFUSE`, not mfusepy's FUSE.

This module imports ``mfusepy`` (and so libfuse) at import time: load it through
:func:`streamloader.fusemount.control.load_binding`, which turns a missing library into a clear MountError.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import posixpath
import stat
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import mfusepy

from streamloader.errors import AuthenticationError, RemoteError, StreamloaderError
from streamloader.fusemount.readahead import ReadAhead
from streamloader.remote.entries import RemoteEntry
from streamloader.remote.filesystem import WHOLE_FILE_MAX
from streamloader.remote.repo import RemoteRepo

log = logging.getLogger(__name__)

__all__ = ["RepoFUSE", "RepoOperations", "file_size"]

RANGE_BLOCK = 4 * 1024 * 1024  # bytes fetched per HTTP range request of a big uncached file
OPEN_FILES = 512  # cached files kept open for reads (least recently used closed first)
RANGE_FILES = 16  # big uncached files kept (each holds one RANGE_BLOCK)
LOCAL_PATHS = 1 << 16  # cached copies found ahead of a file's first read (a lookup, readdir, read-ahead check)
KEPT_THREAD_STATES = 64  # libfuse worker threads whose Python thread state lives between callbacks
LISTED_FOLDERS = 8  # readdir answers kept
PLUS_CACHE_LOOKUPS = 20_000  # files of unknown size per readdir whose attributes are taken from the cache
_CAP_NO_OPEN_SUPPORT = 1 << 17  # libfuse 3's FUSE_CAP_NO_OPEN_SUPPORT
_CAP_READDIRPLUS = 1 << 13  # libfuse 3's FUSE_CAP_READDIRPLUS
_CAP_READDIRPLUS_AUTO = 1 << 14  # ... and FUSE_CAP_READDIRPLUS_AUTO (plus for a folder's first page only)
_READDIR_PLUS = 1  # libfuse 3: the kernel asks for attributes with the names (fuse_readdir_flags)
_FILL_DIR_PLUS = 2  # libfuse 3: this entry's attributes are complete (fuse_fill_dir_flags)


def file_size(repo: RemoteRepo, entry: RemoteEntry, local: Optional[str] = None) -> int:
    """The real size of a file entry: the ONE place the mount learns sizes.

    A size of None or 0 counts as unknown (folder listings come without sizes): :meth:`RemoteRepo.stat` then gives
    it (from the cached copy, else by asking about that one path); if that still says nothing, the file is
    downloaded and the cached file's size, which is exact, is the answer. ``local``: the cached copy, if the
    caller has found it already.
    """
    if entry.size:
        return int(entry.size)
    if local is not None:
        try:
            return os.stat(local).st_size
        except FileNotFoundError:  # evicted meanwhile
            pass
    size = repo.stat(entry.path).size
    if size:
        return int(size)
    local = repo.cached_path(entry.path) or repo.local_path(entry.path)
    return os.stat(local).st_size


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT
    if isinstance(exc, (AuthenticationError, PermissionError)):
        return errno.EACCES
    if isinstance(exc, IsADirectoryError):
        return errno.EISDIR
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0 \
            and not isinstance(exc, (RemoteError, StreamloaderError)):
        return exc.errno
    return errno.EIO


def _fuse_errors(op: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our exceptions into the errno the caller sees (logged unless it is a plain ENOENT)."""
    def wrapper(self: "RepoOperations", path: str, *args: Any) -> Any:
        try:
            return op(self, path, *args)
        except mfusepy.FuseOSError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure must become an errno, never a crash
            code = _errno_of(exc)
            if code != errno.ENOENT:
                log.warning("%s %s failed: %s", op.__name__, path, exc)
            raise mfusepy.FuseOSError(code) from None

    wrapper.__name__ = op.__name__
    wrapper.__doc__ = op.__doc__
    return wrapper



def _blocks(size: int) -> int:
    """512-byte blocks of a file of ``size`` bytes (0 made ``du`` report nothing, and tools take 0 for sparse)."""
    return (size + 511) // 512

class _RangeFile:
    """A big uncached file read through HTTP ranges; keeps the last block (sequential readers ask in 128 KB)."""

    def __init__(self, repo: RemoteRepo, path: str, size: int):
        self.repo, self.path, self.size = repo, path, size
        self._block: Tuple[int, bytes] = (-1, b"")
        self._lock = threading.Lock()

    def pread(self, size: int, offset: int) -> bytes:
        out = []
        end = min(self.size, offset + size)
        while offset < end:
            start = offset - offset % RANGE_BLOCK
            with self._lock:
                block_start, data = self._block
                if block_start != start:
                    data = self.repo.read_bytes(self.path, start, min(self.size, start + RANGE_BLOCK))
                    self._block = (start, data)
            piece = data[offset - start:end - start]
            if not piece:
                break
            out.append(piece)
            offset += len(piece)
        return b"".join(out)


class RepoOperations(mfusepy.Operations):
    """Read-only FUSE operations over ``repo`` at ``root`` (a folder of the repo; "" = the whole repo)."""

    use_ns = True  # times in nanoseconds (mfusepy's non-deprecated mode)

    def __init__(self, repo: RemoteRepo, root: str = "", whole_file_max: int = WHOLE_FILE_MAX,
                 read_ahead: int = 32, mtime: Optional[float] = None):
        self.repo = repo
        self.root = root.strip("/")
        self.whole_file_max = whole_file_max
        self._mtime_ns = int((mtime if mtime is not None else time.time()) * 1e9)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._attrs: Dict[str, Dict[str, Any]] = {}
        self._folders: Dict[str, Tuple[List[str], Dict[str, int]]] = {}  # dir -> (file paths in order, position)
        self._entries: Dict[str, RemoteEntry] = {}  # file entries of the folders in _folders
        self._local: Dict[str, str] = {}  # repo path -> its cached copy, found by a lookup, until the first read
        self._files: "OrderedDict[str, Any]" = OrderedDict()  # repo path -> open cached file (LRU)
        self._ranges: "OrderedDict[str, _RangeFile]" = OrderedDict()
        self._listed: "OrderedDict[str, List[Any]]" = OrderedDict()  # readdir's answers, last few folders
        self._files_lock = threading.Lock()
        self._folder_lock = threading.Lock()
        self.started = False
        self.no_open = False  # set in init when the kernel may skip opens
        self._ahead = ReadAhead(self._prefetch_one, read_ahead, skip=self._needs_no_prefetch) if read_ahead else None

    # -- paths ----------------------------------------------------------------------------------------------------
    def _repo_path(self, path: str) -> str:
        rel = path.strip("/")
        return posixpath.join(self.root, rel) if self.root and rel else (rel or self.root)

    def _dir_attrs(self) -> Dict[str, Any]:
        return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0, "st_uid": self._uid,
                "st_gid": self._gid, "st_mtime": self._mtime_ns, "st_ctime": self._mtime_ns,
                "st_atime": self._mtime_ns}

    # -- metadata -------------------------------------------------------------------------------------------------
    @_fuse_errors
    def getattr(self, path: str, fh: Optional[int] = None) -> Dict[str, Any]:
        """Real size, mode and the commit's time; served from memory after the first lookup (or the folder's
        listing: see :meth:`readdir`)."""
        attrs = self._attrs.get(path)
        if attrs is not None:
            return attrs
        rel = self._repo_path(path)
        entry = self.repo.info(rel)
        attrs = self._dir_attrs()
        if not entry.is_dir:
            local = None if entry.size else self.repo.cached_path(rel)
            if local is not None:
                self._remember_local(rel, local)  # the first read opens it without looking again
            size = file_size(self.repo, entry, local)
            attrs.update(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=size, st_blocks=_blocks(size))
        self._attrs[path] = attrs
        return attrs

    def _file_attrs(self, size: int) -> Dict[str, Any]:
        attrs = self._dir_attrs()
        attrs.update(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=size, st_blocks=_blocks(size))
        return attrs

    @_fuse_errors
    def readdir(self, path: str, fh: int) -> List[Any]:
        """The folder in listing order, each entry with its type and, where its size is known without a request
        (the listing says it, or the file is cached), all its attributes.

        Those attributes are remembered for :meth:`getattr` and, with :class:`RepoFUSE` on libfuse 3, handed to
        the kernel in the listing itself (readdirplus): ``find DIR | xargs cat`` then costs no lookup per file.
        Up to ``PLUS_CACHE_LOOKUPS`` files of unknown size (dagshub.com lists no sizes) are looked up in the cache
        for it; the others get a lookup (getattr) when a program stats them, as before. The last few folders'
        answers are kept (the kernel reads a big folder in pages of a few dozen entries).
        """
        with self._folder_lock:
            listed = self._listed.get(path)
            if listed is not None:
                self._listed.move_to_end(path)
                return listed
        listed = self._list(path)
        with self._folder_lock:
            self._listed[path] = listed
            while len(self._listed) > LISTED_FOLDERS:
                self._listed.popitem(last=False)
        return listed

    def _list(self, path: str) -> List[Any]:
        entries = self.repo.ls(self._repo_path(path))
        prefix = path.rstrip("/") + "/"
        out: List[Any] = [(".", stat.S_IFDIR, 0), ("..", stat.S_IFDIR, 0)]
        known: Dict[str, RemoteEntry] = {}
        lookups = PLUS_CACHE_LOOKUPS if self.repo.cache is not None else 0
        for entry in entries:
            if entry.is_dir:
                out.append((entry.name, self._attrs.setdefault(prefix + entry.name, self._dir_attrs()), 0))
                continue
            known[entry.path] = entry
            attrs = self._attrs.get(prefix + entry.name)
            if attrs is None:
                size = entry.size
                if not size and lookups > 0:
                    lookups -= 1
                    local = self.repo.cached_copy(entry)
                    if local is not None:
                        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: a lookup finds out
                            size = os.stat(local).st_size
                            self._remember_local(entry.path, local)
                if size:
                    attrs = self._attrs.setdefault(prefix + entry.name, self._file_attrs(int(size)))
            out.append((entry.name, attrs if attrs is not None else stat.S_IFREG, 0))
        with self._folder_lock:
            self._entries.update(known)
        return out

    def statfs(self, path: str) -> Dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0, "f_files": 0,
                "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    # -- content --------------------------------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        """Nothing to do (files are fetched on first read): ENOSYS tells the kernel to stop asking, where it may."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise mfusepy.FuseOSError(errno.EROFS)  # the kernel refuses these on a ro mount already
        if self.no_open:
            raise mfusepy.FuseOSError(errno.ENOSYS)
        return 0

    @_fuse_errors
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """Bytes at ``offset`` from the cached file (whole-file download on first read) or by HTTP ranges."""
        rel = self._repo_path(path)
        handle = self._files.get(rel) or self._ranges.get(rel)  # dict reads are atomic: no lock needed
        if handle is None:
            handle = self._open_file(rel)
        if isinstance(handle, _RangeFile):
            return handle.pread(size, offset)
        return os.pread(handle.fileno(), size, offset)

    def _open_file(self, rel: str) -> Any:
        entry = self._entries.get(rel) or self.repo.info(rel)
        if entry.is_dir:
            raise IsADirectoryError(errno.EISDIR, "Is a directory", rel)
        if self._ahead is not None:
            self._note_open(rel)
        local = self._local.pop(rel, None)
        size = file_size(self.repo, entry, local)
        handle: Any = None
        cache = self.repo.cache
        if cache is not None:
            local = local or self.repo.cached_copy(entry)
            if local is not None:
                try:
                    handle = _unbuffered(local)
                except FileNotFoundError:  # evicted since get(): fetch it again below
                    handle = None
            if handle is None and size <= self.whole_file_max:
                handle = self.repo.open(rel, opener=_unbuffered)
        if handle is not None:
            table, limit = self._files, OPEN_FILES
        else:
            handle, table, limit = _RangeFile(self.repo, rel, size), self._ranges, RANGE_FILES
        with self._files_lock:
            handle = table.setdefault(rel, handle)
            table.move_to_end(rel)
            while len(table) > limit:
                table.popitem(last=False)  # closed when its last reader lets go (a read may hold it right now)
        return handle

    # -- read-ahead -----------------------------------------------------------------------------------------------
    def _folder(self, folder: str) -> Tuple[List[str], Dict[str, int]]:
        known = self._folders.get(folder)
        if known is None:
            entries = [e for e in self.repo.ls(folder) if not e.is_dir]
            paths = [e.path for e in entries]
            known = (paths, {p: i for i, p in enumerate(paths)})
            with self._folder_lock:
                self._entries.update((e.path, e) for e in entries)
                self._folders.setdefault(folder, known)
        return known

    def _note_open(self, rel: str) -> None:
        folder = posixpath.dirname(rel)
        paths, index = self._folder(folder)
        position = index.get(rel)
        if position is not None and self._ahead is not None:
            self._ahead.opened((mfusepy.fuse_get_context()[2], folder), position, paths)

    def _needs_no_prefetch(self, rel: str) -> bool:
        entry = self._entries.get(rel) or self.repo.info(rel)
        if entry.size and entry.size > self.whole_file_max:
            return True
        if self.repo.cache is None or rel in self._local or rel in self._files:
            return True
        local = self.repo.cached_copy(entry)
        if local is None:
            return False
        self._remember_local(rel, local)  # cached already: its first read opens it without looking again
        return True

    def _remember_local(self, rel: str, local: str) -> None:
        if len(self._local) >= LOCAL_PATHS:
            self._local.clear()  # only a shortcut: a read that finds nothing here looks in the cache itself
        self._local[rel] = local

    def _prefetch_one(self, rel: str) -> None:
        if file_size(self.repo, self.repo.info(rel)) <= self.whole_file_max:
            self.repo.local_path(rel)

    # -- life cycle -----------------------------------------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        """The kernel connected: the mount is up (libfuse's exit status cannot tell a signal from a failure)."""
        self.started = True
        self.no_open = bool(mfusepy.fuse_version_major >= 3 and conn is not None
                            and conn.capable & _CAP_NO_OPEN_SUPPORT)
        if mfusepy.fuse_version_major >= 3 and conn is not None and conn.want & _CAP_READDIRPLUS:
            # every page of a listing with attributes (the tree is pinned): no lookup per file afterwards
            conn.want &= ~_CAP_READDIRPLUS_AUTO
        log.debug("mounted; kernel skips opens: %s", self.no_open)

    def destroy(self, path: str) -> None:
        """On unmount: stop the read-ahead, close what is open and let the cache finish storing new files."""
        if self._ahead is not None:
            self._ahead.close()
        with self._files_lock:
            self._files.clear()
            self._ranges.clear()
        if self.repo.cache is not None:
            self.repo.cache.flush(timeout=30)


def _unbuffered(path: str) -> Any:
    return open(path, "rb", buffering=0)


class RepoFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with two costs of a warm read removed.

    Readdir with offsets and attributes: mfusepy hands libfuse names and types only, at offset 0; libfuse 3.14
    then buffers the whole folder and sends the kernel plus-entries without an inode, which it ignores. With
    offsets libfuse registers each entry (no callback) and the kernel keeps the attributes :meth:`RepoOperations
    .readdir` knows for ``attr_timeout``: no lookup (getattr) per listed file.

    Thread states kept: libfuse's worker threads are not Python threads, so ctypes makes a Python thread state
    for each callback and deletes it on return (about 50 us per callback, measured: more than a warm read's own
    work). The first callback on a worker thread takes one more reference on its state so that it survives
    between callbacks; at most ``KEPT_THREAD_STATES`` are kept (libfuse 3's pool has up to 10 workers, so a
    pool that replaces its threads cannot leak more than that many).
    """

    def __init__(self, operations: Any, mountpoint: str, **kwargs: Any):
        self._local = threading.local()
        self._kept_lock = threading.Lock()
        self.kept_thread_states = 0
        super().__init__(operations, mountpoint, **kwargs)  # runs the mount until it ends

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not getattr(self._local, "kept", False):
            self._keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def _keep_thread_state(self) -> None:
        self._local.kept = True
        if threading.get_ident() == threading.main_thread().ident:
            return  # a Python thread: its state lives as long as it does
        with self._kept_lock:
            if self.kept_thread_states >= KEPT_THREAD_STATES:
                return
            self.kept_thread_states += 1
        # this thread holds the GIL (a callback is running): Ensure only counts one more user of its state
        ctypes.pythonapi.PyGILState_Ensure()

    def readdir_fuse_3(self, path: Optional[bytes], buf: Any, filler: Any, offset: int, fip: Any,
                       flags: int) -> int:
        items = self.operations.readdir(None if path is None else path.decode(self.encoding, self.errors),
                                        fip.contents.fh)
        plus = flags & _READDIR_PLUS
        st = mfusepy.c_stat()
        for index in range(offset, len(items)):
            name, attrs, _ = items[index]
            ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
            fill = 0
            if isinstance(attrs, dict):
                if plus:
                    mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
                    fill = _FILL_DIR_PLUS
                else:
                    st.st_mode = attrs["st_mode"]
            else:
                st.st_mode = attrs
            if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, fill) != 0:
                break
        return 0
