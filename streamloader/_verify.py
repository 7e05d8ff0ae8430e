"""Verifying downloaded bytes against a cache key's content hash while they are written."""
from __future__ import annotations

import hashlib
from typing import BinaryIO, Optional

__all__ = ["Verifier", "HashingWriter"]


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
