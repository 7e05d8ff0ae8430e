"""DVC 2's content hash ("md5-dos2unix"), as dagshub.com reports it in the ``hash`` of DVC-tracked files.

DVC 2 decided per file whether it is text by looking at its first 512 bytes (``dvc/istextfile.py``: empty is text,
a NUL byte makes it binary, more than 30% bytes outside printable ASCII + ``\\n\\r\\t\\f\\b`` make it binary), and for
text files it hashed the content read in 1 MiB chunks with every ``\\r\\n`` inside a chunk replaced by ``\\n``
(``dvc/utils/__init__.py::_fobj_md5``; a CRLF split across two chunks stays as it is). So the md5 of a CRLF text
file is NOT the md5 of its bytes. Example::

    dvc_md5_bytes(b"a\\r\\nb\\r\\n") == hashlib.md5(b"a\\nb\\n").hexdigest()
"""
from __future__ import annotations

import hashlib
__all__ = ["istextblock", "dvc_md5_bytes", "dvc_md5_file", "TEXT_BLOCK_SIZE"]

TEXT_BLOCK_SIZE = 512  # dvc.istextfile.DEFAULT_CHUNK_SIZE
_CHUNK = 2**20  # dvc.utils.LOCAL_CHUNK_SIZE: dos2unix runs per chunk of this size
_TEXT_CHARS = bytes(range(32, 127)) + b"\n\r\t\f\b"


def istextblock(block: bytes) -> bool:
    """DVC 2's text heuristic on a file's first block (``istextblock(b"") is True``)."""
    if not block:
        return True
    if b"\x00" in block:
        return False
    nontext = block.translate(None, _TEXT_CHARS)
    return len(nontext) / len(block) <= 0.30


def dvc_md5_file(path: str) -> str:
    """The md5 DVC 2 records for a file (see module docstring)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        chunk = fh.read(_CHUNK)  # a buffered read of a regular file returns the full size unless at EOF
        text = istextblock(chunk[:TEXT_BLOCK_SIZE])
        while chunk:
            digest.update(chunk.replace(b"\r\n", b"\n") if text else chunk)
            chunk = fh.read(_CHUNK)
    return digest.hexdigest()


def dvc_md5_bytes(data: bytes) -> str:
    """:func:`dvc_md5_file` for content held in memory."""
    text = istextblock(data[:TEXT_BLOCK_SIZE])
    digest = hashlib.md5()
    for start in range(0, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        digest.update(chunk.replace(b"\r\n", b"\n") if text else chunk)
    return digest.hexdigest()
