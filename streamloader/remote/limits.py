"""Per-host request limits shared by every thread and every process of one machine.

Each request to a host first takes a slot, then says how it went::

    limiter = host_limiter("https://dagshub.com")
    with limiter.slot(deadline=time.time() + 900) as slot:   # waits (bounded) while the host is saturated/paused
        ...                                                   # send the request, read the answer
        slot.throttled(retry_after=2.0)                       # or slot.unreachable("ConnectionRefusedError"),
                                                              # slot.answered() (an HTTP error); success by default

From those reports the limiter keeps, per host:

* a concurrency limit, AIMD like TCP's window: a pushback (429, or 503 with Retry-After) cuts the limit to 0.7 of
  what was in flight when the refused request went out (CUBIC's factor), counted as the limit it went out under:
  no more were in flight then. (By the time a refusal is reported, those refused with it have left, so what is in
  flight then understates it; and in slow start the limit has grown since, so it may overstate it.) Once per round
  of requests: a 429 for a request sent before the last cut, or within a round (the fastest request time) after
  it, does not cut again -- the host was still busy with what went before (refused requests count there until
  they are answered). Measured against a server that refuses more than 128 / 80 / 40 in flight at 100 ms (2000
  files, 3 runs each): 2.41-2.56 / 3.40-3.46 / 6.33-6.44 s. Counting what was in flight at the report when that
  was more, and cutting again for requests sent just after a cut, took 2.51-2.62 / 3.48-3.64 / 6.34-7.02 s with
  more refusals (0.7 of 256 after slow start, then cut after cut); halving what was still in flight took 4.6-5.1 s
  against 80. Each success while requests wait for a slot raises it, by one per success until the
  first pushback (slow start), then by one per ``limit`` successes, up to ``ceiling`` — but only while the host
  answers as fast as it did (a moving average of request times within twice the fastest seen, plus 5 ms): a host
  that slows down as more requests reach it is pushing back too, and more in flight would not bring more
  throughput (this only holds the limit: it falls on pushbacks alone);
* a pause: a ``Retry-After`` (seconds or an HTTP date) holds back every thread and process until then;
* a circuit breaker: after ``breaker_failures`` connection-level failures in a row (refused, reset, timed out, too
  slow) over at least ``breaker_outage`` seconds, requests fail at once with HostUnreachableError for
  ``breaker_cooldown`` seconds; then one probe request may try, and any answer from the host closes the breaker.

Sharing: one small file per host in :func:`limits_dir` holds a header (limit, pause, breaker; mmapped, changed
under a one-byte lock) and the slots, one-byte open-file-description locks (streamloader/remote/_slots.py): the
kernel drops the locks of a process that exits or is killed, so a dead process never keeps a slot. A free slot
costs two ``fcntl`` calls, ~4-6 µs per request in all on a loaded 2-core VM (tests/test_limits.py measures it).
Where such locks are missing (not Linux, some network file systems) the limits are per process.
Knobs: ``STREAMLOADER_HOST_LIMITS="ceiling=64,initial=16,breaker_cooldown=10"`` (fields of :class:`HostLimits`).
"""
from __future__ import annotations

import email.utils
import hashlib
import logging
import math
import os
import random
import struct
import threading
import time
from dataclasses import dataclass, fields, replace
from datetime import timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from streamloader import _forksafe
from streamloader._files import makedirs_private
from streamloader.errors import HostUnreachableError, RemoteError
from streamloader.remote._slots import HEADER_SIZE, OFD_LOCKS, FileSlots, LocalSlots

log = logging.getLogger(__name__)

__all__ = ["HostLimits", "HostLimiter", "Slot", "host_limiter", "is_pushback", "limits_dir", "parse_retry_after", "ENV_VAR",
           "DIR_ENV_VAR"]

ENV_VAR = "STREAMLOADER_HOST_LIMITS"
DIR_ENV_VAR = "STREAMLOADER_LIMITS_DIR"

_MAGIC = 0x534C4C4D00000001  # "SLLM", header layout 1
_HEADER = struct.Struct("@Q8d")
# header fields, as indices into the unpacked tuple (index 0 is the magic number); times are time.time() values
_LIMIT, _SSTHRESH, _PAUSE, _DECREASED, _FAILURES, _FIRST_FAILURE, _OPEN_UNTIL = range(1, 8)
_BETA = 0.7  # a pushback cuts what was in flight to this fraction (CUBIC's factor, RFC 9438; Reno's 0.5 lost more)
_MAX_SLOTS = 4096
_WAIT_POLL = 0.02  # a process sees slots freed by other processes within this long


@dataclass(frozen=True)
class HostLimits:
    """The knobs of every host's limiter; override with ``STREAMLOADER_HOST_LIMITS="name=value,..."``."""

    initial: int = 32  # concurrency limit of a host not seen before
    # the limit never grows past this: 128 left a 2-core client's loops idle a third of the time on small files at
    # 20 ms (a cold fetch of 1500: 430-460 ms, 360-400 ms at 256); a host with a hard limit below it pushes back
    ceiling: int = 256
    floor: int = 1  # nor falls below this
    max_pause: float = 60.0  # the longest Retry-After honoured at once
    breaker_failures: int = 5
    breaker_outage: float = 1.0
    breaker_cooldown: float = 5.0

    @classmethod
    def from_env(cls) -> "HostLimits":
        """Defaults overridden by ``STREAMLOADER_HOST_LIMITS`` (a bad item is logged and ignored)."""
        values: Dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in os.environ.get(ENV_VAR, "").split(","))):
            name, _, text = item.partition("=")
            name = name.strip()
            try:
                default = getattr(cls, name) if name in {f.name for f in fields(cls)} else None
                if default is None:
                    raise ValueError("unknown knob")
                values[name] = type(default)(text.strip())
            except ValueError as exc:
                log.warning("ignoring %s item %r: %s", ENV_VAR, item, exc)
        limits = cls(**values)
        ceiling = min(max(1, limits.ceiling), _MAX_SLOTS)
        floor = min(max(1, limits.floor), ceiling)
        return replace(limits, ceiling=ceiling, floor=floor, initial=min(max(limits.initial, floor), ceiling))


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value, delay-seconds (``"120"``, ``"0.5"``) or an HTTP date (``"Wed,
    21 Oct 2026 07:28:00 GMT"``, relative to ``now``, default time.time()); None when it is neither."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)  # RFC 9110: HTTP dates are GMT
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def is_pushback(status: int, retry_after: Optional[float]) -> bool:
    """Whether an answer pushes back (the limiter cuts its limit): a 429, or a 503 with a Retry-After (a bare 503
    is a server error)."""
    return status == 429 or (status == 503 and retry_after is not None)


def limits_dir() -> str:
    """``$STREAMLOADER_LIMITS_DIR``, else ``limits/`` in the cache directory: the place every process of a job (and
    every job of the user) agrees on, as they share the cache."""
    env = os.environ.get(DIR_ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    from streamloader.cache import default_cache_dir

    return os.path.join(default_cache_dir(), "limits")


class Slot:
    """One request in flight to a host (:meth:`HostLimiter.slot`). Say how it went before the ``with`` ends; a block
    that ends normally counts as a success, one that raises as :meth:`answered`."""

    __slots__ = ("_limiter", "_backend", "_fd", "_index", "_probe", "started", "limit", "_outcome", "_retry_after")

    def __init__(self, limiter: "HostLimiter", backend: Any, fd: int, index: int, probe: Optional[int],
                 started: float, limit: int = 0):
        self._limiter, self._backend, self._fd, self._index, self._probe = limiter, backend, fd, index, probe
        self.started = started
        self.limit = limit  # the host's limit when this slot was taken
        self._outcome: Optional[str] = None
        self._retry_after: Optional[float] = None

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._limiter._release(self, self._outcome or ("ok" if exc_type is None else "answered"))

    def ok(self) -> None:
        """The host answered what was asked."""
        self._outcome = "ok"

    def answered(self) -> None:
        """The host answered, with an error that is no pushback (e.g. 404, 500, a body cut short)."""
        self._outcome = "answered"

    def throttled(self, retry_after: Optional[float] = None) -> None:
        """The host pushed back (429, 503 with Retry-After); ``retry_after``: seconds it asked us to wait."""
        self._outcome, self._retry_after = "throttled", retry_after

    def discard(self) -> None:
        """Give the slot back unused (no request was sent): nothing is reported."""
        self._limiter._release(self, "unused")

    def unreachable(self, reason: str) -> None:
        """No answer: refused, reset, timed out or too slow (``reason`` says which; it names no secret)."""
        self._outcome = "unreachable"
        self._limiter._last_reason = reason


class HostLimiter:
    """Slots and limits of one host (``origin``), shared through the file ``path`` (see module docstring)."""

    def __init__(self, origin: str, limits: HostLimits, path: Optional[str]):
        self.origin, self.limits, self.path = origin, limits, path
        self._backend: Any = None
        self._last_reason: Optional[str] = None
        self._after_fork()

    def _after_fork(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.abandon()
        self._open_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())  # this process's waiters, woken by its releases
        self._waiters = 0
        self._last_wait = -math.inf  # time.monotonic() of the last acquire that found every slot busy
        self._fastest = math.inf  # seconds: the fastest successful request seen (drifting up slowly)
        self._average = 0.0  # seconds: moving average of successful request times (this process's)
        self._local = threading.local()

    @property
    def shared(self) -> bool:
        """Whether the limits are shared with other processes (False: per process)."""
        return bool(self._state().shared)

    def _state(self) -> Any:
        backend = self._backend
        if backend is None:
            with self._open_lock:
                if self._backend is None:
                    self._backend = self._open()
                backend = self._backend
        return backend

    def _open(self) -> Any:
        backend: Any = None
        if OFD_LOCKS and self.path:
            try:
                makedirs_private(os.path.dirname(self.path))
                backend = FileSlots(self.path, _MAX_SLOTS)
            except OSError as exc:
                log.debug("request limits of %s are per process (%s)", self.origin, exc)
        backend = backend or LocalSlots(HEADER_SIZE)
        if _HEADER.unpack_from(backend.header)[0] != _MAGIC:
            backend.lock_header()
            try:
                if _HEADER.unpack_from(backend.header)[0] != _MAGIC:  # fields first, then the magic that vouches
                    _HEADER.pack_into(backend.header, 0, 0, float(self.limits.initial), float(self.limits.ceiling),
                                      0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
                    struct.pack_into("@Q", backend.header, 0, _MAGIC)
            finally:
                backend.unlock_header()
        return backend

    # -- taking a slot --------------------------------------------------------------------------------------------
    def slot(self, deadline: Optional[float] = None) -> Slot:
        """Wait for a slot and return it (use it in a ``with``). ``deadline`` (a time.time() value, default 15 min
        from now) bounds the wait: past it, RemoteError (status 429). HostUnreachableError at once while the
        breaker is open."""
        deadline = time.time() + 900 if deadline is None else deadline
        delay = 0.001
        while True:
            got, now, wait, why = self._take()
            if got is not None:
                return got
            self._check_deadline(deadline, now + wait, why)
            if wait:
                time.sleep(min(wait, 0.25))
                continue
            self._last_wait = time.monotonic()
            with self._cond:
                self._waiters += 1
                try:
                    self._cond.wait(delay)
                finally:
                    self._waiters -= 1
            delay = min(delay * 2, _WAIT_POLL)

    def try_slot(self) -> Tuple[Optional[Slot], float]:
        """:meth:`slot` without waiting (for an event loop): ``(a slot, 0)``, or ``(None, seconds worth waiting
        before trying again)`` while the host is paused or every slot is taken. HostUnreachableError at once while
        the breaker is open."""
        got, _now, wait, _why = self._take()
        if got is None:
            self._last_wait = time.monotonic()  # requests wait: the limit binds (see _report)
        return got, wait

    def _take(self) -> Tuple[Optional[Slot], float, float, str]:
        """One try at a slot: (the slot or None, now, seconds of the host's pause left or 0, why there is none)."""
        backend = self._backend or self._state()
        limits, local = self.limits, self._local
        header = _HEADER.unpack_from(backend.header)
        now = time.time()
        open_until = header[_OPEN_UNTIL]
        if open_until and 0 < open_until - now <= 10 * limits.breaker_cooldown + 60:
            raise self._unreachable(header, now)
        pause = header[_PAUSE] - now
        if 0 < pause <= limits.max_pause + 1:
            return None, now, pause, f"it asked to wait {pause:.1f} s"
        limit = min(max(int(header[_LIMIT]), limits.floor), limits.ceiling)
        probe = None
        if open_until:  # the cool-down is over: one probe at a time may try
            probe = backend.take_probe()
            if probe is None:
                raise self._unreachable(header, now)
        start = getattr(local, "index", None)
        got = backend.take(start if start is not None and start < limit else random.randrange(limit), limit)
        if got is not None:
            local.index = got[1]
            return Slot(self, backend, got[0], got[1], probe, now, limit), now, 0.0, ""
        if probe is not None:
            backend.give_probe(probe)
        return None, now, 0.0, f"all {limit} request slots stayed busy"

    def _check_deadline(self, deadline: float, until: float, why: str) -> None:
        if until > deadline:
            raise RemoteError(f"{self.origin} is rate limiting us and {why}: giving up (the retry budget for "
                              "throttled requests is spent)", status=429)

    def _unreachable(self, header: Tuple[float, ...], now: float) -> HostUnreachableError:
        last = f", the last: {self._last_reason}" if self._last_reason else ""
        remaining = header[_OPEN_UNTIL] - now
        retry = f"the next try in {remaining:.1f} s" if remaining > 0 else "a probe request is trying it now"
        return HostUnreachableError(f"{self.origin} is unreachable ({int(header[_FAILURES])} connection failures in "
                                    f"a row{last}); failing fast, {retry}", host=self.origin)

    # -- giving it back -------------------------------------------------------------------------------------------
    def _release(self, slot: Slot, outcome: str) -> None:
        backend = slot._backend
        if backend.closed:  # taken before a fork, released in the child: the slot is the parent's
            return
        try:
            self._report(backend, slot, outcome)
        finally:
            backend.give(slot._fd, slot._index)
            if slot._probe is not None:
                backend.give_probe(slot._probe)
            if self._waiters:
                with self._cond:
                    self._cond.notify()

    def _report(self, backend: Any, slot: Slot, outcome: str) -> None:
        if outcome == "unused":
            return
        header = _HEADER.unpack_from(backend.header)
        limits = self.limits
        if outcome == "unreachable":
            self._update(backend, lambda v, now: self._count_failure(v, now, slot._probe is not None))
            return
        if header[_FAILURES] or header[_OPEN_UNTIL]:
            self._update(backend, self._close_breaker)
        if outcome == "throttled":
            self._update(backend, lambda v, now: self._push_back(backend, v, now, slot))
        elif outcome == "ok" and not self._slower(time.time() - slot.started) and header[_LIMIT] < limits.ceiling \
                and time.monotonic() - self._last_wait < 1.0:
            self._update(backend, self._grow)  # only while the limit binds: requests waited within the last second

    def _slower(self, seconds: float) -> bool:
        """Note a successful request's time; True while requests take markedly longer than the fastest did (the
        host slows down under what is in flight: no reason to send more). Per process; races are harmless."""
        fastest = self._fastest
        if seconds < fastest:
            fastest = seconds
        elif fastest != math.inf:
            fastest += (seconds - fastest) * 0.002  # forget a lucky fast one over a few hundred requests
        self._fastest = fastest
        average = self._average = self._average * 0.9 + seconds * 0.1 if self._average else seconds
        bound = 2 * fastest + 0.005
        return average > bound and seconds > bound  # the trend and this request both slow

    @staticmethod
    def _update(backend: Any, change: Callable[[List[float], float], None]) -> None:
        backend.lock_header()
        try:
            values = list(_HEADER.unpack_from(backend.header))
            change(values, time.time())
            _HEADER.pack_into(backend.header, 0, *values)
        finally:
            backend.unlock_header()

    def _grow(self, v: List[float], now: float) -> None:
        limit = v[_LIMIT]
        v[_LIMIT] = min(float(self.limits.ceiling), limit + (1.0 if limit < v[_SSTHRESH] else 1.0 / max(limit, 1.0)))

    def _push_back(self, backend: Any, v: List[float], now: float, slot: Slot) -> None:
        limits = self.limits
        wait = slot._retry_after
        if wait:
            current = v[_PAUSE] if 0 < v[_PAUSE] - now <= limits.max_pause + 1 else 0.0
            v[_PAUSE] = max(current, now + min(wait, limits.max_pause))
        # one cut per round: a refusal of a request sent before the last cut, or within a round after it (into a
        # host still busy with what went before), is stale
        grace = self._fastest if self._fastest < math.inf else 0.0
        if slot.started >= v[_DECREASED] + grace:
            in_flight = backend.count(limits.ceiling)
            # what was in flight when the refused request went out: at most the limit it was sent under (fewer may
            # be in flight now, others having been refused meanwhile; more, if slow start raised the limit since),
            # and at most the limit now
            pushed_at = min(v[_LIMIT], float(max(slot.limit, 1)))
            limit = max(float(limits.floor), pushed_at * _BETA)
            log.info("%s pushed back: at most %d requests in flight now (was %d, %d in flight)%s", self.origin,
                     int(limit), int(v[_LIMIT]), in_flight, f"; pausing {wait:.1f} s" if wait else "")
            v[_LIMIT] = v[_SSTHRESH] = limit
            v[_DECREASED] = now

    def _count_failure(self, v: List[float], now: float, probe: bool) -> None:
        limits = self.limits
        if not v[_FAILURES]:
            v[_FIRST_FAILURE] = now
        v[_FAILURES] += 1
        closed = not 0 < v[_OPEN_UNTIL] - now
        if probe or (closed and v[_FAILURES] >= limits.breaker_failures
                     and now - v[_FIRST_FAILURE] >= limits.breaker_outage):
            v[_OPEN_UNTIL] = now + limits.breaker_cooldown
            log.info("%s is unreachable (%d connection failures in a row, the last: %s): requests fail fast for "
                     "%g s", self.origin, int(v[_FAILURES]), self._last_reason, limits.breaker_cooldown)

    def _close_breaker(self, v: List[float], now: float) -> None:
        if v[_OPEN_UNTIL]:
            log.info("%s answers again", self.origin)
        v[_FAILURES] = v[_FIRST_FAILURE] = v[_OPEN_UNTIL] = 0.0

    def current_limit(self) -> int:
        """How many requests the host may have in flight now (the shared limit; one read of the header)."""
        return int(_HEADER.unpack_from(self._state().header)[_LIMIT])

    def state(self) -> Dict[str, float]:
        """The shared state now: ``limit``, ``paused_for`` (s), ``failures``, ``open_for`` (s, 0 = closed),
        ``in_flight`` (slots held by every process)."""
        backend = self._state()
        header = _HEADER.unpack_from(backend.header)
        now = time.time()
        return {"limit": header[_LIMIT], "paused_for": max(0.0, header[_PAUSE] - now),
                "failures": header[_FAILURES], "open_for": max(0.0, header[_OPEN_UNTIL] - now) if header[_OPEN_UNTIL]
                else 0.0, "in_flight": backend.count(self.limits.ceiling)}


_LIMITERS: Dict[Tuple[str, str], HostLimiter] = {}
_REGISTRY_LOCK = threading.Lock()


def host_limiter(origin: str) -> HostLimiter:
    """This process's limiter of ``origin`` (``scheme://host:port``), shared with every process that uses the same
    :func:`limits_dir`; its knobs are read from ``STREAMLOADER_HOST_LIMITS`` when it is first made."""
    directory = limits_dir()
    key = (directory, origin)
    limiter = _LIMITERS.get(key)
    if limiter is None:
        with _REGISTRY_LOCK:
            limiter = _LIMITERS.get(key)
            if limiter is None:
                name = hashlib.sha256(origin.encode("utf-8")).hexdigest()[:32] + ".limits"
                limiter = _LIMITERS[key] = HostLimiter(origin, HostLimits.from_env(), os.path.join(directory, name))
    return limiter


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for limiter in list(_LIMITERS.values()):
        limiter._after_fork()


_forksafe.register(after_in_child=_after_fork_in_child)
