"""Concurrent fetching into the cache — the one home of prefetch: :func:`fetch_to_cache` (the engine behind every
``prefetch(...)``: ``RemoteRepo``, ``fs``, the hooks' ``streamloader.prefetch``, datasets, the CLI), what it returns
(:class:`PrefetchResult`, or a background :class:`PrefetchJob`; :func:`settle` picks) and its fan-out: one process,
or several worker processes, each fetching with :func:`prefetch_here`.

In a process the downloads run on an event loop (:mod:`streamloader.remote.aioprefetch` on
:mod:`streamloader.remote.leanhttp`: one thread, every request the host's limiter allows in flight), or, where that
cannot run, with a thread per request (:func:`prefetch_in_threads`). A small file still costs ~1 ms of client CPU
(HTTP, hash, temp file, locks, commit), which caps a cold epoch on a small machine; worker processes lift that cap. The cache is multi-process safe
(per-entry locks, atomic rename), so workers need no coordination beyond sharing out the list (a
:class:`~streamloader.remote.workline.WorkLine`: each takes the next small chunk when it has room) and reporting
what they fetched.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import queue as _queue
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from streamloader._files import reserve_fds
from streamloader.errors import HostUnreachableError, RemoteError, RemoteFileNotFoundError
from streamloader.remote.workline import WorkLine

if TYPE_CHECKING:
    from streamloader.remote.repo import RemoteRepo

log = logging.getLogger(__name__)

__all__ = ["PREFETCH_PROCESS_MIN_FILES", "Halt", "PrefetchJob", "PrefetchResult", "ProcessPrefetch",
           "fetch_to_cache", "prefetch_here", "prefetch_in_threads", "process_count", "settle"]

#: below this many files a prefetch stays in one process (starting workers costs more than it saves)
PREFETCH_PROCESS_MIN_FILES = 200
_REPORT_BATCH, _REPORT_EVERY = 64, 0.05  # a worker process reports this many files at once, or after this long
_STOP_GRACE = 5  # seconds a worker process told to stop (SIGTERM) may take to land its pending commits
_Record = Callable[[str, int, Optional[BaseException], bool], None]  # (path, size, error, was already cached)


@dataclass
class PrefetchResult:
    """What a prefetch did: ``files`` now in the cache (``bytes`` in all), of which ``cached`` (``cached_bytes``)
    were there already, wall time and the paths that failed (with their errors)."""

    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed: Dict[str, BaseException] = field(default_factory=dict)
    cached: int = 0
    cached_bytes: int = 0

    @property
    def downloaded(self) -> int:
        """Files downloaded by this prefetch."""
        return self.files - self.cached

    @property
    def downloaded_bytes(self) -> int:
        return self.bytes - self.cached_bytes

    @property
    def files_per_s(self) -> float:
        """Files downloaded per second (files already cached cost nothing and are not counted)."""
        return self.downloaded / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        from streamloader._units import human_size

        return (f"{self.downloaded:,} downloaded ({human_size(self.downloaded_bytes)}), {self.cached:,} already "
                f"cached, {len(self.failed):,} failed in {self.seconds:.2f} s")



def process_count(processes: Optional[int], n_paths: int, workers: int) -> int:
    if multiprocessing.current_process().daemon:
        return 1  # a daemonic process (e.g. a DataLoader worker) may not start children: use threads only
    if processes is None:
        processes = 1 if n_paths < PREFETCH_PROCESS_MIN_FILES else min(os.cpu_count() or 1, 4)
    return max(1, min(int(processes), n_paths or 1, workers))


def prefetch_in_threads(repo: RemoteRepo, paths: List[str], workers: int, record: _Record,
                        cancelled: Optional[threading.Event] = None,
                        more: Optional[Callable[[], List[str]]] = None) -> None:
    """Fetch ``paths`` (and what ``more`` gives once they are taken, see :func:`prefetch_here`) with up to
    ``workers`` threads; stops early (downloads not started are dropped) once ``cancelled``. Returns once every
    file fetched is in place in the cache (the commits left to the background are waited for).

    Threads are started as the host's limiter allows requests in flight (its limit plus a quarter, so that some
    always wait and the limit can grow), not all at once: a thread with no slot to take only adds GIL hand-offs
    (128 threads cost ~1 ms more CPU per small file than 32 on 2 cores)."""
    if not paths and more is None:
        return
    limiter = repo.client.limiter
    taken = list(paths)  # every file handed out, in order (what the primer primes)
    pending = _lined(paths, more, taken)
    primer = repo.primer(taken)
    take = threading.Lock()
    handed = [0, False]  # files handed to threads, and whether the line has run dry (both under ``take``)
    done: "_queue.SimpleQueue[Tuple[str, int, Optional[BaseException], bool]]" = _queue.SimpleQueue()
    stop = threading.Event()
    threads: List[threading.Thread] = []

    def work() -> None:
        while not stop.is_set():
            with take:
                path = next(pending, None)
                if path is None:
                    handed[1] = True
                    return
                handed[0] += 1
                primer.took()
            try:
                size, cached = repo.warm(path)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller through record()
                done.put((path, 0, exc, False))
            else:
                done.put((path, size, None, cached))

    def wanted() -> int:
        try:
            limit = limiter.current_limit()
        except Exception:  # noqa: BLE001 - no shared state: every thread at once, as before
            return workers
        return min(workers, limit + max(4, limit // 4))

    def grow() -> None:
        while len(threads) < wanted():
            thread = threading.Thread(target=work, name=f"streamloader-prefetch_{len(threads)}", daemon=True)
            thread.start()
            threads.append(thread)

    try:
        grow()
        recorded = 0
        while not (handed[1] and recorded == handed[0]):
            try:
                path, size, exc, cached = done.get(timeout=0.1)
            except _queue.Empty:
                if not any(t.is_alive() for t in threads) and done.empty():
                    return  # every thread ended (cancelled): nothing more will come
                grow()
                continue
            record(path, size, exc, cached)
            recorded += 1
            if cancelled is not None and cancelled.is_set():
                stop.set()
                return
            if len(threads) < workers:
                grow()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        if repo.cache is not None:
            repo.cache.flush()


def _fds_for(workers: int) -> int:
    """File descriptors a prefetch with ``workers`` requests in flight opens: a socket and a limiter slot per request,
    plus the cache's temp files and locks (see :func:`~streamloader._files.reserve_fds`)."""
    return 2 * workers + 32


def _lined(paths: List[str], more: Optional[Callable[[], List[str]]], taken: List[str]) -> Iterator[str]:
    """``paths``, then each batch ``more`` gives (appended to ``taken`` first) until it gives none."""
    yield from paths
    while more is not None:
        got = more()
        if not got:
            return
        taken.extend(got)
        yield from got


def prefetch_here(repo: RemoteRepo, paths: List[str], workers: int, record: _Record,
                  cancelled: Optional[threading.Event] = None,
                  more: Optional[Callable[[], List[str]]] = None) -> None:
    """Fetch ``paths`` in this process: with the event-loop engine (:mod:`streamloader.remote.aioprefetch`) where
    it can run, else with :func:`prefetch_in_threads`. Same contract either way. ``more()``: the next files to
    fetch, asked for once those given are all under way (``[]``: none left), e.g. a worker's next chunk of a
    :class:`~streamloader.remote.workline.WorkLine`."""
    from streamloader.remote import aioprefetch

    reserve_fds(_fds_for(workers))
    why = aioprefetch.unusable(repo)
    if why is None:
        aioprefetch.prefetch_async(repo, paths, workers, record, cancelled, more)
    else:
        log.debug("prefetch in threads: %s", why)
        prefetch_in_threads(repo, paths, workers, record, cancelled, more)


class Halt:
    """Ends a prefetch at the first HostUnreachableError (every other file of that host would fail alike, after the
    same wait) or when ``event`` is set (cancel); :meth:`finish` then fails the files never tried with that error."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: Optional[HostUnreachableError] = None
        self._reported: set = set()

    def note(self, path: str, exc: Optional[BaseException]) -> bool:
        """Count ``path`` as reported; True when ``exc`` stops the prefetch (then it is not worth a log line)."""
        self._reported.add(path)
        if not isinstance(exc, HostUnreachableError):
            return False
        if self.error is None:
            self.error = exc
            self.event.set()
        return True

    def finish(self, paths: Iterable[str], failed: Dict[str, BaseException], log_it: bool) -> None:
        if self.error is None:
            return
        missing = [path for path in paths if path not in self._reported]
        for path in missing:
            failed[path] = self.error
        ordered = sorted(failed.items(), key=lambda item: not isinstance(item[1], HostUnreachableError))
        failed.clear()
        failed.update(ordered)  # the host's error first: it is what result() raises
        if log_it:  # (the CLI prints its own line: it drops records marked prefetch_failure)
            log.warning("prefetch stopped: %s (%d files not fetched)", self.error,
                        sum(isinstance(exc, HostUnreachableError) for exc in failed.values()),
                        extra={"prefetch_failure": "*"})


def _start_method() -> str:
    # fork starts a worker in milliseconds (spawn/forkserver re-import everything: ~0.3 s each, a quarter of a
    # 2000-file cold epoch). It is safe here: the client rebuilds its session per pid, RemoteRepo and FileCache
    # renew their locks in the child, and the worker touches nothing else of the parent. macOS forbids it.
    methods = multiprocessing.get_all_start_methods()
    return "fork" if "fork" in methods and sys.platform != "darwin" else "spawn"


class ProcessPrefetch:
    """``paths`` shared out to ``n_procs`` worker processes, started at once (in the calling thread: fork from the
    thread that owns the process's state), each taking the next chunk of a :class:`WorkLine` while it has room;
    :meth:`collect` then takes their reports, from any thread."""

    def __init__(self, repo: RemoteRepo, paths: List[str], workers: int, n_procs: int):
        ctx = multiprocessing.get_context(_start_method())
        if ctx.get_start_method() == "fork":
            # the engine's modules (asyncio and the lean HTTP client: ~25 modules) are imported here once, for the
            # workers to inherit: each worker importing them itself cost ~10 ms of its start
            from streamloader.remote import aioprefetch  # noqa: F401
        self.queue = ctx.Queue()
        self.line = WorkLine(paths, n_procs)
        threads = [workers // n_procs + (1 if i < workers % n_procs else 0) for i in range(n_procs)]
        self.procs = [ctx.Process(target=_prefetch_worker, args=(repo, self.line, max(1, t), self.queue, i, os.getpid()),
                                  name=f"streamloader-prefetch-{i}", daemon=True)
                      for i, t in enumerate(threads)]
        self.unreported = set(paths)  # (each file is one worker's: the one that claimed its chunk)
        self._stop_lock = threading.Lock()
        _watch_at_exit(self)
        # SIGINT is blocked while the workers start, so one that arrives before a worker ignores it (its first act)
        # stays pending until then and is dropped: Ctrl-C is the parent's to handle, from the first instant
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
        try:
            for proc in self.procs:
                proc.start()
        except BaseException:
            self._stop()
            raise
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def collect(self, record: _Record, cancelled: Optional[threading.Event] = None) -> None:
        """Report every file through ``record`` until all workers are done (or ``cancelled`` is set); always
        stops the workers on the way out."""
        finished: set = set()
        try:
            while len(finished) < len(self.procs):
                if cancelled is not None and cancelled.is_set():
                    return
                try:
                    self._handle(self.queue.get(timeout=0.2), record, finished)
                    continue
                except _queue.Empty:
                    pass
                for index, proc in enumerate(self.procs):
                    if index in finished or proc.exitcode is None:
                        continue
                    # died without its end marker (killed, crashed): read what it sent before, fail the rest
                    try:
                        while True:
                            self._handle(self.queue.get(timeout=0.05), record, finished)
                    except _queue.Empty:
                        pass
                    if index not in finished:
                        finished.add(index)
                        self._fail(self.line.held_by(index), record, f"prefetch worker process {proc.name} exited "
                                   f"(code {proc.exitcode}) before fetching")
            # what no worker was left to claim (every one of them died)
            self._fail(self.line.paths, record, "no prefetch worker process was left to fetch")
        finally:
            self._stop()

    def _fail(self, paths: Iterable[str], record: _Record, why: str) -> None:
        for path in sorted(path for path in paths if path in self.unreported):
            self.unreported.discard(path)
            record(path, 0, RemoteError(f"{why} {path!r}"), False)

    def _handle(self, message: Tuple[int, List[Tuple[Optional[str], int, Any, bool]]], record: _Record,
                finished: set) -> None:
        index, reports = message  # a worker reports in batches: fewer pickles and hand-offs to its feeder thread
        for path, size, error, cached in reports:
            if path is None:
                finished.add(index)
            elif path in self.unreported:
                self.unreported.discard(path)
                record(path, size, _rebuild_error(path, error), cached)

    def _stop(self) -> None:
        """Stop every worker: SIGTERM (it lands its pending commits), then SIGKILL one still there after
        ``_STOP_GRACE`` + 1 s. Safe to call twice, from two threads (the collecting thread, the exit handler)."""
        with self._stop_lock:
            for proc in self.procs:
                if proc.pid is not None and proc.is_alive():
                    proc.terminate()
            deadline = time.monotonic() + _STOP_GRACE + 1
            for proc in self.procs:
                if proc.pid is not None:
                    proc.join(timeout=max(0.0, deadline - time.monotonic()))
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
            self.queue.close()
            self.queue.cancel_join_thread()
            self.line.close()
        _LIVE_FANOUTS.discard(self)


_LIVE_FANOUTS: "weakref.WeakSet[ProcessPrefetch]" = weakref.WeakSet()
_EXIT_HOOK_PID: List[int] = []


def _watch_at_exit(fanout: ProcessPrefetch) -> None:
    """Have the interpreter's exit stop ``fanout``'s workers, should they still run (a job that was never waited
    for). Registered after multiprocessing's own exit handler, so it runs first: that one SIGTERMs daemonic
    children and then joins them without a timeout, and a worker stuck where no signal handler runs would hold
    the exit forever."""
    _LIVE_FANOUTS.add(fanout)
    if _EXIT_HOOK_PID != [os.getpid()]:
        _EXIT_HOOK_PID[:] = [os.getpid()]
        atexit.register(_stop_live_fanouts)


def _stop_live_fanouts() -> None:
    if _EXIT_HOOK_PID != [os.getpid()]:
        return  # inherited by a child: not its workers
    for fanout in list(_LIVE_FANOUTS):
        fanout._stop()


class PrefetchJob:
    """A prefetch running in the background (``prefetch(..., wait=False)``): training can start at once.

    An item the training loop reaches before the job does is downloaded by the loop itself, and one the job is
    downloading right now is waited for: the cache downloads every file once either way. ``result()`` waits for the
    end and returns the PrefetchResult, or raises the first failure when ``on_error="raise"`` (each failure is also
    logged as it happens); ``cancel()`` stops the job: queued downloads are dropped, worker processes are stopped,
    and nothing partial ever becomes visible in the cache. Example::

        job = dataset.prefetch(wait=False)
        for images, scores in loader:     # starts now, not after the last download
            ...
        print(job.result())
    """

    def __init__(self, run: Optional[Callable[[threading.Event], "PrefetchResult"]], on_error: str = "raise",
                 on_cancel: Optional[Callable[[], None]] = None):
        self._cancelled = threading.Event()
        self._on_error, self._on_cancel = on_error, on_cancel
        self._future: "Future[PrefetchResult]" = Future()
        if run is None:  # see finished()
            return

        def body() -> None:
            try:
                self._future.set_result(run(self._cancelled))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever calls result()
                self._future.set_exception(exc)

        threading.Thread(target=body, name="streamloader-prefetch-job", daemon=True).start()

    @classmethod
    def finished(cls, result: "PrefetchResult", on_error: str = "raise") -> "PrefetchJob":
        """A job that has nothing to do: done, with ``result`` (no thread is started)."""
        job = cls(None, on_error)
        job._future.set_result(result)
        return job

    def done(self) -> bool:
        """True once the job ended (finished, failed or cancelled)."""
        return self._future.done()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: Optional[float] = None) -> "PrefetchResult":
        """Wait (up to ``timeout`` seconds: TimeoutError) and return what the prefetch did (see class docstring).

        Interrupting the wait (Ctrl-C) cancels the job.
        """
        try:
            result = self._future.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"prefetch still running after {timeout} s") from None
        except KeyboardInterrupt:
            self.cancel()
            raise
        if result.failed and self._on_error == "raise":
            raise next(iter(result.failed.values()))
        return result

    def cancel(self) -> None:
        """Stop the job (returns at once; ``result()`` then reports what was fetched until then)."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "done" if self.done() else "running"
        return f"<PrefetchJob {state}>"


def settle(job: PrefetchJob, wait: bool) -> Any:
    """``job`` itself when not waiting, else its result (what every ``prefetch(..., wait=...)`` returns)."""
    return job.result() if wait else job


def fetch_to_cache(repo: RemoteRepo, paths: Iterable[str], max_concurrency: Optional[int] = None,
                   progress: bool = True, on_error: str = "raise", processes: Optional[int] = None,
                   wait: bool = True) -> Any:
    """The engine behind :meth:`RemoteRepo.prefetch <streamloader.remote.repo.RemoteRepo.prefetch>` (see there):
    ``paths`` of ``repo`` into its cache, in threads or worker processes; a PrefetchResult, or a PrefetchJob."""
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    paths = list(dict.fromkeys(paths))
    # None: as many threads as the host's limiter may ever allow; its limit (shared by the machine's processes)
    # then sets how many requests are in flight, growing while the host keeps up, shrinking when it pushes back
    workers = max(1, min(max_concurrency or repo.client.limiter.limits.ceiling, len(paths) or 1))
    n_procs = process_count(processes, len(paths), workers)
    if n_procs > 1 and repo.cache is not None:
        try:
            repo.revision()  # resolved once here, not once per worker process
        except Exception:  # noqa: BLE001 - every path would fail alike: let the in-process path report it
            n_procs = 1
    else:
        n_procs = 1
    result = PrefetchResult()
    started = time.perf_counter()
    bar = None
    if progress:
        from streamloader._progress import progress_bar

        bar = progress_bar(total=len(paths), unit="file", desc="prefetch", leave=False)

    halt = Halt()  # an unreachable host ends the prefetch at once, with one message

    def record(path: str, size: int, exc: Optional[BaseException], cached: bool) -> None:
        stops = halt.note(path, exc)
        if exc is None:
            result.files += 1
            result.bytes += size
            result.cached += cached
            result.cached_bytes += size if cached else 0
        else:
            result.failed[path] = exc
            if not stops:
                log.warning("prefetch of %s failed: %s", path, exc, extra={"prefetch_failure": path})
        if bar is not None:
            bar.update(1)

    try:  # worker processes start here, in the caller's thread; the job's thread only collects their reports
        fanout = ProcessPrefetch(repo, paths, workers, n_procs) if n_procs > 1 else None
    except BaseException:
        if bar is not None:
            bar.close()
        raise

    def run(cancelled: threading.Event) -> PrefetchResult:
        try:
            if fanout is not None:
                fanout.collect(record, halt.event)
            else:
                prefetch_here(repo, paths, workers, record, halt.event)
        finally:
            if bar is not None:
                bar.close()
        halt.finish(paths, result.failed, log_it=on_error == "skip")
        result.seconds = time.perf_counter() - started
        return result

    return settle(PrefetchJob(run, on_error, on_cancel=halt.event.set), wait)


def _prefetch_worker(repo: RemoteRepo, line: WorkLine, workers: int, queue: Any, index: int, parent: int) -> None:
    """Body of one prefetch worker process: fetch the chunks of ``line`` it claims, report each file on ``queue``."""
    def watch_parent() -> None:
        while os.getppid() == parent:  # an orphan (parent SIGKILLed) must not go on downloading
            time.sleep(0.5)
        os._exit(1)

    reserve_fds(_fds_for(workers))  # while this process has one thread: no wait for the table to grow
    # Ctrl-C reaches the whole process group: the parent stops the workers, which must not die noisily on their own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while it started us
    signal.signal(signal.SIGTERM, _stop_handler(repo))  # the parent's terminate(): a cancel or the job's end
    threading.Thread(target=watch_parent, name="streamloader-prefetch-watch", daemon=True).start()
    batch: List[Tuple[Optional[str], int, Any, bool]] = []
    sent = [time.monotonic()]

    def report(path: str, size: int, exc: Optional[BaseException], cached: bool) -> None:
        batch.append((path, size, _portable_error(exc), cached))
        now = time.monotonic()
        if len(batch) >= _REPORT_BATCH or now - sent[0] >= _REPORT_EVERY:
            queue.put((index, batch[:]))
            batch.clear()
            sent[0] = now

    prefetch_here(repo, [], workers, report, more=lambda: line.claim(index))
    batch.append((None, 0, None, False))  # the end marker
    queue.put((index, batch))
    queue.close()
    queue.join_thread()


def _stop_handler(repo: RemoteRepo) -> Callable[[int, Any], None]:
    """A worker process's SIGTERM handler: land the commits of files already reported (they stay true), then go.

    It runs in the main thread between two of its bytecodes, so whatever lock that thread held stays held: the
    wait for commits is bounded (taking the queue's lock included), and the kernel ends the process if it is still
    there ``_STOP_GRACE`` s later (the parent, or multiprocessing's exit handler, joins it without a timeout)."""
    def stopped(_signum: int, _frame: Any) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(_STOP_GRACE)
        if repo.cache is not None:
            repo.cache.flush(_STOP_GRACE - 1)
        os._exit(0)

    return stopped


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
