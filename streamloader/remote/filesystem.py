"""``dagshub://owner/repo/path`` as an fsspec filesystem (protocol ``dagshub``, registered via entry point).

Usage::

    import fsspec
    with fsspec.open("dagshub://DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus/data/labels.tsv", "rt",
                     branch="main") as f:
        first = f.readline()
    fs = fsspec.filesystem("dagshub", host="http://127.0.0.1:8080")
    fs.ls("user/repo/data")

storage_options: ``host`` (default ``$DAGSHUB_CLIENT_HOST`` or https://dagshub.com), ``token`` (default: the
usual lookup, see :mod:`streamloader.auth`; none found -> anonymous, which public repos allow), ``branch`` or
``revision``, ``cache_dir``, ``max_concurrency`` (default 32), ``use_cache`` (default True), ``cache_max_size``,
``retry`` (a :class:`~streamloader.remote.client.RetryPolicy` or a dict of its fields, e.g. ``{"attempts": 3}``).
The transport and the cache live in :mod:`streamloader.remote.repo`; this class only maps fsspec primitives.
"""
from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple, Union

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from streamloader.cache import FileCache
from streamloader.remote.client import DagsHubClient
from streamloader.remote.entries import RemoteEntry
from streamloader.remote.repo import RemoteRepo
from streamloader.remote.retry import RetryPolicy
from streamloader.remote.urls import RepoRef, normalize_host, split_credentials, split_repo_path

__all__ = ["DagsHubFileSystem"]

# Files up to this size are downloaded whole into the cache on open(); larger ones are range-read in blocks so
# that a multi-GB tar shard never sits in memory or needs to be fully on disk before reading starts.
WHOLE_FILE_MAX = 256 * 1024 * 1024


class _ResolveHostFirst(type(AbstractFileSystem)):  # type: ignore[misc]
    """fsspec caches instances by constructor arguments: resolve the default host *before* that lookup, so that
    ``host=None`` with a changed ``$DAGSHUB_CLIENT_HOST`` never returns an instance talking to the old host.
    A ``user:TOKEN@`` in the host becomes ``token=TOKEN`` here, so it never sits in ``storage_options``' host."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not args and kwargs.get("host") is None:
            from streamloader.remote.urls import default_host

            kwargs["host"] = default_host()
        host = args[0] if args else kwargs.get("host")
        if isinstance(host, str) and "@" in host:
            host, url_token = split_credentials(host)
            if args:
                args = (host,) + args[1:]
            else:
                kwargs["host"] = host
            if url_token and len(args) < 2 and kwargs.get("token") is None:
                kwargs["token"] = url_token
        return super().__call__(*args, **kwargs)


class DagsHubFileSystem(AbstractFileSystem, metaclass=_ResolveHostFirst):
    """fsspec filesystem over the DagsHub REST API (see module docstring)."""

    protocol = "dagshub"
    root_marker = ""

    def __init__(self, host: Optional[str] = None, token: Any = None, branch: Optional[str] = None,
                 revision: Optional[str] = None, cache_dir: Optional[str] = None, max_concurrency: int = 32,
                 use_cache: bool = True, cache_max_size: Union[int, str, None] = None,
                 whole_file_max: int = WHOLE_FILE_MAX, retry: Union[RetryPolicy, Dict[str, Any], None] = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if host is None:
            from streamloader.remote.urls import default_host

            host = default_host()
        self.host = normalize_host(host)
        self.token = token
        self.branch = branch
        self.revision = revision
        self.max_concurrency = max_concurrency
        self.whole_file_max = whole_file_max
        self.retry = RetryPolicy(**retry) if isinstance(retry, dict) else retry
        self.cache = FileCache(cache_dir, max_size=cache_max_size) if use_cache else None
        self._repos: Dict[Tuple[str, str], RemoteRepo] = {}
        self._repos_lock = threading.Lock()

    # -- mapping paths to repos -----------------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("dagshub://"):
            path = path[len("dagshub://"):]
        return path.strip("/")

    def repo(self, owner: str, name: str) -> RemoteRepo:
        """The pinned :class:`RemoteRepo` for ``owner/name`` (one per filesystem instance)."""
        key = (owner, name)
        with self._repos_lock:
            repo = self._repos.get(key)
            if repo is None:
                client = DagsHubClient(RepoRef(self.host, owner, name), token=self.token, branch=self.branch,
                                       revision=self.revision, max_concurrency=self.max_concurrency,
                                       retry=self.retry)
                repo = self._repos[key] = RemoteRepo(client, self.cache, use_cache=self.cache is not None)
        return repo

    def _resolve(self, path: str) -> Tuple[RemoteRepo, str, str]:
        owner, name, rel = split_repo_path(self._strip_protocol(path))
        return self.repo(owner, name), rel, f"{owner}/{name}"

    def resolve(self, path: str) -> Tuple[RemoteRepo, str]:
        """``"dagshub://owner/repo/data/x.jpg"`` → (the pinned RemoteRepo of owner/repo, ``"data/x.jpg"``)."""
        repo, rel, _prefix = self._resolve(path)
        return repo, rel

    @staticmethod
    def _as_info(prefix: str, entry: RemoteEntry) -> Dict[str, Any]:
        name = f"{prefix}/{entry.path}" if entry.path else prefix
        return {"name": name, "size": entry.size, "type": "directory" if entry.is_dir else "file",
                "hash": entry.hash, "versioning": entry.versioning}

    # -- fsspec primitives ----------------------------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> List[Any]:
        """A folder's entries (``size`` None where the server lists no sizes; :meth:`info` has the real one)."""
        repo, rel, prefix = self._resolve(path)
        try:
            listing = repo.listing(rel)
        except NotADirectoryError:
            return [self._as_info(prefix, repo.stat(rel)) if detail else f"{prefix}/{rel}"]
        if not detail:
            return [f"{prefix}/{rel}/{name}" if rel else f"{prefix}/{name}" for name in listing.names()]
        return [self._as_info(prefix, e) for e in listing.sorted_entries()]

    def info(self, path: str, **kwargs: Any) -> Dict[str, Any]:
        """The entry of one path, with a file's real size (asked for that path alone when not known yet)."""
        repo, rel, prefix = self._resolve(path)
        return self._as_info(prefix, repo.stat(rel))

    def du(self, path: Any, total: bool = True, maxdepth: Optional[int] = None, withdirs: bool = False,
           **kwargs: Any) -> Any:
        """Space used by the files under ``path`` (fsspec semantics). dagshub.com lists folders without sizes, so
        each file whose listed size is unknown is asked for its own (``max_concurrency`` at a time) instead of
        failing or counting it as 0."""
        found = self.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=True, **kwargs)
        unknown = [name for name, info in found.items() if info.get("size") is None and info["type"] == "file"]
        if unknown:
            with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(unknown)))) as pool:
                for name, size in zip(unknown, pool.map(lambda n: self.info(n)["size"], unknown)):
                    found[name] = dict(found[name], size=size)
        sizes = {name: info.get("size") or 0 for name, info in found.items()}
        return sum(sizes.values()) if total else sizes

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
            return True
        except (FileNotFoundError, ValueError):
            return False

    def ukey(self, path: str) -> str:
        info = self.info(path)
        return info.get("hash") or super().ukey(path)

    def cat_file(self, path: str, start: Optional[int] = None, end: Optional[int] = None, **kwargs: Any) -> bytes:
        repo, rel, _prefix = self._resolve(path)
        if start is None and end is None:
            return repo.read_bytes(rel)  # no size needed: the download says it
        size = repo.stat(rel).size
        start, end = _normalize_range(start, end, size)
        if start == 0 and end == size:
            return repo.read_bytes(rel)
        return repo.read_bytes(rel, start, end)

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise", **kwargs: Any) -> Any:
        """Like fsspec's ``cat``, but many files are fetched concurrently (``max_concurrency`` at a time)."""
        paths = self.expand_path(path, recursive=recursive)
        single = len(paths) == 1 and isinstance(path, str) and not self._is_glob_or_dir(path, recursive)
        if single:
            return self.cat_file(paths[0], **kwargs)

        def one(p: str) -> Any:
            try:
                return self.cat_file(p, **kwargs)
            except Exception as exc:  # noqa: BLE001 - fsspec's on_error contract
                if on_error == "raise":
                    raise
                return exc

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(paths)))) as pool:
            results = list(pool.map(one, paths))
        out = {}
        for p, r in zip(paths, results):
            if isinstance(r, Exception) and on_error == "omit":
                continue
            out[p] = r
        return out

    def _is_glob_or_dir(self, path: str, recursive: bool) -> bool:
        from glob import has_magic

        return has_magic(path) or recursive or self.isdir(path)

    def get_file(self, rpath: str, lpath: str, callback: Any = None, outfile: Any = None, **kwargs: Any) -> None:
        repo, rel, _prefix = self._resolve(rpath)
        if repo.info(rel).is_dir:
            import os

            os.makedirs(lpath, exist_ok=True)
            return
        with repo.open(rel) as src:
            if outfile is not None:
                shutil.copyfileobj(src, outfile, 1 << 20)
            else:
                with open(lpath, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

    def get(self, rpath: Any, lpath: Any, recursive: bool = False, **kwargs: Any) -> None:
        """Download many files concurrently (fsspec semantics for paths)."""
        from fsspec.utils import other_paths

        rpaths = self.expand_path(rpath, recursive=recursive)
        lpaths = other_paths(rpaths, lpath, exists=False) if not isinstance(lpath, list) else lpath
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(rpaths)))) as pool:
            list(pool.map(lambda pair: self.get_file(*pair), zip(rpaths, lpaths)))

    def local_path(self, path: str) -> str:
        """Download into the cache if needed and return the local cached path (read-only; do not modify)."""
        repo, rel, _prefix = self._resolve(path)
        return repo.local_path(rel)

    def prefetch(self, paths: List[str], max_concurrency: Optional[int] = None, progress: bool = True,
                 on_error: str = "raise", processes: Optional[int] = None, wait: bool = True) -> Any:
        """Warm the cache for many ``owner/repo/path`` files of one repo concurrently (see RemoteRepo.prefetch;
        ``wait=False`` returns a PrefetchJob that downloads in the background)."""
        resolved = [self._resolve(p) for p in paths]
        repos = {id(r): r for r, _rel, _prefix in resolved}
        if len(repos) > 1:
            raise ValueError("prefetch: all paths must belong to one repository")
        if not resolved:
            from streamloader.remote.prefetch import PrefetchJob, PrefetchResult, settle

            return settle(PrefetchJob.finished(PrefetchResult()), wait)
        repo = resolved[0][0]
        return repo.prefetch([rel for _r, rel, _p in resolved], max_concurrency, progress, on_error,
                             processes=processes, wait=wait)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> Any:
        if mode != "rb":
            raise PermissionError(f"dagshub:// is read-only (mode {mode!r})")
        repo, rel, _prefix = self._resolve(path)
        entry = repo.stat(rel)
        if entry.is_dir:
            raise IsADirectoryError(21, "Is a directory", path)
        if entry.size <= self.whole_file_max or (repo.cache is not None and repo.cached_path(rel)):
            return repo.open(rel)  # the whole file, verified (in the cache, or in memory without one)
        return DagsHubRangeFile(self, path, mode="rb", block_size=block_size or 8 * 1024 * 1024,
                                cache_options=cache_options, size=entry.size, repo=repo, rel=rel)


class DagsHubRangeFile(AbstractBufferedFile):
    """Random-access reads of a large remote file through HTTP ranges (bounded memory, readahead blocks)."""

    def __init__(self, fs: DagsHubFileSystem, path: str, repo: RemoteRepo, rel: str, **kwargs: Any):
        self._repo, self._rel = repo, rel
        super().__init__(fs, path, cache_type="readahead", **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self._repo.read_bytes(self._rel, start, min(end, self.size))  # a bucket object's URL differs


def _normalize_range(start: Optional[int], end: Optional[int], size: int) -> Tuple[int, int]:
    start = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
    end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
    return start, max(start, end)
