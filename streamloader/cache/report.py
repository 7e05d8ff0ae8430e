"""What the cache holds, part by part and per repository, and clearing all of it — without creating anything.

The cache root (see :mod:`streamloader.cache`) has these parts::

    objects/    downloaded files, content-addressed          listings/  directory listings per repository and commit
    features/   feature vectors per extractor                 tmp/       downloads in progress
    locks/      entry locks (never removed: other processes may hold them)

``cache_report`` only reads (a missing root is reported as empty, not created); it knows the on-disk layout of
listings (:mod:`streamloader.remote.listings`: one SQLite file per commit, opened read-only) and features
(:mod:`streamloader.data.feature_cache`) without importing those layers. Usage::

    report = cache_report()                 # default cache dir
    print(report.format())                  # per part, per repository, per feature extractor
    report.total_bytes, report.parts["objects"].files
    clear_cache()                           # {"objects": 401, "listings": 7, "features": 40, "tmp": 0}
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Set, Tuple

from streamloader._units import human_size, plural

if TYPE_CHECKING:
    from streamloader.cache.store import FileCache

__all__ = ["CachePart", "CacheReport", "RepoUsage", "cache_report", "clear_cache", "clear_parts", "PARTS",
           "REPO_RECORD"]

PARTS = ("objects", "listings", "features", "tmp", "locks")
#: written by RemoteRepo into listings/<repo digest>/ so that a report can name the repository
REPO_RECORD = "repo.json"


@dataclass
class CachePart:
    """Files, their bytes (apparent size) and the disk space they and their directories take (as ``du``)."""

    files: int = 0
    bytes: int = 0
    disk_bytes: int = 0


@dataclass
class RepoUsage:
    """One repository's share: cached commits, listing bytes, and the cached objects its listings name."""

    name: str
    commits: int = 0
    listing_bytes: int = 0
    objects: int = 0
    object_bytes: int = 0


@dataclass
class CacheReport:
    """See module docstring; ``exists`` is False when the root is not there (then everything is zero)."""

    root: str
    exists: bool
    parts: Dict[str, CachePart] = field(default_factory=dict)
    repos: List[RepoUsage] = field(default_factory=list)
    extractors: Dict[str, CachePart] = field(default_factory=dict)
    unlisted_objects: int = 0

    @property
    def total_files(self) -> int:
        return sum(p.files for p in self.parts.values())

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts.values())

    @property
    def disk_bytes(self) -> int:
        return sum(p.disk_bytes for p in self.parts.values())

    def as_dict(self) -> Dict[str, object]:
        """The keys FileCache.info() has always had (``files``/``bytes``: objects), plus every part."""
        objects = self.parts.get("objects", CachePart())
        return {"root": self.root, "files": objects.files, "bytes": objects.bytes,
                "temp_files": self.parts.get("tmp", CachePart()).files, "total_files": self.total_files,
                "total_bytes": self.total_bytes, "disk_bytes": self.disk_bytes,
                "parts": {name: vars(part).copy() for name, part in self.parts.items()}}

    def format(self) -> str:
        """The text ``streamloader cache info`` prints."""
        if not self.exists:
            return f"cache: {self.root}\n(does not exist: nothing is cached)"
        lines = [f"cache: {self.root}", f"{'part':10} {'files':>9} {'size':>10} {'on disk':>10}"]
        for name, part in list(self.parts.items()) + [("total", CachePart(self.total_files, self.total_bytes,
                                                                          self.disk_bytes))]:
            lines.append(f"{name:10} {part.files:>9,} {human_size(part.bytes):>10} {human_size(part.disk_bytes):>10}")
        if self.repos:
            lines.append("repositories (objects their cached listings name; a file shared by two counts for both):")
            for repo in self.repos:
                lines.append(f"  {repo.name}: {plural(repo.commits, 'commit')}, {plural(repo.objects, 'file')} "
                             f"({human_size(repo.object_bytes)}), listings {human_size(repo.listing_bytes)}")
            if self.unlisted_objects:
                lines.append(f"  (not named by any cached listing: {plural(self.unlisted_objects, 'file')})")
        if self.extractors:
            lines.append("features by extractor:")
            for name, part in self.extractors.items():
                lines.append(f"  {name}: {plural(part.files, 'vector')} ({human_size(part.bytes)})")
        return "\n".join(lines)


def _root(cache_dir: Optional[str]) -> str:
    from streamloader.cache.store import default_cache_dir

    return os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()


def _walk(top: str) -> Iterator[Tuple[str, os.stat_result, bool]]:
    """(path, lstat, is a directory) for ``top``'s directories (itself included) and files; vanished ones skipped."""
    for dirpath, _dirs, files in os.walk(top):
        try:
            yield dirpath, os.lstat(dirpath), True
        except OSError:
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                yield path, os.lstat(path), False
            except OSError:
                continue


def _measure(top: str, sizes: Optional[Dict[str, int]] = None) -> CachePart:
    part = CachePart()
    for path, st, is_dir in _walk(top):
        part.disk_bytes += getattr(st, "st_blocks", 0) * 512 or st.st_size
        if not is_dir:
            part.files += 1
            part.bytes += st.st_size
            if sizes is not None:
                sizes[path] = st.st_size
    return part


def cache_report(cache_dir: Optional[str] = None, by_repo: bool = True) -> CacheReport:
    """Measure every part of the cache at ``cache_dir`` (default: the default cache dir); see module docstring.

    ``by_repo`` also reads every cached listing to attribute objects to repositories (about a second per
    million listed files) and reads the extractor names of the feature cache.
    """
    root = _root(cache_dir)
    report = CacheReport(root, os.path.isdir(root))
    if not report.exists:
        report.parts = {name: CachePart() for name in PARTS}
        return report
    sizes: Dict[str, int] = {}
    for name in PARTS:
        report.parts[name] = _measure(os.path.join(root, name), sizes if name == "objects" else None)
    known = {os.path.join(root, name) for name in PARTS}
    other = CachePart()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if path not in known:
            part = _measure(path)
            other.files, other.bytes, other.disk_bytes = (other.files + part.files, other.bytes + part.bytes,
                                                          other.disk_bytes + part.disk_bytes)
    if other.files or other.disk_bytes:
        report.parts["other"] = other
    if by_repo:
        named: Set[str] = set()
        report.repos = _repo_usage(root, sizes, named)
        report.unlisted_objects = len(set(sizes) - named)
        report.extractors = _extractor_usage(os.path.join(root, "features"))
    return report


def _repo_usage(root: str, sizes: Dict[str, int], named: Set[str]) -> List[RepoUsage]:
    usages = []
    listings = os.path.join(root, "listings")
    for digest in sorted(_listdir(listings)):
        repo_dir = os.path.join(listings, digest)
        if not os.path.isdir(repo_dir):
            continue
        ident = _read_json(os.path.join(repo_dir, REPO_RECORD)) or {}
        known = {"host", "owner", "repo"} <= set(ident)
        name = (f"{ident['host']}/{ident['owner']}/{ident['repo']}" if known
                else f"repository {digest} (name not recorded)")
        usage = RepoUsage(name, listing_bytes=_measure(repo_dir).bytes)
        mine: Set[str] = set()
        for file in sorted(_listdir(repo_dir)):
            if not file.endswith(_STORE_SUFFIX):
                continue
            sha = file[:-len(_STORE_SUFFIX)]
            usage.commits += 1
            for parent, entry_name, digest_text, versioning in _stored_files(os.path.join(repo_dir, file)):
                for path in _object_paths(root, ident if known else None, sha, parent, entry_name, digest_text,
                                           versioning):
                    if path in sizes:
                        mine.add(path)
        usage.objects, usage.object_bytes = len(mine), sum(sizes[p] for p in mine)
        named |= mine
        usages.append(usage)
    return usages


_STORE_SUFFIX = ".sqlite"  # listings/<repo>/<commit sha>.sqlite: streamloader.remote.listings.ListingStore


def _stored_files(store: str) -> Iterator[Tuple[str, str, Optional[str], Optional[str]]]:
    """(folder, name, hash, versioning) of every file a listing store knows; nothing when it cannot be read.
    Opened read-only: a report never creates or changes a store."""
    import sqlite3
    from urllib.parse import quote

    for options in ("mode=ro", "immutable=1"):  # immutable: no -shm to open (a store nobody writes any more)
        try:
            conn = sqlite3.connect(f"file:{quote(store)}?{options}", uri=True, timeout=5)
        except sqlite3.Error:
            continue
        try:
            rows = conn.execute("SELECT dir, name, hash, versioning FROM entries WHERE type != 'dir'").fetchall()
        except sqlite3.Error:
            continue
        finally:
            conn.close()
        yield from rows
        return


def _object_paths(root: str, ident: Optional[dict], sha: str, parent: str, name: str, digest: Optional[str],
                  versioning: Optional[str]) -> List[str]:
    """Where the cache may keep that file (RemoteRepo: under its content hash, or under its location when it was
    downloaded before the hash was known)."""
    from streamloader.cache.key import CacheKey

    keys = [CacheKey.from_hash(versioning, str(digest))] if digest else []
    if ident is not None:
        keys.append(CacheKey.from_location(ident["host"], ident["owner"], ident["repo"], sha,
                                           f"{parent}/{name}" if parent else name))
    return [os.path.join(root, "objects", key.kind, key.digest[:2], key.digest) for key in keys]


def _extractor_usage(features: str) -> Dict[str, CachePart]:
    usage: Dict[str, CachePart] = {}
    for fingerprint in sorted(_listdir(features)):
        directory = os.path.join(features, fingerprint)
        if fingerprint == "tmp" or not os.path.isdir(directory):
            continue
        meta = _read_json(os.path.join(directory, "extractor.json")) or {}
        part = CachePart()
        for _path, st, is_dir in _walk(directory):
            if not is_dir and _path.endswith(".npy"):
                part.files += 1
                part.bytes += st.st_size
        usage[f"{meta.get('name') or 'unnamed extractor'} [{fingerprint[:12]}]"] = part
    return usage


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def clear_parts(cache: "FileCache") -> Dict[str, int]:
    """Empty ``cache`` (what :meth:`FileCache.clear` does), counted per part: ``{"objects", "listings",
    "features", "tmp"}`` files removed. Entries being downloaded, feature writes in progress and the locks stay;
    files that vanish meanwhile (another process clearing too) are not an error."""
    cache.flush()
    entries = list(cache._entries())
    removed = {"objects": cache._evict(entries, sum(st.st_size for _p, st in entries), -1)[0]}
    for part in ("listings", "features"):
        removed[part] = 0
        top = os.path.join(cache.root, part)
        for entry in _listdir(top):
            path = os.path.join(top, entry)
            if part == "features" and entry == "tmp":
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                removed[part] += sum(1 for _p, _st, is_dir in _walk(path) if not is_dir)
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                    removed[part] += 1
                except OSError:
                    pass
    removed["tmp"] = cache.sweep_temp()
    return removed


def clear_cache(cache_dir: Optional[str] = None) -> Dict[str, int]:
    """Remove every cached file, listing and feature vector (see :func:`clear_parts`); returns the files removed
    per part. A missing cache root stays missing (``{}``)."""
    root = _root(cache_dir)
    if not os.path.isdir(root):
        return {}
    from streamloader.cache.store import FileCache

    return clear_parts(FileCache(root))
