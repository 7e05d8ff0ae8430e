"""Verifying downloaded bytes against a cache key's content hash while they are written (or, where that cannot
be done as they stream, from the finished file).

Two hash forms need the file rather than the stream: a git blob id covers a ``blob <size>\\0`` header, so it can
only be computed on the fly when the size is known up front (dagshub.com lists sizes only on request), and DVC 2
hashed text files after converting CRLF line ends to LF ("md5-dos2unix"), so the md5 of a CRLF text file's raw
bytes is not the listed one. :meth:`Verifier.check_file` handles both.

DVC 2's conversion is its own: a file is text when its first 512 bytes hold no NUL and at most 30% bytes outside
printable ASCII and ``\\n\\r\\t\\f\\b`` (``dvc/istextfile.py``), and the ``\\r\\n`` are replaced within each 1 MiB chunk
it reads (``dvc/utils/__init__.py::_fobj_md5``), so a CRLF that a chunk boundary splits stays as it is. The
dos2unix retry does exactly that (and, for a hash made in one piece, also over the whole content); a file DVC
would call binary gets no such retry: its md5 is of its bytes.
"""
from __future__ import annotations

import hashlib
from typing import BinaryIO, Iterable, Optional

__all__ = ["Verifier", "HashingWriter", "dos2unix_md5s"]

_CHUNK = 1 << 20  # dvc.utils.LOCAL_CHUNK_SIZE: DVC 2's dos2unix runs per chunk of this size
_TEXT_BLOCK = 512  # dvc.istextfile.DEFAULT_CHUNK_SIZE
_TEXT_BYTES = bytes(range(32, 127)) + b"\n\r\t\f\b"


def _dvc_text(block: bytes) -> bool:
    """DVC 2's text heuristic on a file's first 512 bytes (no NUL, at most 30% bytes outside ``_TEXT_BYTES``)."""
    return not block or (b"\x00" not in block and len(block.translate(None, _TEXT_BYTES)) / len(block) <= 0.30)


def dos2unix_md5s(chunks: Iterable[bytes]) -> "tuple[str, ...]":
    """The md5s content may have been listed under as "md5-dos2unix", given as 1 MiB chunks (the last may be
    shorter): DVC 2's (CRLF read as LF within each chunk) and the whole content's; none if DVC would call it binary."""
    per_chunk, whole = hashlib.md5(), hashlib.md5()
    carry, first = b"", True
    for chunk in chunks:
        if first and not _dvc_text(chunk[:_TEXT_BLOCK]):
            return ()
        first = False
        per_chunk.update(chunk.replace(b"\r\n", b"\n"))
        chunk = carry + chunk
        carry = b"\r" if chunk.endswith(b"\r") else b""
        whole.update((chunk[:-1] if carry else chunk).replace(b"\r\n", b"\n"))
    whole.update(carry)
    return per_chunk.hexdigest(), whole.hexdigest()


def _file_chunks(path: str) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)  # a buffered read of a regular file fills the chunk unless at its end
            if not chunk:
                return
            yield chunk


class Verifier:
    """Incrementally hashes downloaded bytes against ``expected``; ``start(size)`` begins again (retries)."""

    def __init__(self, algo: str, expected: str, git_blob: bool = False):
        self.algo, self.expected, self.git_blob = algo, expected, git_blob
        self.reset()

    def reset(self) -> None:
        self._h = hashlib.new(self.algo)
        self._started = False

    def start(self, size: Optional[int]) -> None:
        self.reset()
        if self.git_blob:
            if size is None:
                raise ValueError("git blob verification needs the size")
            self._h.update(b"blob %d\x00" % size)
        self._started = True

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)

    def ok(self) -> bool:
        return self._h.hexdigest() == self.expected

    def hexdigest(self) -> str:
        """The digest of the bytes fed since the last start."""
        return self._h.hexdigest()

    def can_stream(self, size: Optional[int]) -> bool:
        """Whether the hash can be computed while the bytes stream in (a git blob id needs the size first)."""
        return size is not None or not self.git_blob

    def check_file(self, path: str, dos2unix: bool = False) -> bool:
        """Hash a finished file; ``dos2unix`` hashes it as DVC 2 hashed text files (see the module docstring)."""
        if dos2unix:
            return self.algo == "md5" and self.expected in dos2unix_md5s(_file_chunks(path))
        h = hashlib.new(self.algo)
        if self.git_blob:
            import os

            h.update(b"blob %d\x00" % os.path.getsize(path))
        for chunk in _file_chunks(path):
            h.update(chunk)
        return h.hexdigest() == self.expected

    def verify_bytes(self, data: bytes) -> bool:
        """The verdict on a whole file held in memory (md5 also tried as md5-dos2unix)."""
        h = hashlib.new(self.algo)
        if self.git_blob:
            h.update(b"blob %d\x00" % len(data))
        h.update(data)
        if h.hexdigest() == self.expected:
            return True
        chunks = (data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK))
        return self.algo == "md5" and self.expected in dos2unix_md5s(chunks)

    def verify(self, path: str, streamed: bool) -> bool:
        """The verdict on a finished download at ``path`` whose bytes were (``streamed``) or were not fed to this
        verifier; an md5 that fails on the raw bytes is tried once more as md5-dos2unix."""
        if self.git_blob and not streamed:
            return self.check_file(path)
        if streamed and self.ok():
            return True
        if not streamed and self.check_file(path):
            return True
        return self.algo == "md5" and self.check_file(path, dos2unix=True)


class HashingWriter:
    """File wrapper that feeds a verifier; seeking back to offset 0 restarts it (client.download retries so)."""

    def __init__(self, raw: BinaryIO, verifier: "Verifier", size: Optional[int]):
        self._raw, self._verifier, self._size = raw, verifier, size
        verifier.start(size)

    def write(self, data: bytes) -> int:
        self._verifier.update(data)
        return self._raw.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._raw.seek(offset, whence)
        if pos == 0:
            self._verifier.start(self._size)
        return pos

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, size: Optional[int] = None) -> int:
        return self._raw.truncate(size)

    def flush(self) -> None:
        self._raw.flush()
