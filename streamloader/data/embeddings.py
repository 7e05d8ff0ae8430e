"""Read rows of ``.npy`` embedding files over fsspec without loading whole files.

Local files are memory-mapped; remote ones (``https://``, ``dagshub://``, ``memory://``) are range-read: the
header is parsed with :mod:`numpy.lib.format` and a row is one ``seek`` + ``read``. A folder of numbered files
(``img_emb_0001.npy``, ``text_emb_2.npy``) is listed once and matched by shard number::

    folder = EmbeddingFolder("s3://bucket/img_emb")
    with folder.open_shard(1) as rows:        # img_emb_0001.npy (or img_emb_1.npy)
        rows.row(509)                          # np.ndarray of shape (dim,)
"""
from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Tuple

import numpy as np

from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "NpyHeader",
    "read_npy_header",
    "NpyRows",
    "list_numbered_files",
    "EmbeddingFolder",
    "npy_from_bytes",
    "tar_shard_digits",
    "parse_key",
    "ShardEmbeddings",
]

_NUMBERED = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)\.(?P<suffix>[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: 2-D shape, dtype and where the row data starts."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def rows(self) -> int:
        """Number of rows (embeddings)."""
        return int(self.shape[0])

    @property
    def dim(self) -> int:
        """Length of one row."""
        return int(self.shape[1])

    @property
    def row_bytes(self) -> int:
        """Bytes taken by one row."""
        return self.dim * self.dtype.itemsize


def read_npy_header(f: IO[bytes], name: str = "<npy>") -> NpyHeader:
    """Parse and validate the header of an open ``.npy`` file: a 2-D, C-ordered, numeric array."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = npformat.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = npformat.read_array_header_2_0(f)
        else:
            raise DataFormatError(f"{name}: unsupported .npy format version {version}")
    except DataFormatError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{name}: not a valid .npy file ({exc})") from exc
    if len(shape) != 2:
        raise DataFormatError(f"{name}: expected a 2-D array of embeddings, got shape {shape}")
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise DataFormatError(f"{name}: expected a numeric dtype, got {dtype}")
    if fortran_order and shape[0] > 1 and shape[1] > 1:
        raise DataFormatError(f"{name}: Fortran-ordered arrays are not supported (rows are not contiguous)")
    return NpyHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order), f.tell())


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class NpyRows:
    """Random access to the rows of one 2-D ``.npy`` file; opened once, read many times.

    ``row(i)`` validates ``i`` and returns a private copy (safe to hand to torch).
    """

    def __init__(self, url: str, fs: Any = None, path: Optional[str] = None):
        import fsspec

        if fs is None or path is None:
            fs, path = fsspec.core.url_to_fs(url)
        self.url = url
        self._file: Optional[IO[bytes]] = None
        self._memmap: Optional[np.ndarray] = None
        self._file = fs.open(path, "rb")
        try:
            self.header = read_npy_header(self._file, url)
            expected = self.header.data_offset + self.header.rows * self.header.row_bytes
            size = _file_size(fs, path)
            if size is not None and size < expected:
                raise DataFormatError(f"{url}: truncated .npy ({size} bytes, header needs {expected})")
            if _is_local(fs) and self.header.rows > 0:
                self._memmap = np.memmap(
                    path, dtype=self.header.dtype, mode="r", offset=self.header.data_offset, shape=self.header.shape
                )
                self._file.close()
                self._file = None
        except BaseException:
            self.close()
            raise

    @property
    def rows(self) -> int:
        """Number of rows in the file."""
        return self.header.rows

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.header.dim

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new ``(stop-start, dim)`` array."""
        if not 0 <= start <= stop <= self.rows:
            raise DataFormatError(f"{self.url}: rows [{start}, {stop}) out of range (file has {self.rows} rows)")
        native = self.header.dtype.newbyteorder("=")  # (torch takes no other byte order: ">f4" files convert)
        if self._memmap is not None:
            return np.array(self._memmap[start:stop], dtype=native)
        if self._file is None:
            raise ValueError(f"{self.url}: file is closed")
        n = stop - start
        self._file.seek(self.header.data_offset + start * self.header.row_bytes)
        data = self._file.read(n * self.header.row_bytes)
        if len(data) != n * self.header.row_bytes:
            raise DataFormatError(f"{self.url}: truncated .npy (short read at row {start})")
        # frombuffer over bytes is read-only; a copy (in native byte order) may be handed to torch.from_numpy.
        return np.frombuffer(data, dtype=self.header.dtype).reshape(n, self.dim).astype(native)

    def row(self, index: int) -> np.ndarray:
        """Row ``index`` as a new 1-D array; an index past the array is a :class:`DataFormatError`."""
        if not 0 <= index < self.rows:
            raise DataFormatError(f"{self.url}: embedding index {index} out of range (file has {self.rows} rows)")
        return self.read(index, index + 1)[0]

    def close(self) -> None:
        """Release the file handle / memory map."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memmap = None

    def __enter__(self) -> "NpyRows":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _file_size(fs: Any, path: str) -> Optional[int]:
    try:
        size = fs.size(path)
    except (OSError, NotImplementedError, ValueError):
        return None
    return int(size) if size is not None else None


def list_numbered_files(fs: Any, path: str, suffix: str) -> Dict[str, Dict[int, str]]:
    """List ``<prefix>_<N>.<suffix>`` files under ``path`` as ``{prefix: {N: path}}``; N is compared as a number.

    Two files naming the same number (``img_emb_1.npy`` and ``img_emb_0001.npy``) are a :class:`DataFormatError`.
    """
    entries = fs.ls(path, detail=False)
    found: Dict[str, Dict[int, str]] = {}
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _NUMBERED.match(name)
        if not match or match.group("suffix").lower() != suffix:
            continue
        prefix, number = match.group("prefix"), int(match.group("number"))
        files = found.setdefault(prefix, {})
        if number in files:
            raise DataFormatError(f"{path}: both {files[number]} and {entry} claim number {number}")
        files[number] = entry
    return found


def _pick_prefix(found: Dict[str, Dict[int, str]], preferred: Optional[str], url: str) -> str:
    if preferred is not None:
        if preferred not in found:
            raise FileNotFoundError(errno.ENOENT, f"no {preferred}_<N>.npy files in embedding folder", url)
        return preferred
    if len(found) == 1:
        return next(iter(found))
    for default in ("img_emb", "text_emb"):
        if default in found:
            return default
    if not found:
        raise FileNotFoundError(errno.ENOENT, "no <prefix>_<N>.npy files in embedding folder", url)
    raise DataFormatError(f"{url}: several kinds of .npy files ({sorted(found)}); pass prefix=")


class EmbeddingFolder:
    """A folder of per-shard embedding files ``<prefix>_<shard>.npy``, listed once, matched by shard number.

    ``prefix`` defaults to the only prefix present, else ``img_emb``. The listing is made lazily, so the object
    is cheap to build and to send to DataLoader workers.
    """

    def __init__(self, url: str, prefix: Optional[str] = None):
        self.url = str(url).rstrip("/")
        self.prefix = prefix
        self._files: Optional[Dict[int, str]] = None
        self._fs: Any = None

    def _listing(self) -> Dict[int, str]:
        if self._files is None:
            import fsspec

            self._fs, path = fsspec.core.url_to_fs(self.url)
            found = list_numbered_files(self._fs, path, "npy")
            self.prefix = _pick_prefix(found, self.prefix, self.url)
            self._files = found[self.prefix]
            log.debug("%s: %d %s files", self.url, len(self._files), self.prefix)
        return self._files

    def shards(self) -> List[int]:
        """Shard numbers that have an embedding file, ascending."""
        return sorted(self._listing())

    def open_shard(self, shard: int) -> NpyRows:
        """Open the file for ``shard``; a missing file is a ``FileNotFoundError`` naming the expected path."""
        files = self._listing()
        if shard not in files:
            expected = f"{self.url}/{self.prefix}_{shard:04d}.npy"
            raise FileNotFoundError(errno.ENOENT, f"no embedding file for shard {shard}", expected)
        return NpyRows(files[shard], self._fs, files[shard])

    def __getstate__(self) -> Dict[str, Any]:
        # Filesystem objects need not pickle; workers list the folder again (once each).
        return {"url": self.url, "prefix": self.prefix, "_files": None, "_fs": None}


def npy_from_bytes(data: bytes, name: str = "<npy>") -> np.ndarray:
    """Decode a ``.npy`` member (an embedding stored inside a tar) into a 1-D array in native byte order.

    The header must describe exactly the bytes that follow it (a 200-byte member claiming 10**13 values is a
    DataFormatError, not an allocation of terabytes), and a numeric dtype (objects are never unpickled)."""
    import io

    from numpy.lib import format as npformat

    stream = io.BytesIO(data)
    try:
        version = npformat.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{name}: not a valid .npy ({exc})") from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind not in "fiu":
        raise DataFormatError(f"{name}: expected a 1-D numeric embedding, got {dtype} {shape}")
    count = 1
    for n in shape:
        count *= int(n)
    offset = stream.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise DataFormatError(f"{name}: its header says {tuple(shape)} x {dtype} ({count * dtype.itemsize} bytes), "
                              f"the member holds {len(data) - offset}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise DataFormatError(f"{name}: expected a 1-D numeric embedding, got {array.dtype} {array.shape}")
    return array.astype(dtype.newbyteorder("="))  # (a copy: writable, in the byte order torch takes)



_TAR_NUMBER = re.compile(r"(\d+)$")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


def tar_shard_digits(url: str) -> Optional[str]:
    """The trailing digits of a shard's file name (``.../0001.tar`` -> ``"0001"``), or None."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    match = _TAR_NUMBER.search(name)
    return match.group(1) if match else None


def parse_key(
    key: str, tar_url: str, shard_width: Optional[int] = None, index_width: Optional[int] = None
) -> Tuple[int, int]:
    """Split an img2dataset key into ``(shard, index)``: ``00010509`` with shard_width 4 -> ``(1, 509)``.

    ``index_width`` (the later DALLE2 name) counts index digits from the right instead. With neither, the
    shard digits are taken from the tar's name. A key that is not all digits, is too short, or names another
    shard than the tar it came from raises :class:`DataFormatError`.
    """
    base = key.rsplit("/", 1)[-1]
    if not (base.isascii() and base.isdigit()):
        raise DataFormatError(f"{tar_url}: key {key!r} is not <shard digits><index digits>")
    tar_digits = tar_shard_digits(tar_url)
    shard_part: Optional[str]
    if shard_width is not None:
        if len(base) <= shard_width:
            raise DataFormatError(f"{tar_url}: key {key!r} too short for shard_width={shard_width}")
        shard_part, index_part = base[:shard_width], base[shard_width:]
        if index_width is not None and len(index_part) != index_width:
            raise DataFormatError(f"{tar_url}: key {key!r} does not have {shard_width}+{index_width} digits")
    elif index_width is not None:
        if len(base) < index_width:
            raise DataFormatError(f"{tar_url}: key {key!r} too short for index_width={index_width}")
        shard_part, index_part = base[:-index_width] or None, base[-index_width:]
    else:
        if tar_digits is None or not base.startswith(tar_digits) or len(base) == len(tar_digits):
            raise DataFormatError(
                f"{tar_url}: cannot split key {key!r} into shard and index; pass shard_width (or index_width)"
            )
        shard_part, index_part = tar_digits, base[len(tar_digits):]
    if shard_part is None:
        if tar_digits is None:
            raise DataFormatError(f"{tar_url}: key {key!r} has no shard digits and the tar name has no number")
        shard_part = tar_digits
    shard = int(shard_part)
    if tar_digits is not None and int(tar_digits) != shard:
        raise DataFormatError(f"{tar_url}: key {key!r} names shard {shard}, but it is in shard {int(tar_digits)}")
    return shard, int(index_part)


class ShardEmbeddings:
    """Looks up embedding rows for the samples of a stream of shards, keeping one file open at a time.

    Samples arrive grouped by shard, so each ``<prefix>_<shard>.npy`` is opened once per shard. ``dim`` (if
    given) is checked against every file's header.
    """

    def __init__(self, folder: EmbeddingFolder, dim: Optional[int] = None):
        self.folder = folder
        self.dim = dim
        self._shard: Optional[int] = None
        self._rows: Optional[NpyRows] = None
        self.opened = 0

    def rows_for(self, shard: int) -> NpyRows:
        """The open file for ``shard`` (opening it, and closing the previous one, on a shard change)."""
        if self._rows is None or self._shard != shard:
            self.close()
            rows = self.folder.open_shard(shard)
            self.opened += 1
            if self.dim is not None and rows.dim != self.dim:
                rows.close()
                raise DataFormatError(f"{rows.url}: embeddings have dimension {rows.dim}, expected {self.dim}")
            self._shard, self._rows = shard, rows
        return self._rows

    def lookup(self, shard: int, index: int) -> np.ndarray:
        """Row ``index`` of shard ``shard``'s file (validated; an index past the array raises)."""
        return self.rows_for(shard).row(index)

    def close(self) -> None:
        """Close the open file, if any."""
        if self._rows is not None:
            self._rows.close()
        self._shard, self._rows = None, None
