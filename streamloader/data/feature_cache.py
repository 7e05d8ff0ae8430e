"""On-disk cache of image features, keyed by (image content identity, feature-extractor fingerprint).

Layout under ``root`` (default ``<streamloader cache dir>/features``)::

    <fingerprint[:24]>/extractor.json          what made these features (name, weights digest, preprocessing)
    <fingerprint[:24]>/<k[:2]>/<k>.npy         one float32 vector per image; k = sha256(content identity)
    tmp/                                        writes in progress (never read; stale ones swept by precompute)

Every entry is a plain ``.npy`` (``np.load`` reads it) written to a unique temp file and renamed into place, so
any number of threads, DataLoader workers and processes may write at once: a reader sees a whole entry or none,
and two writers of one entry both leave a complete file. Entries are not fsync'ed one by one (that would cost
more than extracting on a GPU): a reader checks the length against the header and treats a short or garbled file
(possible only after a power loss) as absent, so it is recomputed. Reads take one ``open``+``read`` (about 5 µs).

Content identity (:func:`content_identity`), chosen so that knowing a feature's key never needs the image bytes
when a listing hash is available:

* ``dagshub://`` URL: the listing's content hash (git blob sha1 or DVC md5); without one, (host, repo, commit
  sha, path) — the same identity the file cache uses, so features follow content, not names.
* a plain path that exists on local disk: ``(realpath of its directory + name, size, mtime_ns)``.
* a plain path that streamloader's hooks serve from a repository: that entry's listing hash (same identity as
  the ``dagshub://`` URL of the same file).
* anything else readable through ``open`` (e.g. another library's hooks): the sha256 of the bytes.
* other fsspec URLs: ``fs.ukey(url)`` (the backend's checksum or its size/mtime info).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from typing import Any, Dict, Optional

import numpy as np

from streamloader import _realos
from streamloader._files import atomic_write, makedirs_private
from streamloader.data.embeddings import npy_from_bytes
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["FeatureCache", "content_identity", "default_feature_dir"]

_STALE_TMP_AGE = 3600.0  # a temp file this old belongs to a dead writer
_DIR_REALPATHS: Dict[str, str] = {}
_READ_CHUNK = 1 << 16


def default_feature_dir(cache_dir: Optional[str] = None) -> str:
    """``<cache_dir or the streamloader cache dir>/features``."""
    from streamloader.cache import default_cache_dir

    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir(),
                        "features")


def content_identity(path: str, fs: Any = None, read_bytes: bool = True) -> Optional[str]:
    """A string that changes whenever the content of ``path`` (plain path or fsspec URL) changes; see module doc.

    ``fs`` is the fsspec filesystem for a URL. Missing files raise FileNotFoundError. With ``read_bytes=False``
    returns None instead of reading the file when only hashing its bytes could identify it.

    >>> content_identity("/data/a.jpg")          # doctest: +SKIP
    'local:/data/a.jpg:30512:1700000000000000000'
    """
    if "://" in path:
        return _url_identity(path, fs)
    try:
        st = _realos.stat(path)  # hooks make served files look local: only the disk's own stat says what is here
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is not None:
        return f"local:{_real_location(path)}:{st.st_size}:{st.st_mtime_ns}"
    hooked = _hooked_identity(path)
    if hooked is not None or not read_bytes:
        return hooked
    import builtins

    digest = hashlib.sha256()
    # Through builtins.open at call time, so that whatever hooks are installed serve the bytes.
    with builtins.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _real_location(path: str) -> str:
    """``realpath(dirname) + "/" + basename``: the directory's resolution is memoized (realpath costs one lstat
    per path component, more than the whole cached read)."""
    if not os.path.isabs(path):
        path = os.path.abspath(path)
    head, tail = os.path.split(path)
    real = _DIR_REALPATHS.get(head)
    if real is None:
        if len(_DIR_REALPATHS) > 4096:
            _DIR_REALPATHS.clear()
        real = _DIR_REALPATHS[head] = os.path.realpath(head)
    return real.rstrip("/") + "/" + tail


def _url_identity(url: str, fs: Any) -> str:
    if fs is None:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(url)
    from streamloader.remote.filesystem import DagsHubFileSystem

    if isinstance(fs, DagsHubFileSystem):
        return _repo_identity(*fs.resolve(url))
    return f"ukey:{fs.ukey(url)}"


def _repo_identity(repo: Any, rel: str) -> str:
    entry = repo.info(rel)
    if entry.is_dir:
        raise IsADirectoryError(21, "Is a directory", rel)
    key = repo.cache_key(entry)  # content hash when listed, else (host, repo, commit sha, path)
    return f"{key.kind}:{key.digest}"


def _hooked_identity(path: str) -> Optional[str]:
    """The listing identity of a path streamloader's hooks would serve from a repository, else None."""
    from streamloader.hooks.router import resolve  # None for every path while no hooks are installed

    found = resolve(path)
    if found is None:
        return None
    hook, rel = found
    if not rel or hook.excluded(rel):
        return None
    return _repo_identity(hook.repo, rel)


class FeatureCache:
    """Feature vectors of one extractor (``fingerprint``) on disk; see module docstring.

    Usage::

        cache = FeatureCache(fingerprint=extractor.fingerprint)
        ident = content_identity("data/a.jpg")
        vec = cache.get(ident)            # np.ndarray (float32) or None
        cache.put(ident, vec)
    """

    def __init__(self, root: Optional[str] = None, fingerprint: str = "", info: Optional[Dict[str, Any]] = None):
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"fingerprint must be a lowercase hex digest; got {fingerprint!r}")
        self.root = os.path.abspath(os.path.expanduser(root)) if root else default_feature_dir()
        self.fingerprint = fingerprint
        self.info = dict(info or {})
        self.dir = os.path.join(self.root, fingerprint[:24])
        self._tmp = os.path.join(self.root, "tmp")
        self._ready = False
        self._headers: Dict[int, bytes] = {}  # vector length -> the exact .npy header our writer emits
        dims = self.info.get("feature_dims")
        # the extractor's vector length: an entry of any other length is damaged (recomputed, never served)
        self.dim: Optional[int] = dims if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0 else None

    def __repr__(self) -> str:
        return f"FeatureCache({self.root!r}, fingerprint={self.fingerprint[:12]}...)"

    @staticmethod
    def key(identity: str) -> str:
        """The entry name for a content identity (sha256 hex)."""
        return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()

    def path(self, identity: str) -> str:
        """Where the entry for ``identity`` lives (whether or not it exists)."""
        key = self.key(identity)
        return f"{self.dir}/{key[:2]}/{key}.npy"

    def __contains__(self, identity: str) -> bool:
        return os.path.exists(self.path(identity))

    def holds(self, identity: str) -> bool:
        """Whether a usable entry for ``identity`` is stored: with the vector length known, one of exactly the size
        our writer gives it (a stat; a cut, grown or other-length entry is not), else one that reads and decodes."""
        if self.dim is None:
            return self.get(identity) is not None
        try:
            size = _realos.stat(self.path(identity)).st_size
        except OSError:
            return False
        return size == len(self._header(self.dim)) + 4 * self.dim

    def get(self, identity: str) -> Optional[np.ndarray]:
        """The cached vector (a fresh float32 array) or None when absent or unreadable."""
        try:
            fd = os.open(self.path(identity), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:  # raw os calls: a buffered file object costs more than the read itself
            data = os.read(fd, _READ_CHUNK)
            if len(data) == _READ_CHUNK:
                data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        return self._decode(data, identity)

    def _decode(self, data: bytes, identity: str) -> Optional[np.ndarray]:
        # Fast path: the exact header our writer emits for this length (no header parsing at all).
        if len(data) > 10:
            header_len = 10 + int.from_bytes(data[8:10], "little")
            length = (len(data) - header_len) // 4
            if self._header(length) == data[:header_len] and header_len + 4 * length == len(data) and \
                    (self.dim is None or length == self.dim):
                return np.frombuffer(data, dtype="<f4", offset=header_len).copy()
        try:  # any other valid 1-D float .npy (e.g. written by np.save); its header must match its bytes
            array: Optional[np.ndarray] = npy_from_bytes(data, self.path(identity))
        except DataFormatError:
            array = None
        if array is None or array.dtype.kind != "f" or (self.dim is not None and array.shape[0] != self.dim):
            log.warning("ignoring a damaged feature cache entry %s (it will be recomputed)", self.path(identity))
            return None
        return array.astype(np.float32)

    def _header(self, length: int) -> bytes:
        header = self._headers.get(length)
        if header is None:
            from numpy.lib import format as npformat

            buf = io.BytesIO()
            npformat.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (length,)})
            header = self._headers[length] = buf.getvalue()
        return header

    def put(self, identity: str, features: Any) -> str:
        """Store a 1-D vector (numpy array or CPU tensor) atomically; return the entry's path."""
        array = np.ascontiguousarray(np.asarray(features, dtype="<f4").reshape(-1))
        if self.dim is None:  # (an extractor that learns its length at its first batch)
            self.dim = int(array.shape[0])
        if not self._ready:
            self._prepare()
        final = self.path(identity)
        atomic_write(final, self._header(array.shape[0]) + array.tobytes(), tmp_dir=self._tmp)
        return final

    def _prepare(self) -> None:
        makedirs_private(self._tmp)
        meta = os.path.join(self.dir, "extractor.json")
        if not os.path.exists(meta):
            info = json.dumps({"fingerprint": self.fingerprint, **self.info}, indent=2, default=str)
            atomic_write(meta, info.encode("utf-8"), tmp_dir=self._tmp)
        self._ready = True

    def count(self) -> int:
        """Number of entries on disk (walks the directory; for tests and reports)."""
        if not os.path.isdir(self.dir):
            return 0
        return sum(
            1 for sub in os.scandir(self.dir) if sub.is_dir() for e in os.scandir(sub.path) if e.name.endswith(".npy")
        )

    def sweep_temp(self, max_age: float = _STALE_TMP_AGE) -> int:
        """Remove temp files older than ``max_age`` seconds (left by killed writers); return how many."""
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.name.endswith(".part") and now - entry.stat().st_mtime > max_age:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed
