"""A local folder seen as a one-branch DagsHub repository: safe path resolution, listings, hashes, commit sha.

This test server keeps no history: the branch head is a sha derived from the folder's current state, every sha
it ever issued stays valid, and any valid revision serves the folder as it is *now*.

Change detection uses (path, size, mtime_ns, ctime_ns) rather than file content, so rewriting a file in place
with the same size within one filesystem timestamp tick (a few ms on Linux) goes unnoticed; tests that mutate the
repo should change the size or bump the mtime (see ``tests/conftest.py::rewrite_file``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from streamloader.server.dvc import dvc_md5_file

log = logging.getLogger(__name__)

__all__ = ["RepoFolder", "RepoEntry", "RepoPathError", "git_blob_sha1"]

_HASH_CHUNK = 1024 * 1024
# never served and never listed: the folder's own git metadata
_HIDDEN_NAMES = frozenset({".git"})


class RepoPathError(Exception):
    """A request path that is malformed (400) or names nothing servable (404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RepoEntry:
    """One listing entry: ``path`` is the full repo path (``data/a.jpg``), ``size`` 0 for directories."""

    path: str
    type: str  # "file" | "dir"
    size: int
    hash: str
    versioning: str = "git"  # "git" | "dvc"


# raw answers carry the blob sha as ETag; above this size only once a listing has hashed the file (etag_sha)
ETAG_HASH_LIMIT = 64 * 1024 * 1024

def git_blob_sha1(path: str) -> str:
    """The git blob id of a file: sha1(b"blob <size>\\0" + content), as 40 hex digits."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_repo_path(repo_path: str) -> List[str]:
    """Validate a (URL-decoded) repo path and return its segments; "" is the root.

    Rejects (400) NUL bytes, backslashes, absolute paths, and empty/"."/".." segments; one trailing "/" is allowed
    (directory listings). Example: ``split_repo_path("data/a.jpg") == ["data", "a.jpg"]``.
    """
    if "\x00" in repo_path or "\\" in repo_path:
        raise RepoPathError(400, "path contains a NUL byte or a backslash")
    if repo_path.startswith("/"):
        raise RepoPathError(400, "absolute paths are not allowed")
    if repo_path.endswith("/"):
        repo_path = repo_path[:-1]
    if not repo_path:
        return []
    segments = repo_path.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise RepoPathError(400, "path segments must not be empty, '.' or '..'")
    return segments


def _servable_name(name: str) -> bool:
    # names we could never serve back (see split_repo_path) or encode as JSON are left out of listings
    if name in _HIDDEN_NAMES or "\\" in name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class RepoFolder:
    """A folder served as a repository. Thread-safe.

    Example::

        repo = RepoFolder("/data/laion-mini")
        real = repo.resolve("data/labels.tsv")      # absolute real path inside the folder
        entries = repo.list_dir("data")             # [RepoEntry(path="data/0001.jpg", ...), ...]
        sha = repo.head_sha()
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise NotADirectoryError(f"not a directory: {root}")
        self.root = os.path.realpath(root)
        self._lock = threading.Lock()
        # real path -> (stat signature, blob sha)
        self._hash_cache: Dict[str, Tuple[Tuple[int, int, int, int], str]] = {}
        self._md5_cache: Dict[str, Tuple[Tuple[int, int, int, int], str]] = {}
        self._issued: Set[str] = set()
        # mixed into the commit sha when it returns a non-empty string (state that is not on disk: synthetic files)
        self.extra_signature: Optional[Callable[[], str]] = None

    # -- paths ----------------------------------------------------------------------------------------------
    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def resolve(self, repo_path: str) -> str:
        """The real absolute path of ``repo_path``; RepoPathError 400 if malformed, 404 if missing or outside."""
        segments = split_repo_path(repo_path)
        if any(seg in _HIDDEN_NAMES for seg in segments):
            raise RepoPathError(404, "not found")
        # realpath resolves every symlink, so a link pointing out of the folder lands outside and is refused
        real = os.path.realpath(os.path.join(self.root, *segments))
        if not self._inside(real):
            log.debug("refused path outside the served folder: %r", repo_path)
            raise RepoPathError(404, "not found")
        if not os.path.exists(real):
            raise RepoPathError(404, "not found")
        return real

    # -- hashes ---------------------------------------------------------------------------------------------
    def etag_sha(self, real_path: str, st: os.stat_result) -> Optional[str]:
        """The blob sha a raw answer sends as its ETag: hashed now up to ``ETAG_HASH_LIMIT`` bytes; above that only
        once a listing has hashed the file (hashing a big file on its first, maybe 1 KB Range, request would
        stall it), else None."""
        return self.blob_sha(real_path, st) if st.st_size <= ETAG_HASH_LIMIT else self.cached_blob_sha(real_path, st)

    def cached_blob_sha(self, real_path: str, st: os.stat_result) -> Optional[str]:
        """The blob sha if it was computed for the file in this exact state, else None (never hashes)."""
        cached = self._hash_cache.get(real_path)
        if cached is not None and cached[0] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
            return cached[1]
        return None

    def blob_sha(self, real_path: str, st: Optional[os.stat_result] = None) -> str:
        """Git blob sha1 of a file, cached by (size, mtime_ns, ctime_ns, inode) so re-listing never rehashes."""
        st = st or os.stat(real_path)
        signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self.cached_blob_sha(real_path, st)
        if cached is not None:
            return cached
        sha = git_blob_sha1(real_path)
        with self._lock:
            self._hash_cache[real_path] = (signature, sha)
        return sha

    def dvc_md5(self, real_path: str, st: Optional[os.stat_result] = None) -> str:
        """DVC 2's md5 of a file (server/dvc.py), cached like :meth:`blob_sha`."""
        st = st or os.stat(real_path)
        signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self._md5_cache.get(real_path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        md5 = dvc_md5_file(real_path)
        with self._lock:
            self._md5_cache[real_path] = (signature, md5)
        return md5

    # -- listings -------------------------------------------------------------------------------------------
    def list_dir(
        self, repo_path: str, classify: Optional[Callable[[str, str, os.stat_result], Tuple[str, str]]] = None
    ) -> List[RepoEntry]:
        """Entries of a directory, sorted by name; RepoPathError 404 if it is missing or not a directory.

        ``classify(repo_path, real_path, stat)`` -> ``(hash, versioning)`` of a file; default: git blob sha1, "git".
        """
        real_dir = self.resolve(repo_path)
        if not os.path.isdir(real_dir):
            raise RepoPathError(404, "not a directory")
        prefix = "/".join(split_repo_path(repo_path))
        entries: List[RepoEntry] = []
        with os.scandir(real_dir) as it:
            dirents = sorted(it, key=lambda d: d.name)
        for dirent in dirents:
            if not _servable_name(dirent.name):
                log.debug("listing of %r leaves out %r (not servable)", repo_path, dirent.name)
                continue
            path = f"{prefix}/{dirent.name}" if prefix else dirent.name
            real = os.path.realpath(dirent.path)
            if not self._inside(real):
                log.debug("listing of %r leaves out %r (symlink out of the folder)", repo_path, dirent.name)
                continue
            try:
                st = os.stat(real)
                if stat.S_ISDIR(st.st_mode):
                    dir_sig = f"tree\0{path}\0{st.st_mtime_ns}".encode("utf-8")
                    entries.append(RepoEntry(path, "dir", 0, hashlib.sha1(dir_sig).hexdigest()))
                elif stat.S_ISREG(st.st_mode):
                    digest, versioning = classify(path, real, st) if classify else (self.blob_sha(real, st), "git")
                    entries.append(RepoEntry(path, "file", st.st_size, digest, versioning))
                else:
                    log.debug("listing of %r leaves out %r (not a regular file)", repo_path, dirent.name)
            except OSError as exc:  # vanished or unreadable while listing: leave it out, say so
                log.warning("listing of %r leaves out %r: %s", repo_path, dirent.name, exc)
        return entries

    # -- revisions ------------------------------------------------------------------------------------------
    def _snapshot_signature(self) -> Tuple[str, int]:
        digest = hashlib.sha1(b"streamloader-snapshot-v1\0")
        newest = 0
        rows = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if d not in _HIDDEN_NAMES]
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    rows.append(f"{rel}\0L\0{os.readlink(full)}")
                else:
                    rows.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}")
                    newest = max(newest, st.st_mtime_ns)
        for row in sorted(rows):
            digest.update(row.encode("utf-8", "surrogateescape") + b"\n")
        extra = self.extra_signature() if self.extra_signature is not None else ""
        if extra:
            digest.update(b"extra\0" + extra.encode("utf-8"))
        return digest.hexdigest(), newest

    def head_sha(self) -> str:
        """The commit sha of the folder's current state (a walk of every file's size and mtime; no hashing)."""
        sha, _ = self.head()
        return sha

    def head(self) -> Tuple[str, int]:
        """(commit sha, newest file mtime in ns) of the current state; the sha is remembered as issued."""
        sha, newest = self._snapshot_signature()
        with self._lock:
            self._issued.add(sha)
        return sha, newest

    def knows_commit(self, sha: str) -> bool:
        """True for the current sha and any sha this folder issued before."""
        with self._lock:
            if sha in self._issued:
                return True
        return self.head_sha() == sha
