"""Sending file bodies (from disk or from memory) with optional Range support, for every raw route (default and
dagshub-like modes, buckets) and the presigned origin; the handler is one :func:`httpd.send_head` takes."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, BinaryIO, Dict, Iterator, Optional

from streamloader.server.httpd import send_head
from streamloader.server.routes import HTTPError, Unsatisfiable, parse_range

log = logging.getLogger(__name__)

__all__ = ["Blob", "send_blob"]

_CHUNK = 256 * 1024


class Blob:
    """Bytes to serve: an open file (``Blob.open(path)``) or bytes in memory (``Blob(data=...)``); close it."""

    def __init__(self, data: Optional[bytes] = None, fh: Optional[BinaryIO] = None):
        self.data, self.fh = data, fh
        self.size = len(data) if data is not None else os.fstat(fh.fileno()).st_size  # type: ignore[union-attr]

    @classmethod
    def open(cls, path: str) -> "Blob":
        """A file on disk; HTTPError 403 if it cannot be read."""
        try:
            return cls(fh=open(path, "rb"))
        except PermissionError:
            raise HTTPError(403, "permission denied") from None

    def chunks(self, start: int, length: int, piece: int = _CHUNK) -> Iterator[bytes]:
        """``length`` bytes from ``start``, in pieces of ``piece`` bytes (fewer if the file shrank meanwhile)."""
        if self.data is not None:
            for pos in range(start, start + length, piece):
                yield self.data[pos : min(pos + piece, start + length)]
            return
        assert self.fh is not None
        self.fh.seek(start)
        while length > 0:
            chunk = self.fh.read(min(piece, length))
            if not chunk:
                return
            yield chunk
            length -= len(chunk)

    def close(self) -> None:
        """Close the file, if any."""
        if self.fh is not None:
            self.fh.close()

    def __enter__(self) -> "Blob":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def send_blob(handler: Any, blob: Blob, honour_range: bool, headers: Optional[Dict[str, str]] = None,
              drop: bool = False, drip: Optional[float] = None) -> None:
    """Answer 200 with the whole blob, or 206/416 for a Range when ``honour_range``. Faults: ``drop`` sends half
    the body and closes the connection; ``drip`` sends it one byte every ``drip`` seconds."""
    size = blob.size
    span = None
    if honour_range:
        try:
            span = parse_range(handler.headers.get("Range"), size)
        except Unsatisfiable:
            raise HTTPError(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"}) from None
    start, end = span if span is not None else (0, size - 1)
    length = end - start + 1
    fields = {"Accept-Ranges": "bytes"} if honour_range else {}
    if span is not None:
        fields["Content-Range"] = f"bytes {start}-{end}/{size}"
    if not send_head(handler, 206 if span is not None else 200, "application/octet-stream", length,
                     {**fields, **(headers or {})}):
        return
    for chunk in blob.chunks(start, length // 2 if drop else length, _CHUNK if drip is None else 1):
        handler.wfile.write(chunk)
        if drip is not None:  # a slow drip: the connection lives on, the body barely moves
            time.sleep(drip)
    if drop:
        log.debug("drop fault: closed after half of the body")
        handler.close_connection = True
