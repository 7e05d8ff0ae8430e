"""The functions installed in place of ``open``, ``os.open``, ``os.stat``, ``os.lstat``, ``os.listdir``,
``os.scandir``, ``os.mkdir``, ``os.utime``, ``os.access`` and ``os.listxattr``.

The local filesystem always answers first, through the original function and with no other work beforehand (that
is what keeps the hooks' cost on unrelated files to a function call). Only a local ``FileNotFoundError`` — or, for
listings and writes, any call — maps the path with :func:`streamloader.hooks.router.resolve`; file descriptors,
``dir_fd=`` calls and paths outside every hooked root then behave exactly as without hooks. Under a root:

- reads of a remote file open the verified file in the cache (same mode, encoding, buffering: a real file object);
- a path missing in both places raises the very ``FileNotFoundError`` the local call raised;
- listings are the union of the local and the remote directory;
- writes always go to a local file. When its local parent directory is missing but exists in the repo, the parent
  is created locally first; appending to (or ``r+`` on) a file that exists only in the repo first copies the repo's
  content to the local file; ``x`` mode on a file that exists in the repo raises ``FileExistsError``; a repo
  folder cannot be opened for writing (``IsADirectoryError``) nor made again (``os.mkdir``: ``FileExistsError``).
  ``os.open`` follows the same rules (``Path.touch`` goes through it), ``os.utime`` of a repo-only file copies it
  locally first (``touch`` then keeps its content), ``os.access`` answers for repo entries as for a read-only
  checkout that writes go beside, and ``os.listxattr`` lists none for them (``shutil.copy2`` works);
- a path that ends with ``/`` (or ``/.``) names a folder: a repo file by that name is ``NotADirectoryError``, as on
  disk (the rest of the mapping is lexical: ``a/../b`` is ``b`` whether or not ``a`` exists).

The wrappers keep working after ``uninstall_hooks()`` (as plain pass-throughs) so that modules which copied them
while hooks were on (``from os import stat``) are never broken.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import shutil
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

from streamloader.hooks.entries import RemoteDirEntry, ScandirIterator, remote_stat
from streamloader.hooks.router import resolve

if TYPE_CHECKING:
    from streamloader.hooks.router import HookedRoot
    from streamloader.remote.entries import RemoteEntry
    from streamloader.remote.listings import DirListing

log = logging.getLogger(__name__)

__all__ = ["open", "os_open", "stat", "lstat", "listdir", "scandir", "mkdir", "utime", "access", "listxattr",
           "originals", "capture_originals"]

Route = Tuple["HookedRoot", str]

# The real functions. Refreshed by capture_originals() at the first install (someone may have wrapped them since
# import); kept after uninstall because copies of our wrappers may live on in other modules.
_open = io.open
_stat = os.stat
_lstat = os.lstat
_listdir = os.listdir
_scandir = os.scandir
_mkdir = os.mkdir
_os_open = os.open
_utime = os.utime
_access = os.access
_listxattr = getattr(os, "listxattr", None)

_WRITE_CHARS = frozenset("wax+")
_READ_MODES = frozenset(("r", "rb", "rt", "br", "tr"))
_guard = threading.local()  # depth > 0 while this thread does our own I/O: nested calls pass straight through


def capture_originals(originals: Dict[str, Any]) -> None:
    """Point the wrappers at ``originals`` (name → function, names as in :func:`originals`)."""
    globals().update({f"_{name}": fn for name, fn in originals.items()})


def originals() -> Dict[str, Any]:
    """The functions the wrappers currently delegate to, by name."""
    return {"open": _open, "stat": _stat, "lstat": _lstat, "listdir": _listdir, "scandir": _scandir,
            "mkdir": _mkdir, "os_open": _os_open, "utime": _utime, "access": _access, "listxattr": _listxattr}


@contextmanager
def _inside() -> Iterator[None]:
    _guard.depth = getattr(_guard, "depth", 0) + 1
    try:
        yield
    finally:
        _guard.depth -= 1


def _may_go_remote(hook: "HookedRoot", rel: str) -> bool:
    return not getattr(_guard, "depth", 0) and not hook.excluded(rel)


def _remote_entry(hook: "HookedRoot", rel: str, sized: bool = False) -> Optional["RemoteEntry"]:
    """The repo's entry for ``rel`` (``sized``: with the file's real size); None when it is missing, excluded, or
    we are inside our own I/O."""
    if not _may_go_remote(hook, rel):
        return None
    with _inside():
        try:
            return hook.repo.stat(rel) if sized else hook.repo.info(rel)
        except (FileNotFoundError, ValueError):  # ValueError: a local name no repo path can have (backslash)
            return None


def _remote_listing(hook: "HookedRoot", rel: str) -> Optional["DirListing"]:
    """The repo's listing of folder ``rel``; None when it is missing (or a file), excluded, or inside our I/O."""
    if not _may_go_remote(hook, rel):
        return None
    with _inside():
        try:
            return hook.repo.listing(rel)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None


def _local_path(hook: "HookedRoot", rel: str) -> str:
    return os.path.join(hook.root, rel) if rel else hook.root


def _make_local_parent(hook: "HookedRoot", rel: str) -> bool:
    """Create the local parent directory of ``rel`` when the repo has it; False when the repo does not either."""
    parent = posixpath.dirname(rel)
    if not rel or (parent and not getattr(_remote_entry(hook, parent), "is_dir", False)):
        return False
    with _inside():
        os.makedirs(_local_path(hook, parent), exist_ok=True)
    log.debug("created local directory %s (it exists in the repository)", _local_path(hook, parent))
    return True


def _errno_error(cls: type, code: int, filename: Any) -> OSError:
    return cls(code, os.strerror(code), filename)


def _names_a_folder(path: Any) -> bool:
    """Whether ``path`` ends with ``/`` or ``/.``: on disk it then names a folder, whatever its last part is."""
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    return text.endswith(("/", "/.")) or text == "."


def _not_a_folder(entry: Optional["RemoteEntry"], path: Any) -> None:
    """NotADirectoryError when ``path`` names a folder (:func:`_names_a_folder`) and ``entry`` is a repo file."""
    if entry is not None and entry.type != "dir" and _names_a_folder(path):
        raise _errno_error(NotADirectoryError, errno.ENOTDIR, os.fspath(path))


# -- open -----------------------------------------------------------------------------------------------------------
def open(file: Any, mode: str = "r", buffering: int = -1, encoding: Optional[str] = None,  # noqa: A001
         errors: Optional[str] = None, newline: Optional[str] = None, closefd: bool = True, opener: Any = None) -> Any:
    """``open()`` that also reads files of a hooked repository (see the module docstring)."""
    if mode in _READ_MODES or (type(mode) is str and _WRITE_CHARS.isdisjoint(mode)):
        # Reads try the local file first, with no other work: a path is only mapped once it is missing locally.
        try:
            return _open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        except FileNotFoundError as exc:
            local_error = exc
        route = resolve(file)
        if route is None:
            raise local_error
        return _open_remote(route, local_error, mode, buffering, encoding, errors, newline, closefd, opener)
    route = resolve(file)
    if route is None:
        return _open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    return _open_for_write(route[0], route[1], file, mode, buffering, encoding, errors, newline, closefd, opener)


def _open_remote(route: Route, local_error: FileNotFoundError, mode: str, *rest: Any) -> Any:
    hook, rel = route
    if not _may_go_remote(hook, rel):
        raise local_error
    if _names_a_folder(local_error.filename):  # "file/": whatever it is, no file can be opened by that name
        entry = _remote_entry(hook, rel)
        if entry is None:
            raise local_error
        _not_a_folder(entry, local_error.filename)
        raise _errno_error(IsADirectoryError, errno.EISDIR, local_error.filename)
    # straight to the download (no listing, no stat): the answer says whether it is a file, a folder or missing
    with _inside():
        try:
            handle = hook.repo.open(rel, lambda cached: _open(cached, mode, *rest))
        except IsADirectoryError:
            raise _errno_error(IsADirectoryError, errno.EISDIR, local_error.filename) from None
        except (FileNotFoundError, ValueError):
            raise local_error from None
    _rename(handle, local_error.filename)
    return handle


def _rename(handle: Any, name: Any) -> None:
    """Give an opened cache file the name the caller opened it by (what ``open`` reports as ``f.name``)."""
    raw = getattr(getattr(handle, "buffer", handle), "raw", getattr(handle, "buffer", handle))
    try:
        raw.name = name
    except AttributeError:  # pragma: no cover - a file type without a settable name: keep the cache path
        pass


def _repo_file_to_write(hook: "HookedRoot", rel: str, path: Any, exclusive: bool) -> bool:
    """For a write to ``path``, missing locally: whether the repo has a file there (its content may be wanted
    first). A repo folder is IsADirectoryError ("file/" on a repo file NotADirectoryError), and an exclusive
    create of a repo file FileExistsError, as on disk."""
    entry = _remote_entry(hook, rel)
    if entry is None:
        return False
    name = os.fspath(path)
    _not_a_folder(entry, name)
    if entry.type == "dir":
        raise _errno_error(IsADirectoryError, errno.EISDIR, name)
    if exclusive:
        raise _errno_error(FileExistsError, errno.EEXIST, name)
    return True


def _open_for_write(hook: "HookedRoot", rel: str, file: Any, mode: str, *rest: Any) -> Any:
    try:  # whether (and what) the file already is matters: locally it simply is opened
        _stat(file)
        return _open(file, mode, *rest)
    except FileNotFoundError:
        pass
    if _repo_file_to_write(hook, rel, file, "x" in mode) and "w" not in mode:
        _materialize(hook, rel)  # "a", "r+": the repo's content first ("w" starts it empty anyway)
    try:
        return _open(file, mode, *rest)
    except FileNotFoundError:
        if "r" in mode or not _make_local_parent(hook, rel):  # "r+" creates nothing, so needs no parent either
            raise
    return _open(file, mode, *rest)


def _materialize(hook: "HookedRoot", rel: str) -> None:
    """Copy a repo file to its local path (before appending to it or updating it in place)."""
    _make_local_parent(hook, rel)
    with _inside():
        shutil.copyfile(hook.repo.local_path(rel), _local_path(hook, rel))
    log.info("copied %s from the repository to a local file before writing to it", rel)


# -- stat -----------------------------------------------------------------------------------------------------------
def stat(path: Any, *, dir_fd: Optional[int] = None, follow_symlinks: bool = True) -> os.stat_result:
    """``os.stat`` that reports repo files (real size, mode 0o100444) and directories (S_IFDIR)."""
    try:
        # Keyword arguments cost ~10% of a bare stat call: pass them only when they are not the defaults.
        if dir_fd is None and follow_symlinks:
            return _stat(path)
        return _stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    except FileNotFoundError as exc:
        local_error = exc
    return _stat_remote(path, dir_fd, local_error)


def lstat(path: Any, *, dir_fd: Optional[int] = None) -> os.stat_result:
    """``os.lstat``: like :func:`stat` (repo entries are never symlinks)."""
    try:
        return _lstat(path) if dir_fd is None else _lstat(path, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        local_error = exc
    return _stat_remote(path, dir_fd, local_error)


def _stat_remote(path: Any, dir_fd: Optional[int], local_error: FileNotFoundError) -> os.stat_result:
    route = resolve(path) if dir_fd is None else None  # dir_fd-relative paths are never mapped
    entry = _remote_entry(*route, sized=True) if route is not None else None
    if entry is None:
        raise local_error
    _not_a_folder(entry, path)
    return remote_stat(route[0], entry)


# -- listings -------------------------------------------------------------------------------------------------------
def _merged(route: Route, local: Optional[List[Any]], local_error: Optional[OSError],
            name_of: Any) -> Tuple[List[Any], List[Tuple[str, "RemoteEntry"]]]:
    """(local items, remote-only (name, entry) pairs in name order) or raise like the local call would."""
    hook, rel = route
    remote = _remote_listing(hook, rel)
    if remote is None:
        if local_error is None:
            return local or [], []
        entry = _remote_entry(hook, rel)
        if entry is not None and entry.type != "dir":
            raise _errno_error(NotADirectoryError, errno.ENOTDIR, local_error.filename)
        raise local_error
    seen = {name_of(item) for item in local or ()}
    extra = [(name, entry) for name, entry in remote.items()  # in name order already
             if name not in seen and not hook.excluded_child(rel, name)]
    return local or [], extra


def _merged_names(route: Route, local: Optional[List[Any]], local_error: Optional[OSError],
                  name_of: Any) -> Tuple[List[Any], List[str]]:
    """Like :func:`_merged` with names only (``os.listdir`` of a 540k-entry folder needs no entry objects)."""
    hook, rel = route
    remote = _remote_listing(hook, rel)
    if remote is None:
        return _merged(route, local, local_error, name_of)[0], []
    seen = {name_of(item) for item in local or ()}
    return local or [], [name for name in remote.names() if name not in seen and not hook.excluded_child(rel, name)]


def listdir(path: Any = None) -> List[Any]:
    """``os.listdir``: under a hooked root, the union of the local and the repo directory."""
    route = resolve("." if path is None else path)
    if route is None:
        return _listdir(path)
    local, local_error = None, None
    try:
        local = _listdir(path)
    except FileNotFoundError as exc:
        local_error = exc
    want_bytes = path is not None and isinstance(os.fspath(path), bytes)
    local_names, extra = _merged_names(route, local, local_error, os.fsdecode if want_bytes else str)
    if want_bytes:
        return local_names + [os.fsencode(name) for name in extra]
    return local_names + extra


def scandir(path: Any = None) -> Any:
    """``os.scandir``: under a hooked root, local DirEntry objects plus RemoteDirEntry for repo-only names."""
    route = resolve("." if path is None else path)
    if route is None:
        return _scandir(path)
    local, local_error = None, None
    try:
        with _scandir(path) as it:
            local = list(it)
    except FileNotFoundError as exc:
        local_error = exc
    base = "." if path is None else os.fspath(path)
    as_bytes = isinstance(base, bytes)
    local_entries, extra = _merged(route, local, local_error,
                                   (lambda e: os.fsdecode(e.name)) if as_bytes else (lambda e: e.name))
    base_str = os.fsdecode(base)
    prefix = base_str if base_str.endswith("/") else base_str + "/"
    remote_entries = []
    for name, entry in extra:
        child = prefix + name
        if as_bytes:
            remote_entries.append(RemoteDirEntry(os.fsencode(name), os.fsencode(child), route[0], entry))
        else:
            remote_entries.append(RemoteDirEntry(name, child, route[0], entry))
    return ScandirIterator(local_entries + remote_entries)


# -- directories ----------------------------------------------------------------------------------------------------
def mkdir(path: Any, mode: int = 0o777, *, dir_fd: Optional[int] = None) -> None:
    """``os.mkdir``: a missing local parent that exists in the repo is created locally first; a folder (or file)
    the repo has already exists (``FileExistsError``, as in a checkout: ``os.makedirs(exist_ok=True)`` is then
    content, and a file written into it makes the local folder)."""
    route = resolve(path) if dir_fd is None and not getattr(_guard, "depth", 0) else None
    if route is not None and route[1]:
        try:
            _lstat(path)
        except FileNotFoundError:
            if _remote_entry(*route) is not None:
                raise _errno_error(FileExistsError, errno.EEXIST, os.fspath(path)) from None
        except OSError:
            pass
    try:
        return _mkdir(path, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        if route is None or not _make_local_parent(*route):
            raise
    return _mkdir(path, mode)


# -- os.open, utime, access, listxattr -------------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Optional[int] = None) -> int:
    """``os.open``: reads of a repo file open its cached copy; writes follow :func:`open`'s rules (a repo-only
    file is copied locally first unless truncated, ``O_EXCL`` on it is ``FileExistsError``, a repo folder is not
    a file) -- so ``Path.touch`` keeps a repo file's content."""
    if dir_fd is not None or getattr(_guard, "depth", 0):
        return _os_open(path, flags, mode, dir_fd=dir_fd)
    if not flags & _WRITE_FLAGS:
        try:
            return _os_open(path, flags, mode)
        except FileNotFoundError as exc:
            local_error = exc
        route = resolve(path)
        entry = _remote_entry(*route) if route is not None else None
        if entry is None:
            raise local_error
        _not_a_folder(entry, path)
        if entry.type == "dir":
            raise local_error  # (no local folder to give a descriptor of)
        with _inside():
            cached = route[0].repo.local_path(route[1])
        return _os_open(cached, flags, mode)
    route = resolve(path)
    if route is None:
        return _os_open(path, flags, mode)
    hook, rel = route
    try:
        _lstat(path)
        return _os_open(path, flags, mode)
    except FileNotFoundError:
        pass
    if _repo_file_to_write(hook, rel, path, bool(flags & os.O_CREAT and flags & os.O_EXCL)):
        if not flags & os.O_TRUNC:
            _materialize(hook, rel)
        elif not flags & os.O_CREAT:  # truncating a file that is only in the repo: it is there, so make it here
            flags |= os.O_CREAT
    try:
        return _os_open(path, flags, mode)
    except FileNotFoundError:
        if not flags & os.O_CREAT or not _make_local_parent(hook, rel):
            raise
    return _os_open(path, flags, mode)


def utime(path: Any, *args: Any, **kwargs: Any) -> None:
    """``os.utime``: a file that is only in the repo is copied locally first (then its local copy is touched, as
    a checkout's file would be); a repo-only folder is made locally."""
    try:
        return _utime(path, *args, **kwargs)
    except FileNotFoundError as exc:
        local_error = exc
    route = resolve(path) if kwargs.get("dir_fd") is None and not isinstance(path, int) else None
    entry = _remote_entry(*route) if route is not None else None
    if entry is None:
        raise local_error
    _not_a_folder(entry, path)
    if entry.type == "dir":
        with _inside():
            os.makedirs(_local_path(*route), exist_ok=True)
    else:
        _materialize(*route)
    return _utime(path, *args, **kwargs)


def access(path: Any, mode: int, *, dir_fd: Optional[int] = None, effective_ids: bool = False,
           follow_symlinks: bool = True) -> bool:
    """``os.access``: a repo entry exists and reads; writes to it go to a local file (so it is writable); a repo
    folder can be entered, a repo file not executed."""
    if dir_fd is None and not effective_ids and follow_symlinks:
        if _access(path, mode):
            return True
    elif _access(path, mode, dir_fd=dir_fd, effective_ids=effective_ids, follow_symlinks=follow_symlinks):
        return True
    try:
        _lstat(path) if dir_fd is None else _lstat(path, dir_fd=dir_fd)
        return False  # it is here, and the system said no
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError):
        return False
    route = resolve(path) if dir_fd is None and not isinstance(path, int) else None
    entry = _remote_entry(*route) if route is not None else None
    if entry is None or (entry.type != "dir" and _names_a_folder(path)):
        return False
    return not mode & os.X_OK or entry.type == "dir"


def listxattr(path: Any = None, *, follow_symlinks: bool = True) -> List[str]:
    """``os.listxattr``: a repo entry has no extended attributes (``shutil.copy2`` asks, and takes none)."""
    assert _listxattr is not None
    try:
        return _listxattr(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError as exc:
        local_error = exc
    route = resolve(path) if path is not None and not isinstance(path, int) else None
    if route is None or _remote_entry(*route) is None:
        raise local_error
    return []
