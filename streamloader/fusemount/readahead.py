"""Folder read-ahead for the mount: a program that opens the files of one folder in listing order (tar, rsync,
``find | xargs cat``, a C++ loader walking a folder) gets the next files downloaded before it asks for them.

Each reader (FUSE reports the calling thread's id) has one *stream* per folder. An open of the file right after
the stream's last one (or a few files further: a reader may skip some) advances the stream and keeps the
``window`` files after it scheduled; any other open is a jump: the stream restarts there and its downloads that
have not started yet are cancelled. A first open starts nothing, so random access (a shuffling loader) costs no
extra downloads. Many readers walking one folder (``xargs -P 8``) each get their own stream; a file two streams
want is downloaded once (the cache's entry locks make sure of that even across processes). Usage::

    ahead = ReadAhead(fetch=repo.local_path, window=32)
    ahead.opened(("pid", "data"), index, folder_paths)   # on every open
    ahead.close()
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["ReadAhead"]

MAX_STREAMS = 64  # readers x folders followed at once; the least recently used stream is dropped (and cancelled)


@dataclass
class _Stream:
    cursor: int  # index of the last file this reader opened
    ahead: int  # highest index scheduled so far
    own: Dict[int, Future] = field(default_factory=dict)  # downloads this stream submitted (cancelled on a jump)


class ReadAhead:
    """Bounded, cancellable read-ahead over folder listings (see module docstring).

    ``fetch(path)`` downloads one file into the cache (its errors are logged, never raised: the reader's own open
    reports them); ``skip(path)`` says a file needs no prefetch (already cached, too big). ``window`` is how many
    files ahead of each reader are kept scheduled; at most ``workers`` downloads run at once (default: window).
    """

    def __init__(self, fetch: Callable[[str], Any], window: int = 32, workers: Optional[int] = None,
                 skip: Optional[Callable[[str], bool]] = None):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._fetch = fetch
        self._skip = skip
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers or window), thread_name_prefix="readahead")
        self._streams: "OrderedDict[Hashable, _Stream]" = OrderedDict()
        self._scheduled: Dict[str, Future] = {}  # path -> its pending or running download (any stream)
        # reentrant: cancelling a future under the lock runs its done callback (_forget) in the same thread
        self._lock = threading.RLock()
        self._closed = False
        self.submitted = self.cancelled = 0  # counters, for logs and tests

    def opened(self, key: Hashable, index: int, paths: Sequence[str]) -> None:
        """A reader (``key``: reader and folder) opened ``paths[index]``; ``paths`` is the folder's files in order."""
        with self._lock:
            if self._closed:
                return
            stream = self._streams.get(key)
            if stream is not None and stream.cursor < index <= stream.cursor + self.window:
                self._streams.move_to_end(key)
                stream.cursor = index
                for done in [i for i, fut in stream.own.items() if i <= index or fut.done()]:
                    del stream.own[done]
                first, last = max(stream.ahead, index) + 1, min(len(paths), index + self.window + 1)
                stream.ahead = max(stream.ahead, last - 1)
                wanted = [(i, paths[i]) for i in range(first, last)]
            else:
                if stream is not None:
                    self._cancel(stream)
                self._streams[key] = _Stream(cursor=index, ahead=index)
                self._streams.move_to_end(key)
                while len(self._streams) > MAX_STREAMS:
                    self._cancel(self._streams.popitem(last=False)[1])
                return
        for i, path in wanted:  # outside the lock: skip() may stat a file
            if self._skip is not None and self._skip(path):
                continue
            with self._lock:
                if self._closed or path in self._scheduled:
                    continue
                future = self._pool.submit(self._run, path)
                self._scheduled[path] = future
                stream.own[i] = future
                self.submitted += 1
            future.add_done_callback(lambda fut, p=path: self._forget(p, fut))

    def _cancel(self, stream: _Stream) -> None:
        for future in stream.own.values():
            if future.cancel():
                self.cancelled += 1
        stream.own.clear()

    def _forget(self, path: str, future: Future) -> None:
        with self._lock:
            if self._scheduled.get(path) is future:
                del self._scheduled[path]

    def _run(self, path: str) -> None:
        started = time.perf_counter()
        try:
            self._fetch(path)
        except Exception as exc:  # noqa: BLE001 - a prefetch failure only loses the head start
            log.debug("read-ahead of %s failed: %s", path, exc)
            return
        log.debug("read ahead %s in %.3f s", path, time.perf_counter() - started)

    def pending(self) -> int:
        """Downloads scheduled or running now."""
        with self._lock:
            return len(self._scheduled)

    def close(self) -> None:
        """Cancel what has not started and stop the workers (running downloads finish in the background)."""
        with self._lock:
            self._closed = True
            for stream in self._streams.values():
                self._cancel(stream)
            self._streams.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
