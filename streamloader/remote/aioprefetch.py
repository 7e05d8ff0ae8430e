"""The event-loop engine of prefetch: one thread runs an asyncio loop that keeps every request the host's limiter
allows in flight (on keep-alive connections, :mod:`streamloader.remote.leanhttp`), where the thread engine
(:func:`~streamloader.remote.prefetch.prefetch_in_threads`) needs a thread per request.

Why: a cold epoch of small files is bound by requests in flight and by the client's CPU per file. With a thread
per request, GIL hand-offs among up to 128 threads and requests/urllib3's per-request work cost ~2.4 ms of CPU per
30 KB file on a 2-core machine; here a file costs ~1 ms: llhttp's C parser, one hash, one temp file, the locks and
the commit.

Only the common case runs in the loop, and every guarantee of the cache holds there too:

* :meth:`RemoteRepo.try_warm <streamloader.remote.repo.RemoteRepo.try_warm>` takes, without waiting, the locks
  :meth:`~streamloader.remote.repo.RemoteRepo.warm` takes (the path's fetch lock, the entry's thread and
  cross-process locks), so a file is downloaded once whoever asks; the bytes are then verified (size, content hash)
  and committed by the same code (``DownloadClaim.store``; the loop runs the commits itself, a
  :class:`~streamloader.cache.writing.CommitBatch` at a time, one sync each) — nothing unverified is ever visible;
* each request takes a slot of the host's shared limiter (:meth:`~streamloader.remote.limits.HostLimiter.try_slot`)
  and reports how it went, so adaptive concurrency, pushback (429/503 + Retry-After) and the circuit breaker work
  as for every other request;
* the token goes only to the API origin (a redirect to a presigned storage URL goes without it).

Anything else — an error status, a dropped connection, a malformed answer or one the lean client leaves to a full
one (:class:`~streamloader.remote.leanhttp.Unsupported`), a lying or short body, a hash mismatch, a compressed body,
an entry whose lock is busy (another thread or process downloading it), a bucket path, a file larger than
:data:`IN_MEMORY_MAX` — is given back and done by :meth:`RemoteRepo.warm` in a small thread pool, with the full
retry policy and typed errors. ``STREAMLOADER_PREFETCH_ENGINE=threads`` turns this engine off.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import urljoin, urlsplit

from streamloader.cache.writing import CommitBatch
from streamloader.errors import HostUnreachableError
from streamloader.remote import leanhttp
from streamloader.remote.download import receive_body
from streamloader.remote.leanhttp import BodyTooLarge, ConnectionPool, ExchangeError, Unsupported
from streamloader.remote.limits import is_pushback, parse_retry_after
from streamloader.remote.transport import (REDIRECT_STATUSES, Body, origin_of, proxy_applies, requests_settings,
                                          tls_context)

if TYPE_CHECKING:
    from streamloader.remote.limits import Slot
    from streamloader.remote.repo import RemoteRepo, WarmClaim

log = logging.getLogger(__name__)

__all__ = ["ENGINE_ENV", "EngineCounts", "IN_MEMORY_MAX", "prefetch_async", "unusable"]

ENGINE_ENV = "STREAMLOADER_PREFETCH_ENGINE"
#: bodies up to this size are read into memory, then written and verified; a larger file goes to warm()
IN_MEMORY_MAX = 16 << 20
_MAX_REDIRECTS = 10
_FALLBACK_THREADS = 16
_DEFERRALS = 3  # times a file another thread or process is downloading is put back in line before warm() waits
_Outcome = Tuple[str, int, Optional[BaseException], bool]  # (path, size, error, was already cached)


class _GiveBack(Exception):
    """This download is not for the loop: hand it to :meth:`RemoteRepo.warm` (the reason is for the debug log)."""


def unusable(repo: "RemoteRepo") -> Optional[str]:
    """Why the event-loop engine cannot fetch for ``repo`` (then the thread engine does), or None if it can."""
    if os.environ.get(ENGINE_ENV, "").strip().lower() in ("threads", "thread", "sync"):
        return f"{ENGINE_ENV}=threads"
    if repo.cache is None or repo.offline:
        return "no cache, or offline"
    from streamloader.cache.entrylock import NONBLOCKING

    if not NONBLOCKING:
        return "the cache's entry locks cannot be tried without waiting here (no fcntl)"
    if leanhttp.httptools is None:
        return "httptools is not installed"
    if _proxied_or_client_cert(repo, repo.client.ref.host):
        return "a proxy or a client certificate applies to the host (requests handles those)"
    return None


def _proxied_or_client_cert(repo: "RemoteRepo", url: str) -> bool:
    session = repo.client.session
    settings = requests_settings(session, url)
    return proxy_applies(session, url, settings) or bool(settings.get("cert"))


def _ssl_context(repo: "RemoteRepo") -> Any:
    """TLS as requests would do it for the API host (:func:`~streamloader.remote.transport.tls_context` of its
    ``verify``: REQUESTS_CA_BUNDLE, the Session's, else certifi's authorities)."""
    return tls_context(requests_settings(repo.client.session, repo.client.ref.host).get("verify", True))


class EngineCounts:
    """What :func:`prefetch_async` did: ``in_loop`` files downloaded by the event loop, ``given_back`` handed to
    :meth:`RemoteRepo.warm` (errors, busy locks...), ``cached`` found in the cache already."""

    def __init__(self) -> None:
        self.in_loop = self.given_back = self.cached = 0

    def __repr__(self) -> str:
        return f"<EngineCounts in_loop={self.in_loop} given_back={self.given_back} cached={self.cached}>"


def prefetch_async(repo: "RemoteRepo", paths: List[str], workers: int, record: Callable[..., None],
                   cancelled: Optional[Any] = None, more: Optional[Callable[[], List[str]]] = None) -> EngineCounts:
    """Fetch ``paths`` into ``repo``'s cache with at most ``workers`` requests in flight (the host's limiter
    decides below that), calling ``record(path, size, error, cached)`` for each, in this thread; stops early once
    ``cancelled`` (a threading.Event) is set. ``more``: where more files come from once those are under way (a
    worker process's next chunk of a shared list; ``[]`` when there are none left). Returns once every file
    fetched is in place in the cache. Runs its own event loop: call it from a thread that has none running
    (prefetch's job thread, a worker process)."""
    engine = _Engine(repo, workers, record, cancelled)
    try:
        asyncio.run(engine.run(paths, more))
    finally:
        engine.close()
        if repo.cache is not None:
            repo.cache.flush()
    return engine.counts


class _Engine:
    def __init__(self, repo: "RemoteRepo", workers: int, record: Callable[..., None], cancelled: Optional[Any]):
        self.repo, self.record, self.cancelled = repo, record, cancelled
        self.workers = max(1, workers)
        self.limiter = repo.client.limiter
        self.policy = repo.client.retry
        self.auth = repo.client.session.auth
        self.agent = str(repo.client.session.headers.get("User-Agent", "streamloader"))
        self.api_origin = origin_of(repo.client.ref.host)
        self.pool = _DaemonPool(min(self.workers, _FALLBACK_THREADS), "streamloader-prefetch")
        self.lookups = _DaemonPool(2, "streamloader-dns")  # (apart: a warm() waiting on a lock never delays one)
        self.counts = EngineCounts()
        self.origins: Dict[str, bool] = {}  # redirect origins: whether requests must fetch them (_needs_requests)
        self.deferred: Dict[str, int] = {}  # files put back in line because someone else held them (_start)
        self.deferred_in: Dict[str, int] = {}  # ... and the pass through the line that last put each one back
        self.passes = 0
        self.primer = repo.primer([])  # run() makes the one of its list
        self.taken: List[str] = []
        self.more: Optional[Callable[[], List[str]]] = None
        self.finished: Deque["asyncio.Future[Optional[_Outcome]]"] = deque()  # downloads done, for run() to record
        self.wake: Optional["asyncio.Future[None]"] = None  # what run() waits on while none is done
        self.commits = CommitBatch()  # files landed, committed here together (not by the queue's thread)
        self.landed: List[_Outcome] = []  # ... and their outcomes, recorded once their batch is in place
        # the one batch whose sync runs in the syncer's thread meanwhile: (its commits, their outcomes, the sync)
        self.syncing: Optional[Tuple[List[Any], List[_Outcome], "Future[bool]"]] = None
        self.syncer = _DaemonPool(1, "streamloader-prefetch-sync")

    def _needs_requests(self, url: str) -> bool:
        """Whether a proxy or a client certificate applies to ``url``'s origin (then requests must fetch it);
        asked once per origin (a DVC file's redirect goes to the same storage origin every time)."""
        origin = origin_of(url)
        if origin == self.api_origin:
            return False
        known = self.origins.get(origin)
        if known is None:
            known = self.origins[origin] = _proxied_or_client_cert(self.repo, url)
        return known

    async def _resolve(self, host: str, port: int) -> List[Tuple[Any, ...]]:
        """``socket.getaddrinfo`` of an origin: at once for an IP address, else in a daemon thread (a lookup
        that hangs never holds the interpreter's exit, as the loop's default executor would)."""
        try:
            return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        return await asyncio.wrap_future(self.lookups.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM))

    def close(self) -> None:
        self.pool.shutdown()
        self.lookups.shutdown()
        self.syncer.shutdown()
        if self.counts.given_back:
            log.debug("prefetch: %s", self.counts)

    # -- scheduling -----------------------------------------------------------------------------------------------
    async def run(self, paths: List[str], more: Optional[Callable[[], List[str]]] = None) -> None:
        pending: Deque[str] = deque(paths)
        self.taken = list(paths)  # every file this engine was given, in order (what the primer primes)
        self.more = more
        self.primer = self.repo.primer(self.taken)
        running: Set["asyncio.Future[Optional[_Outcome]]"] = set()
        pace = (self.policy.read_timeout, self.policy.min_rate) if self.policy.min_rate > 0 else None
        session = ConnectionPool(lambda: _ssl_context(self.repo), self.policy.connect_timeout, self._resolve, pace)
        try:
            idle = 0.001
            while pending or running or self.more is not None:
                if self.cancelled is not None and self.cancelled.is_set():
                    pending.clear()
                    self.more = None
                    for task in running:
                        task.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
                    return
                wait = self._start(session, pending, running)
                if not running and not pending and self.more is None:
                    break  # the last files taken were all cached or failed at once
                if not running:  # every slot is someone else's, or the host asked us to pause
                    self._land_now()
                    await asyncio.sleep(min(max(wait, idle), 0.05))
                    idle = min(idle * 2, 0.05)
                    continue
                idle = 0.001
                self._land_soon()
                if not self.finished:
                    # (with files left: look at slots again; with commits waiting: run them in time; a sync that
                    # ends wakes the loop itself)
                    timeout = 0.05 if pending else None
                    if self.commits and self.syncing is None:
                        timeout = min(timeout or 1.0, self.commits.max_age)
                    await self._next_finish(timeout)
                while self.finished:
                    task = self.finished.popleft()
                    running.discard(task)
                    outcome = task.result()
                    if outcome is not None:  # (None: downloaded here, recorded once its commit has run)
                        self.record(*outcome)
        finally:
            for task in running:
                task.cancel()
            session.close()
            self._land_now()

    # -- commits of the files downloaded here -----------------------------------------------------------------------
    # A file is recorded (reported fetched) once its commit has put it in place, so that a worker process stopped
    # meanwhile (a cancel) never reports one it then lost. The sync of a batch waits for the disk: it runs in the
    # syncer's thread (one hand-off per batch) while the loop goes on; renaming into place and unlocking run here.
    def _land_soon(self) -> None:
        """Finish the batch whose sync has ended; start the sync of the next one once it is full or due."""
        syncing = self.syncing
        if syncing is not None:
            if not syncing[2].done():
                return
            self.syncing = None
            self._finish_batch(syncing[0], syncing[1], _synced_ok(syncing[2]))
        if self.commits and (len(self.commits) >= self.commits.max_len or self.commits.due()):
            commits, landed, self.landed = self.commits.take(), self.landed, []
            future = self.syncer.submit(CommitBatch.sync, commits)
            self.syncing = (commits, landed, future)
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._synced))

    def _synced(self) -> None:
        if self.wake is not None:
            _settle(self.wake)

    def _land_now(self) -> None:
        """Land everything downloaded here, waiting for the batch being synced: at the end, or with nothing in
        flight."""
        syncing, self.syncing = self.syncing, None
        if syncing is not None:
            self._finish_batch(syncing[0], syncing[1], _synced_ok(syncing[2]))
        landed, self.landed = self.landed, []
        self.commits.run()
        for outcome in landed:
            self.record(*outcome)

    def _finish_batch(self, commits: List[Any], landed: List[_Outcome], synced: bool) -> None:
        self.commits.finish(commits, synced)
        for outcome in landed:
            self.record(*outcome)

    async def _next_finish(self, timeout: Optional[float]) -> None:
        loop = asyncio.get_running_loop()
        self.wake = wake = loop.create_future()
        timer = loop.call_later(timeout, _settle, wake) if timeout is not None else None
        try:
            await wake
        finally:
            self.wake = None
            if timer is not None:
                timer.cancel()

    def _start(self, session: Any, pending: Deque[str], running: Set["asyncio.Future[Optional[_Outcome]]"]) -> float:
        """Start downloads while the limiter gives slots; returns how long waiting is worth when it gives none."""
        loop = asyncio.get_running_loop()
        while len(running) < self.workers and (pending or self._claim(pending)):
            if self.cancelled is not None and self.cancelled.is_set():
                return 0.0  # (a long run of cached files is walked here without returning to run())
            try:
                slot, wait = self.limiter.try_slot()
            except HostUnreachableError as exc:  # the breaker is open: this file fails at once, as warm() would
                self.record(pending.popleft(), 0, exc, False)
                continue
            if slot is None:
                return wait
            path = pending.popleft()
            self.primer.took()
            try:
                state, value = self.repo.try_warm(path)
            except Exception:  # noqa: BLE001 - whatever it is, warm() reports it properly
                state, value = "other", None
            if state == "claimed" and (value.size is None or value.size <= IN_MEMORY_MAX):
                self._track(running, loop.create_task(self._download(session, value, slot)))
                continue
            if state == "claimed":  # too large to hold in memory: warm() streams it to disk
                value.release()
                state = "other"
            slot.discard()
            if state == "cached":
                self.counts.cached += 1
                self.record(path, value, None, True)
            elif state == "busy" and pending and self.deferred.get(path, 0) < _DEFERRALS:
                # someone else is downloading it: do the others first (two processes prefetching the same list
                # then share the work instead of one waiting on the other), then look again
                self.deferred[path] = self.deferred.get(path, 0) + 1
                self.deferred_in[path] = self.passes
                pending.append(path)
                if self.deferred_in.get(pending[0]) == self.passes:
                    # every file left was put back in this pass: give their holders a moment, then look at
                    # them all again (one pause per pass, not one per file)
                    self.passes += 1
                    return 0.002
            else:
                self._track(running, self._give_back(path))
        return 0.0

    def _claim(self, pending: Deque[str]) -> bool:
        """Take the next files from ``more`` into ``pending`` (only when it has run dry: what is claimed and not
        started is what another worker could have done); False once there are none left."""
        if self.more is None:
            return False
        got = self.more()
        if not got:
            self.more = None
            return False
        self.taken.extend(got)
        pending.extend(got)
        return True

    def _track(self, running: Set["asyncio.Future[Optional[_Outcome]]"],
               task: "asyncio.Future[Optional[_Outcome]]") -> None:
        running.add(task)
        task.add_done_callback(self._finish)

    def _finish(self, task: "asyncio.Future[Optional[_Outcome]]") -> None:
        """A download ended: in line for run() (one callback per task, where ``asyncio.wait`` on the running set
        would add and remove one on every task in flight each time it waits)."""
        self.finished.append(task)
        if self.wake is not None:
            _settle(self.wake)

    def _give_back(self, path: str) -> "asyncio.Future[_Outcome]":
        """``path`` fetched by :meth:`RemoteRepo.warm` in the thread pool (waits, retries, typed errors)."""
        self.counts.given_back += 1
        return asyncio.wrap_future(self.pool.submit(self._warm, path))

    def _warm(self, path: str) -> _Outcome:
        try:
            size, cached = self.repo.warm(path)
        except BaseException as exc:  # noqa: BLE001 - reported through record()
            return path, 0, exc, False
        return path, size, None, cached

    # -- one download ---------------------------------------------------------------------------------------------
    async def _download(self, session: Any, claim: "WarmClaim", slot: "Slot") -> Optional[_Outcome]:
        try:
            try:
                body = await self._get(session, claim, slot)
            finally:
                slot.__exit__(None, None, None)  # gives the slot back, with the outcome set by _get
        except _GiveBack as why:
            claim.release()
            log.debug("prefetch of %s goes to the thread path: %s", claim.path, why)
            return await self._give_back(claim.path)
        except BaseException:  # cancelled: nothing was stored
            claim.release()
            raise

        def fill(f: Any) -> None:
            receive_body(body, f, claim.path, claim.url, 0, None, False, claim.size, None, [])

        try:
            # here, in the loop: a writer thread measured slower (its hand-offs cost more than the write it moves)
            size = claim.store(fill, self.commits)
        except Exception as exc:  # noqa: BLE001 - a short, lying or corrupt body: warm() retries it
            log.debug("prefetch of %s goes to the thread path: %s", claim.path, exc)
            return await self._give_back(claim.path)
        self.counts.in_loop += 1
        self.landed.append((claim.path, size, None, False))
        if len(self.commits) >= self.commits.max_len:
            self._land_soon()
        return None

    async def _get(self, session: ConnectionPool, claim: "WarmClaim", slot: "Slot") -> Body:
        """GET the claim's URL (redirects followed, the token only to the API origin) and read its body, within a
        time budget that keeps up the client's throughput floor (a server that drips bytes cannot hold it); tells
        ``slot`` how it went. :class:`_GiveBack` for anything but a plain 200 that fits in memory."""
        policy = self.policy
        limit = IN_MEMORY_MAX if claim.size is None else min(claim.size, IN_MEMORY_MAX)
        budget = policy.connect_timeout + policy.read_timeout + limit / policy.min_rate
        answered: List[bool] = []
        deadline = asyncio.get_running_loop().time() + budget
        try:
            return await self._exchange(session, claim, slot, limit, answered, deadline)
        except _GiveBack:
            raise
        except BodyTooLarge:
            slot.ok()
            raise _GiveBack(f"a body over {limit} bytes") from None
        except Unsupported as exc:
            slot.answered()  # (sent or not: nothing to learn about the host from it)
            raise _GiveBack(str(exc)) from None
        except (ExchangeError, OSError, ValueError) as exc:  # (ValueError: e.g. a Location no URL parser takes)
            if answered or getattr(exc, "answered", False):
                slot.answered()  # dropped mid-body, too slow, or a malformed answer: an answer, not an outage
            else:
                slot.unreachable(type(exc).__name__)
            raise _GiveBack(f"{type(exc).__name__}: {exc}") from None

    async def _exchange(self, session: ConnectionPool, claim: "WarmClaim", slot: "Slot", limit: int,
                        answered: List[bool], deadline: float) -> Body:
        url, policy = claim.url, self.policy
        for _hop in range(_MAX_REDIRECTS + 1):
            headers = {"User-Agent": self.agent, "Accept": "*/*", "Accept-Encoding": "identity",
                       **self.auth.headers_for(url)}
            resp = await session.get(url, headers, limit, deadline)
            answered.append(True)  # (the API host answered: a later hop's failure is not its outage)
            status = resp.status
            if status in REDIRECT_STATUSES and resp.headers.get("Location"):
                target = urljoin(url, resp.headers["Location"])
                if urlsplit(target).scheme not in ("http", "https") or self._needs_requests(target):
                    slot.answered()
                    raise _GiveBack(f"a redirect the thread path must judge (HTTP {status})")
                url = target
                continue
            if status != 200:
                hint = parse_retry_after(resp.headers.get("Retry-After"))
                if is_pushback(status, hint):
                    slot.throttled(None if hint is None else min(hint, policy.max_retry_after))
                else:
                    slot.answered()
                raise _GiveBack(f"HTTP {status}")
            slot.ok()  # the host answered what was asked; what the body is worth is checked below
            if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                raise _GiveBack("a compressed body")
            return Body(200, resp.headers, _chunks_of(resp.body), _nothing, url)
        slot.answered()
        raise _GiveBack(f"more than {_MAX_REDIRECTS} redirects")


class _DaemonPool:
    """At most ``size`` daemon threads running the calls :meth:`submit` is given (each returns a
    ``concurrent.futures.Future``). Unlike ThreadPoolExecutor's, these threads never hold up the interpreter's exit:
    a program that ends without waiting for a background prefetch abandons it, as the thread engine's daemon threads
    are abandoned (a download left half done is a temp file that is swept later; its locks go with the process),
    instead of waiting for each call in flight — one waiting on an entry lock may take the cache's lock timeout."""

    def __init__(self, size: int, name: str):
        self.size, self.name = max(1, size), name
        self._calls: "queue.SimpleQueue[Optional[Tuple[Future, Callable[..., Any], Tuple[Any, ...]]]]" = \
            queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a thread each time it waits for the next call
        self._threads: List[threading.Thread] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> "Future[Any]":
        future: "Future[Any]" = Future()
        self._calls.put((future, fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
            thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return future

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                    future.set_exception(exc)
            self._idle.release()

    def shutdown(self) -> None:
        """Cancel the calls not started yet, then wait for the running ones and stop the threads."""
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _thread in self._threads:
            self._calls.put(None)
        for thread in self._threads:
            thread.join()


def _synced_ok(future: "Future[bool]") -> bool:
    """The outcome of a batch's sync, waiting for it: False (each commit then fsyncs its own) if it failed."""
    try:
        return bool(future.result())
    except BaseException:  # noqa: BLE001 - whatever stopped the sync, the commits must still be finished
        return False


def _settle(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


def _chunks_of(data: bytes) -> Callable[[int], Iterator[bytes]]:
    def chunks(size: int) -> Iterator[bytes]:
        if len(data) <= size:
            yield data
            return
        view = memoryview(data)
        for start in range(0, len(data), size):
            yield bytes(view[start:start + size])
    return chunks


def _nothing() -> None:
    return None
