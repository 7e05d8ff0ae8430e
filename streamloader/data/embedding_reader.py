"""Precomputed CLIP embeddings as one long array: a folder of ``<prefix>_N.npy`` files (+ caption parquet).

Reads the clip-retrieval layout (``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy``,
``metadata/metadata_N.parquet`` with a ``caption`` column) over any fsspec URL, with no embedding-reader or CLIP
dependency; :mod:`streamloader.data.embedding_splits` cuts a reader into per-rank train/eval/test loaders::

    reader = get_reader(text_conditioned=True, img_url="data/img_emb/", meta_url="data/meta/")
    reader.count, reader.dimension
    rows = reader.read_rows(0, 1024)             # (1024, D) array
    captions = reader.read_meta(0, 1024)         # 1024 str
"""
from __future__ import annotations

import errno
import io
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from streamloader.data.embeddings import NpyHeader, NpyRows, list_numbered_files, read_npy_header
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["EmbeddingReader", "get_reader", "check_paired"]


def _read_header_range(fs: Any, path: str) -> NpyHeader:
    # A ranged read keeps this to one small request per file on remote filesystems.
    head = fs.cat_file(path, start=0, end=4096)
    try:
        return read_npy_header(io.BytesIO(head), path)
    except DataFormatError:
        if len(head) < 4096:
            raise
        with fs.open(path, "rb") as f:  # an unusually long header
            return read_npy_header(f, path)


class EmbeddingReader:
    """One long array over a folder of ``<prefix>_N.npy`` files (N in numeric order), read lazily over fsspec.

    Same constructor and call protocol as embedding-reader's ``EmbeddingReader``, so code written for it works::

        reader = EmbeddingReader("s3://b/img_emb", file_format="parquet_npy", meta_columns=["caption"],
                                 metadata_folder="s3://b/metadata")
        reader.count, reader.dimension
        for emb, meta in reader(batch_size=1024, start=0, end=4096):
            ...
    """

    def __init__(
        self,
        embeddings_folder: str,
        file_format: str = "npy",
        meta_columns: Optional[Sequence[str]] = None,
        metadata_folder: Optional[str] = None,
        prefix: Optional[str] = None,
    ):
        if file_format not in ("npy", "parquet_npy"):
            raise ValueError(f"file_format must be 'npy' or 'parquet_npy', got {file_format!r}")
        if file_format == "parquet_npy" and metadata_folder is None:
            raise ValueError("file_format='parquet_npy' needs metadata_folder")
        self.embeddings_folder = str(embeddings_folder).rstrip("/")
        self.metadata_folder = str(metadata_folder).rstrip("/") if metadata_folder is not None else None
        self.meta_columns = list(meta_columns) if meta_columns else (["caption"] if self.metadata_folder else [])
        self.prefix = prefix
        self._files: Optional[List[Tuple[int, str, NpyHeader]]] = None
        self._meta_files: Dict[int, str] = {}
        self._offsets: List[int] = []
        self._fs: Any = None
        self._meta_fs: Any = None
        self._open: Optional[Tuple[int, NpyRows]] = None
        self._meta_cache: Optional[Tuple[int, Dict[str, list]]] = None

    # --- lazy listing and validation ---------------------------------------------------------------------------
    def _load(self) -> List[Tuple[int, str, NpyHeader]]:
        if self._files is not None:
            return self._files
        import fsspec

        self._fs, path = fsspec.core.url_to_fs(self.embeddings_folder)
        found = list_numbered_files(self._fs, path, "npy")
        prefix = self.prefix or (next(iter(found)) if len(found) == 1 else None)
        if prefix is None:
            guess = [p for p in ("img_emb", "text_emb") if p in found]
            if not guess:
                raise FileNotFoundError(errno.ENOENT, "no <prefix>_<N>.npy files", self.embeddings_folder)
            prefix = guess[0]
        if prefix not in found:
            raise FileNotFoundError(errno.ENOENT, f"no {prefix}_<N>.npy files", self.embeddings_folder)
        self.prefix = prefix
        files = []
        for number in sorted(found[prefix]):
            file_path = found[prefix][number]
            files.append((number, file_path, _read_header_range(self._fs, file_path)))
        first = files[0][2]
        for number, file_path, header in files[1:]:
            if header.dtype != first.dtype or header.dim != first.dim:
                raise DataFormatError(
                    f"{file_path}: {header.dtype}[{header.dim}] differs from {files[0][1]}: {first.dtype}[{first.dim}]"
                )
        if self.metadata_folder is not None:
            self._load_metadata([(n, h.rows) for n, _, h in files])
        self._offsets = list(np.cumsum([0] + [h.rows for _, _, h in files]))
        self._files = files
        return files

    def _load_metadata(self, rows: List[Tuple[int, int]]) -> None:
        import fsspec
        import pyarrow.parquet as pq  # only needed when captions are used

        self._meta_fs, path = fsspec.core.url_to_fs(self.metadata_folder)
        found = list_numbered_files(self._meta_fs, path, "parquet")
        meta = found.get("metadata") or (next(iter(found.values())) if len(found) == 1 else {})
        wanted = {n for n, _ in rows}
        if set(meta) != wanted:
            raise DataFormatError(
                f"{self.metadata_folder}: metadata files {sorted(meta)} do not match embedding files {sorted(wanted)}"
            )
        for number, n_rows in rows:
            with self._meta_fs.open(meta[number], "rb") as f:
                parquet = pq.ParquetFile(f)
                meta_rows = parquet.metadata.num_rows
                names = parquet.schema_arrow.names
            if meta_rows != n_rows:
                raise DataFormatError(f"{meta[number]}: {meta_rows} rows, but its embedding file has {n_rows}")
            absent = [c for c in self.meta_columns if c not in names]
            if absent:
                raise DataFormatError(f"{meta[number]}: missing column(s) {absent}")
        self._meta_files = meta

    @property
    def count(self) -> int:
        """Total number of embeddings."""
        self._load()
        return int(self._offsets[-1])

    @property
    def dimension(self) -> int:
        """Embedding dimension."""
        return self._load()[0][2].dim

    @property
    def dtype(self) -> np.dtype:
        """Embedding dtype (as stored)."""
        return self._load()[0][2].dtype

    @property
    def nb_files(self) -> int:
        """Number of embedding files."""
        return len(self._load())

    def file_rows(self) -> List[Tuple[int, int]]:
        """``[(N, rows), ...]`` in reading order."""
        return [(n, h.rows) for n, _, h in self._load()]

    @property
    def has_metadata(self) -> bool:
        """Whether captions (metadata parquet) are available."""
        return self.metadata_folder is not None

    # --- reading -------------------------------------------------------------------------------------------------
    def _spans(self, start: int, stop: int) -> Iterator[Tuple[int, int, int]]:
        files = self._load()
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"rows [{start}, {stop}) out of range (reader has {self.count})")
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop and i < len(files):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            end = min(stop, hi)
            if end > start:
                yield i, start - lo, end - lo
            start, i = max(start, end), i + 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Embeddings ``[start, stop)`` as a ``(stop-start, dimension)`` array."""
        parts = []
        for i, lo, hi in self._spans(start, stop):
            if self._open is None or self._open[0] != i:
                self.close()
                self._open = (i, NpyRows(self._files[i][1], self._fs, self._files[i][1]))  # type: ignore[index]
            parts.append(self._open[1].read(lo, hi))
        if not parts:
            return np.empty((0, self.dimension), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_meta(self, start: int, stop: int, column: str = "caption") -> list:
        """Values of metadata ``column`` for rows ``[start, stop)`` (one parquet file cached at a time)."""
        if not self.has_metadata:
            raise ValueError(f"{self.embeddings_folder}: no metadata folder was given")
        values: list = []
        for i, lo, hi in self._spans(start, stop):
            if self._meta_cache is None or self._meta_cache[0] != i:
                import pyarrow.parquet as pq

                number = self._files[i][0]  # type: ignore[index]
                with self._meta_fs.open(self._meta_files[number], "rb") as f:
                    table = pq.read_table(f, columns=self.meta_columns)
                self._meta_cache = (i, {c: table.column(c).to_pylist() for c in self.meta_columns})
            values.extend(self._meta_cache[1][column][lo:hi])
        return values

    def __call__(
        self, batch_size: int, start: int = 0, end: Optional[int] = None, show_progress: bool = False
    ) -> Iterator[Tuple[np.ndarray, Any]]:
        """Yield ``(embeddings, metadata DataFrame or None)`` batches over ``[start, end)``, like embedding-reader."""
        end = self.count if end is None else min(end, self.count)
        for lo in range(start, end, batch_size):
            hi = min(lo + batch_size, end)
            meta = None
            if self.has_metadata:
                import pandas as pd

                meta = pd.DataFrame({c: self.read_meta(lo, hi, c) for c in self.meta_columns})
            yield self.read_rows(lo, hi), meta

    def close(self) -> None:
        """Close the open embedding file."""
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"], state["_meta_cache"] = None, None  # file handles stay in their process
        return state

    def __repr__(self) -> str:
        return f"EmbeddingReader({self.embeddings_folder!r}, metadata_folder={self.metadata_folder!r})"


def get_reader(
    text_conditioned: bool, img_url: str, meta_url: Optional[str] = None, txt_url: Optional[str] = None
) -> Union[EmbeddingReader, Tuple[EmbeddingReader, EmbeddingReader]]:
    """Image reader with captions (``text_conditioned``), else ``(image_reader, text_reader)``; nothing read yet."""
    if img_url is None:
        raise ValueError("img_url is required")
    if text_conditioned:
        if meta_url is None:
            raise ValueError("text_conditioned=True needs meta_url (metadata_N.parquet with a caption column)")
        return EmbeddingReader(img_url, file_format="parquet_npy", meta_columns=["caption"], metadata_folder=meta_url)
    if txt_url is None:
        raise ValueError("text_conditioned=False needs txt_url (text_emb_N.npy files)")
    return EmbeddingReader(img_url, file_format="npy"), EmbeddingReader(txt_url, file_format="npy")


def check_paired(image_reader: Any, text_reader: Any) -> None:
    """Raise :class:`DataFormatError` unless the two readers have the same files with the same row counts."""
    if isinstance(image_reader, EmbeddingReader) and isinstance(text_reader, EmbeddingReader):
        if image_reader.file_rows() != text_reader.file_rows():
            raise DataFormatError(
                f"image and text embeddings do not pair up: {image_reader.file_rows()} vs {text_reader.file_rows()}"
            )
    elif image_reader.count != text_reader.count:
        raise DataFormatError(f"image ({image_reader.count}) and text ({text_reader.count}) counts differ")
