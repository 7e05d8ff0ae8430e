"""Prefetch fan-out: a thread pool in one process, or several worker processes each with its own pool.

One process spends ~1 ms of CPU per small file (HTTP library, verified cache write) under the GIL, which caps a cold
epoch well below what the network allows; worker processes lift that cap. The cache is multi-process safe (per-entry
flock, atomic rename), so workers need no coordination beyond reporting what they fetched.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue as _queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from streamloader.errors import RemoteError, RemoteFileNotFoundError

if TYPE_CHECKING:
    from streamloader.remote.repo import RemoteRepo

log = logging.getLogger(__name__)

__all__ = ["PREFETCH_PROCESS_MIN_FILES", "process_count", "prefetch_in_threads", "prefetch_in_processes"]

#: below this many files a prefetch stays in one process (starting workers costs more than it saves)
PREFETCH_PROCESS_MIN_FILES = 200
_Record = Callable[[str, int, Optional[BaseException]], None]


def process_count(processes: Optional[int], n_paths: int, workers: int) -> int:
    if multiprocessing.current_process().daemon:
        return 1  # a daemonic process (e.g. a DataLoader worker) may not start children: use threads only
    if processes is None:
        processes = 1 if n_paths < PREFETCH_PROCESS_MIN_FILES else min(os.cpu_count() or 1, 4)
    return max(1, min(int(processes), n_paths or 1, workers))


def prefetch_in_threads(repo: RemoteRepo, paths: List[str], workers: int, record: _Record) -> None:
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamloader-prefetch") as pool:
        futures = {pool.submit(repo.local_path, p): p for p in paths}
        for fut in as_completed(futures):
            p = futures[fut]
            exc = fut.exception()
            record(p, repo.info(p).size if exc is None else 0, exc)


def _start_method() -> str:
    # fork starts a worker in milliseconds (spawn/forkserver re-import everything: ~0.3 s each, a quarter of a
    # 2000-file cold epoch). It is safe here: the client rebuilds its session per pid, RemoteRepo and FileCache
    # renew their locks in the child, and the worker touches nothing else of the parent. macOS forbids it.
    methods = multiprocessing.get_all_start_methods()
    return "fork" if "fork" in methods and sys.platform != "darwin" else "spawn"


def prefetch_in_processes(repo: RemoteRepo, paths: List[str], workers: int, n_procs: int, record: _Record) -> None:
    """Split ``paths`` over ``n_procs`` worker processes; each reports ``(index, path, size, error)`` per file."""
    ctx = multiprocessing.get_context(_start_method())
    queue = ctx.Queue()
    chunks = [paths[i::n_procs] for i in range(n_procs)]
    threads = [workers // n_procs + (1 if i < workers % n_procs else 0) for i in range(n_procs)]
    procs = [ctx.Process(target=_prefetch_worker, args=(repo, chunk, max(1, t), queue, i, os.getpid()),
                         name=f"streamloader-prefetch-{i}", daemon=True)
             for i, (chunk, t) in enumerate(zip(chunks, threads))]
    pending = [set(chunk) for chunk in chunks]
    finished: set = set()

    def handle(message: Tuple[int, Optional[str], int, Any]) -> None:
        index, path, size, error = message
        if path is None:
            finished.add(index)
        elif path in pending[index]:
            pending[index].discard(path)
            record(path, size, _rebuild_error(path, error))

    try:
        for proc in procs:
            proc.start()
        while len(finished) < n_procs:
            try:
                handle(queue.get(timeout=0.2))
                continue
            except _queue.Empty:
                pass
            for index, proc in enumerate(procs):
                if index in finished or proc.exitcode is None:
                    continue
                # died without its end marker (killed, crashed): read what it sent before, fail the rest
                try:
                    while True:
                        handle(queue.get(timeout=0.05))
                except _queue.Empty:
                    pass
                if index not in finished:
                    finished.add(index)
                    for path in sorted(pending[index]):
                        record(path, 0, RemoteError(f"prefetch worker process {proc.name} exited "
                                                    f"(code {proc.exitcode}) before fetching {path!r}"))
                    pending[index].clear()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        queue.close()
        queue.cancel_join_thread()


def _prefetch_worker(repo: RemoteRepo, paths: List[str], workers: int, queue: Any, index: int, parent: int) -> None:
    """Body of one prefetch worker process: fetch ``paths`` with a thread pool, report each one on ``queue``."""
    def watch_parent() -> None:
        while os.getppid() == parent:  # an orphan (parent SIGKILLed) must not go on downloading
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch_parent, name="streamloader-prefetch-watch", daemon=True).start()
    prefetch_in_threads(repo, paths, workers,
                         lambda path, size, exc: queue.put((index, path, size, _portable_error(exc))))
    queue.put((index, None, 0, None))
    queue.close()
    queue.join_thread()


def _portable_error(exc: Optional[BaseException]) -> Any:
    """The exception itself when it survives pickling, else ``(type name, message, is a missing file)``."""
    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        return (type(exc).__name__, str(exc), isinstance(exc, FileNotFoundError))


def _rebuild_error(path: str, error: Any) -> Optional[BaseException]:
    if error is None or isinstance(error, BaseException):
        return error
    type_name, message, missing = error
    if missing:
        return RemoteFileNotFoundError(path)
    return RemoteError(f"prefetch of {path!r} failed in a worker process: {type_name}: {message}")
