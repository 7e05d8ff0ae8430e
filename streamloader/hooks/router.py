"""Which hooked repository (if any) a local path belongs to: the registry of hooked roots, path → (root, rel).

:func:`resolve` runs for every listing and for every local miss (``FileNotFoundError``) while hooks are installed,
so the state is one immutable :class:`RouteTable` swapped atomically on every change (readers take no lock), and an
absolute path outside every root is rejected with one string test. Paths are mapped lexically after
normalization (POSIX; symlinks inside a root are not followed); a root is also hooked under its realpath, which is
what ``os.getcwd()`` reports.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

from streamloader import _forksafe, _realos

if TYPE_CHECKING:
    from streamloader.remote.prefetch import PrefetchResult
    from streamloader.remote.repo import RemoteRepo

__all__ = ["HookConfig", "HookedRoot", "RouteTable", "resolve", "hooked", "add", "remove", "lock"]

# Never looked up remotely, wherever they sit under a root: git/DVC internals (the official client's rule) and
# virtualenvs, whose interpreter probes thousands of paths that no dataset repo has.
_PASSTHROUGH_NAMES = frozenset((".git", ".dvc", "site-packages"))


@dataclass(frozen=True)
class HookConfig:
    """What ``install_hooks`` was asked for (no token: this travels to child processes in an env variable)."""

    project_root: str
    repo_url: str
    branch: Optional[str] = None
    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    exclude_globs: Tuple[str, ...] = ()
    max_concurrency: int = 32
    timeout: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data["exclude_globs"] = list(self.exclude_globs)
        return data

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "HookConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["exclude_globs"] = tuple(known.get("exclude_globs") or ())
        return cls(**known)


def _glob_matcher(pattern: str) -> Tuple[bool, Tuple[str, ...]]:
    """``"data/*.npy"`` → (anchored, parts). Unanchored patterns match from the right, like PurePath.match."""
    anchored = pattern.startswith("/")
    parts = tuple(p for p in pattern.strip("/").split("/") if p)
    return anchored, parts


@dataclass(eq=False)
class HookedRoot:
    """One hooked ``project_root`` ↔ one repository at one pinned commit. Returned by ``install_hooks``.

    Usable as a context manager (``with install_hooks(...):``) and picklable (spawned workers re-install it).
    ``repr`` never shows the token.
    """

    config: HookConfig
    repo: "RemoteRepo"
    inherited: bool = False  # installed in this process from a parent's config (spawn or env)
    root: str = field(init=False)
    aliases: Tuple[str, ...] = field(init=False)
    st_dev: int = field(init=False, default=0)
    _globs: Tuple[Tuple[bool, Tuple[str, ...]], ...] = field(init=False, default=())
    _cache_rel: Optional[str] = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.root = self.config.project_root
        real = os.path.realpath(self.root)
        # A root reached through a symlink is hooked under both spellings: os.getcwd() reports the real one.
        self.aliases = (self.root,) if real == self.root else (self.root, real)
        try:
            self.st_dev = os.stat(self.root).st_dev
        except OSError:
            self.st_dev = 0
        self._globs = tuple(_glob_matcher(g) for g in self.config.exclude_globs)
        cache_root = getattr(self.repo.cache, "root", None)
        for alias in self.aliases:
            if cache_root and (cache_root + "/").startswith(alias + "/"):
                # a cache kept inside the project must never be looked up remotely (it would recurse)
                self._cache_rel = cache_root[len(alias) + 1:]

    # -- policy ---------------------------------------------------------------------------------------------------
    def excluded(self, rel: str) -> bool:
        """True when ``rel`` (or one of its parents) must never be looked up in the repository."""
        parts = rel.split("/") if rel else []
        if _PASSTHROUGH_NAMES.intersection(parts):
            return True
        if self._cache_rel is not None and (rel + "/").startswith(self._cache_rel + "/"):
            return True
        for anchored, pattern in self._globs:
            for end in range(len(parts), 0, -1):  # the path and each of its parents
                if _parts_match(parts[:end], anchored, pattern):
                    return True
        return False

    def excluded_child(self, dir_rel: str, name: str) -> bool:
        """``excluded`` for an entry of a listing whose directory is known not to be excluded (cheaper)."""
        if name in _PASSTHROUGH_NAMES:
            return True
        if not self._globs and self._cache_rel is None:
            return False
        rel = f"{dir_rel}/{name}" if dir_rel else name
        parts = rel.split("/")
        if self._cache_rel is not None and (rel + "/").startswith(self._cache_rel + "/"):
            return True
        return any(_parts_match(parts, anchored, pattern) for anchored, pattern in self._globs)

    def inode(self, rel: str) -> int:
        """A stable 63-bit inode number for a remote path (distinct paths → distinct numbers, in practice)."""
        digest = hashlib.blake2b(f"{self.config.repo_url}\0{rel}".encode("utf-8", "surrogateescape"),
                                 digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1

    # -- public handle --------------------------------------------------------------------------------------------
    @property
    def revision(self) -> str:
        """The commit sha every read of this root comes from."""
        return self.repo.revision()

    def uninstall(self) -> None:
        """Remove this root's hooks (no-op when already removed)."""
        from streamloader.hooks.install import uninstall_one  # the lifecycle sits above the routing table

        uninstall_one(self)

    def relative(self, path: Any) -> Optional[str]:
        """``path`` (as given to open()) relative to this root ("" for the root itself); None outside it."""
        full = _absolute(path)
        if full is None:
            return None
        for alias in self.aliases:
            if full == alias:
                return ""
            if full.startswith(alias) and full[len(alias)] == "/":
                return full[len(alias) + 1:]
        return None

    def prefetch(self, paths: Iterable[Any], max_concurrency: Optional[int] = None, progress: bool = True,
                 on_error: str = "raise", processes: Optional[int] = None, wait: bool = True) -> Any:
        """Warm the cache for ``paths`` under this root (as you would pass them to open()): local files are
        skipped; a path outside the root or matching ``exclude_globs`` is a failure (ValueError), raised or, with
        ``on_error="skip"``, recorded in ``result.failed`` under the path as given. Other arguments: see
        :meth:`RemoteRepo.prefetch` (``wait=False`` returns a PrefetchJob)."""
        from streamloader.remote.prefetch import PrefetchJob, settle  # the fetching stack loads only when used

        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        rels: Dict[str, str] = {}
        failed: Dict[str, BaseException] = {}
        for given in paths:
            shown = os.fsdecode(os.fspath(given))
            rel = self.relative(given)
            if rel is None:
                failed[shown] = ValueError(f"{shown!r} is not under the hooked project root {self.root}")
            elif self.excluded(rel):
                failed[shown] = ValueError(f"{shown!r} matches the exclude_globs of {self.root}: it is never fetched")
            elif not _realos.exists_locally(given, follow_symlinks=False):  # open() serves a local file
                rels[rel] = shown
        if failed and on_error == "raise":
            raise next(iter(failed.values()))
        job = self.repo.prefetch(list(rels), max_concurrency, progress, "skip", processes=processes, wait=False)

        def merge(_cancelled: Any) -> "PrefetchResult":
            result = job.result()
            result.failed = {**failed, **{rels[rel]: exc for rel, exc in result.failed.items()}}
            return result

        return settle(PrefetchJob(merge, on_error, on_cancel=job.cancel), wait)

    def __enter__(self) -> "HookedRoot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def __repr__(self) -> str:
        client = self.repo.client
        sha = client.revision if client.is_resolved else None  # never a request from repr
        return (f"HookedRoot(project_root={self.root!r}, repo_url={self.config.repo_url!r}, "
                f"revision={sha or self.config.revision or self.config.branch!r})")

    def __getstate__(self) -> Dict[str, Any]:
        return {"config": self.config, "repo": self.repo}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.config, self.repo, self.inherited = state["config"], state["repo"], True
        self.__post_init__()


def _parts_match(parts: List[str], anchored: bool, pattern: Tuple[str, ...]) -> bool:
    if len(parts) < len(pattern) or (anchored and len(parts) != len(pattern)):
        return False
    tail = parts[len(parts) - len(pattern):]
    return all(fnmatch.fnmatchcase(part, pat) for part, pat in zip(tail, pattern))


@dataclass(frozen=True)
class RouteTable:
    """An immutable snapshot of the hooked roots, read without locks by every wrapped call."""

    prefixes: Tuple[str, ...]  # every spelling of every root, without a trailing slash
    roots: Tuple[Tuple[str, HookedRoot], ...]  # (spelling, hook), longest first


_lock = threading.RLock()
_hooks: Dict[str, HookedRoot] = {}
_table: Optional[RouteTable] = None  # None while nothing is hooked


def _rebuild() -> None:
    global _table
    if not _hooks:
        _table = None
        return
    roots = tuple(sorted(((alias, hook) for hook in _hooks.values() for alias in hook.aliases),
                         key=lambda item: -len(item[0])))
    _table = RouteTable(tuple(alias for alias, _hook in roots), roots)


def hooked() -> List[HookedRoot]:
    """The active hooks, in installation order."""
    return list(_hooks.values())


def add(hook: HookedRoot) -> None:
    """Register ``hook`` (the caller checked for overlaps under ``lock``)."""
    with _lock:
        _hooks[hook.root] = hook
        _rebuild()


def remove(hook: HookedRoot) -> bool:
    """Unregister ``hook``; False if it was not registered."""
    with _lock:
        if _hooks.get(hook.root) is not hook:
            return False
        del _hooks[hook.root]
        _rebuild()
        return True


def lock() -> threading.RLock:
    """The registry lock: held across overlap check + registration so concurrent installs cannot both win."""
    return _lock


def _reset_lock_after_fork() -> None:
    # A fork while another thread held the lock would leave the child's copy locked forever.
    global _lock
    _lock = threading.RLock()


_forksafe.register(after_in_child=_reset_lock_after_fork)


def _absolute(path: Any, prefixes: Optional[Tuple[str, ...]] = None) -> Optional[str]:
    """``path`` (str, bytes or PathLike) as a normalized absolute POSIX path; None for ints, empty paths, a
    relative path when the cwd is gone, and (given ``prefixes``) an absolute one that cannot lie under any of them."""
    if type(path) is not str:
        if isinstance(path, int):
            return None
        try:
            path = os.fspath(path)
        except TypeError:
            return None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif not isinstance(path, str):
            return None
    if not path:
        return None
    if path[0] == "/":
        # One C call settles the common miss; only a spelling that normalizes differently ("..", "./", "//") may
        # still lead into a root without starting with it.
        if prefixes is not None and not path.startswith(prefixes) and "/." not in path and "//" not in path:
            return None
        return posixpath.normpath(path)
    try:
        cwd = os.getcwd()  # read per call, not cached: only listings and local misses get this far
    except OSError:  # the cwd was deleted: a relative path means nothing remote
        return None
    return posixpath.normpath(cwd + "/" + path)


def resolve(path: Any) -> Optional[Tuple[HookedRoot, str]]:
    """``(hook, "data/x.jpg")`` when ``path`` (str, bytes or PathLike) lies under a hooked root, else None.

    ``rel`` is "" for the root itself. Ints (file descriptors), empty paths and paths outside every root give None.
    """
    table = _table
    if table is None:
        return None
    full = _absolute(path, table.prefixes)
    if full is None:
        return None
    for alias, hook in table.roots:
        if full.startswith(alias):
            if len(full) == len(alias):
                return hook, ""
            if full[len(alias)] == "/":
                return hook, full[len(alias) + 1:]
    return None
