"""One list of files shared out to a prefetch's worker processes in small chunks, whoever is free taking the next.

A fixed share each (half the list to each of two workers) ends when the slower worker ends: one that starts later
or meets slower disk keeps its core busy while the other's sits idle (measured: the two workers of a 1500-file
prefetch ended 40-80 ms apart). Here each worker claims :data:`CHUNK` files at a time, and what is left at the end
is at most a chunk per worker.

The claims live in a small file: a counter (the next chunk) and each chunk's owner (the worker's index), changed
under a POSIX record lock (``lockf``), which the kernel drops when its holder exits or is killed: a worker that
dies mid-claim never blocks the others. A worker forked from the parent uses the inherited descriptor (those locks
belong to the process, not the descriptor); a spawned one opens the file by name. The parent reads the owners of a
worker that died, to fail the files it had claimed and not reported. Where ``fcntl`` is missing (Windows) the
chunks are dealt out in turn instead (worker ``i`` takes chunks ``i``, ``i + n``, ...).
"""
from __future__ import annotations

import mmap
import os
import struct
import tempfile
from typing import Any, Dict, List, Optional

try:
    import fcntl
except ImportError:  # Windows: chunks dealt out in turn
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHUNK", "WorkLine"]

CHUNK = 16  # files a worker claims at once (~5 us a claim: negligible next to ~0.5 ms of CPU per small file)
_COUNT = struct.Struct("@q")
_OWNER = struct.Struct("@h")
_NOBODY = -1


class WorkLine:
    """``paths`` in chunks that ``workers`` worker processes claim with :meth:`claim` (see module docstring).
    Made in the parent before the workers start; :meth:`close` it there once they have ended."""

    def __init__(self, paths: List[str], workers: int, chunk: int = CHUNK):
        self.paths = paths
        self.workers = max(1, workers)
        # small lists: at least ~4 chunks per worker, so that sharing still evens them out
        self.chunk = max(1, min(chunk, len(paths) // (self.workers * 4) or 1))
        self.n_chunks = -(-len(paths) // self.chunk)
        self.path: Optional[str] = None
        self._pid = os.getpid()
        self._fd: Optional[int] = None
        self._map: Optional[mmap.mmap] = None
        self._dealt: Dict[int, int] = {}  # without fcntl: worker index -> its next turn
        self._closed: Optional[bytes] = None  # the claims as they were when closed (held_by still answers)
        if fcntl is None or not self.n_chunks:
            return
        fd, self.path = tempfile.mkstemp(prefix="streamloader-prefetch-", suffix=".line")
        try:
            size = _COUNT.size + _OWNER.size * self.n_chunks
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            self._map[_COUNT.size:] = _OWNER.pack(_NOBODY) * self.n_chunks
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._fd = fd

    def __getstate__(self) -> Dict[str, Any]:  # (a spawned worker: it opens the file by name)
        state = dict(self.__dict__)
        state.update(_fd=None, _map=None, _pid=-1)
        return state

    def _shared(self) -> mmap.mmap:
        if self._map is None:  # (a spawned worker; a forked one uses the mapping and descriptor it inherited)
            assert self.path is not None
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            self._fd, self._map = fd, mmap.mmap(fd, 0)  # (still not its creator: its close() keeps the file)
        return self._map

    def claim(self, index: int) -> List[str]:
        """The next chunk's files, now worker ``index``'s; ``[]`` once every chunk is taken."""
        if self.path is None:
            turn = self._dealt.get(index, 0)
            self._dealt[index] = turn + 1
            return self._chunk(index + turn * self.workers)
        shared = self._shared()
        assert self._fd is not None
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            (number,) = _COUNT.unpack_from(shared, 0)
            if number >= self.n_chunks:
                return []
            _OWNER.pack_into(shared, _COUNT.size + _OWNER.size * number, index)  # (owner first: see held_by)
            _COUNT.pack_into(shared, 0, number + 1)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        return self._chunk(number)

    def _chunk(self, number: int) -> List[str]:
        return self.paths[number * self.chunk:(number + 1) * self.chunk] if 0 <= number < self.n_chunks else []

    def held_by(self, index: int) -> List[str]:
        """Every file of the chunks worker ``index`` claimed (the parent asks once that worker has died). A
        worker killed between marking a chunk and moving the counter on leaves it marked but unclaimed: the
        next claim gives it to another worker, whose mark then replaces this one."""
        if self.path is None:
            return [path for number in range(index, self.n_chunks, self.workers) for path in self._chunk(number)]
        shared = self._closed if self._closed is not None else self._shared()
        return [path for number in range(self.n_chunks)
                if _OWNER.unpack_from(shared, _COUNT.size + _OWNER.size * number)[0] == index
                for path in self._chunk(number)]

    def close(self) -> None:
        """Remove the shared file (the parent, once its workers have ended); idempotent."""
        if self._map is not None:
            self._closed = bytes(self._map)
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None and self._pid == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
