"""Fault-injection knobs for the local test server.

A :class:`ServerFaults` is plain data that tests may mutate at any time while the server runs; the server asks it
what to do for each request (:meth:`ServerFaults.decide`)::

    srv.faults.throttle_rate = 0.5        # half of the raw downloads now answer 429
    srv.faults.fail_first = {"data/a.jpg": 2}   # the next two raw requests for it answer 503
    srv.faults.concurrency_limit = 8      # a raw request arriving while 8 others are in flight answers 429
    srv.faults.drip_rate = 1.0            # raw bodies trickle out one byte every drip_interval seconds
"""
from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["ServerFaults", "FaultDecision", "KINDS"]

# request kinds the server distinguishes (also the keys of its counters); "presigned" = the presigned origin
KINDS = ("raw", "content", "branches", "commits", "repo", "user", "storage", "oauth", "other", "presigned")

# the 5xx statuses a random server error is drawn from
_ERROR_STATUSES = (500, 502, 503)


@dataclass
class FaultDecision:
    """What the server must do instead of (or while) answering normally."""

    status: Optional[int] = None  # answer this status instead of the normal answer
    retry_after: Optional[str] = None  # Retry-After header value for a 429
    drop: bool = False  # send half the body, then close the connection
    drip: bool = False  # send the body one byte per ServerFaults.drip_interval
    reason: Optional[str] = None  # "fail_path" | "fail_first" | "error" | "throttle" | "drop" | "drip" (request log)


@dataclass
class ServerFaults:
    """Knobs that make the server slow or unreliable, for tests of retries and robustness.

    Example: ``ServerFaults(latency=0.05, error_rate=0.2, seed=1)``. Rates are fractions in [0, 1]; ``apply_to``
    says which request kinds the error/throttle rates hit (``"raw"`` by default); ``drop_rate`` always means raw
    GETs. ``latency`` delays every request except the admin endpoints. ``fail_first`` counts consumed
    failures itself: assigning a new ``fail_first`` dict (or a new ``seed``) re-arms it. ``retry_after_date``
    sends Retry-After as an HTTP date instead of seconds; ``concurrency_limit`` (0 = none) answers 429 to a request
    of the ``apply_to`` kinds that arrives while that many are already in flight; ``drip_rate`` is the fraction of
    raw GETs whose body is sent one byte every ``drip_interval`` seconds. ``nagle`` leaves Nagle's algorithm on for
    new connections (no TCP_NODELAY), as many simple servers do: a keep-alive client that delays its ACKs then
    waits ~40 ms for every answer whose headers and body leave in two writes.
    ``storage_token_repeats``: every page of a bucket listing answers the same ``next_token`` (server/storage.py).
    """

    latency: float = 0.0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float = 0
    drop_rate: float = 0.0
    fail_paths: Dict[str, int] = field(default_factory=dict)
    fail_first: Dict[str, int] = field(default_factory=dict)
    apply_to: Tuple[str, ...] = ("raw",)
    redirect_raw_to: Optional[str] = None
    seed: Optional[int] = None
    retry_after_date: bool = False
    concurrency_limit: int = 0
    drip_rate: float = 0.0
    drip_interval: float = 0.5
    nagle: bool = False
    storage_token_repeats: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "apply_to" and not isinstance(value, tuple):
            value = (value,) if isinstance(value, str) else tuple(value)
        object.__setattr__(self, name, value)
        # re-arm deterministic state when its knob is replaced (tests flip knobs mid-run)
        if name == "seed":
            object.__setattr__(self, "_rng", None)
        elif name == "fail_first" and "_fail_first_used" in self.__dict__:
            object.__setattr__(self, "_fail_first_used", {})

    def __post_init__(self) -> None:
        # internal state lives outside the dataclass fields, so asdict/replace/== see plain knobs only
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_rng", None)
        object.__setattr__(self, "_fail_first_used", {})
        self.validate()

    def __getstate__(self) -> Dict[str, Any]:  # picklable/deep-copyable: knobs only, fresh internal state
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def validate(self) -> None:
        """Raise ValueError if a knob is out of range (rates outside [0, 1], negative times, unknown kinds)."""
        for name in ("error_rate", "throttle_rate", "drop_rate", "drip_rate"):
            rate = getattr(self, name)
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"ServerFaults.{name} must be in [0, 1], got {rate!r}")
        if self.error_rate + self.throttle_rate > 1.0:
            raise ValueError("ServerFaults.error_rate + throttle_rate must not exceed 1")
        for name in ("latency", "retry_after", "drip_interval", "concurrency_limit"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"ServerFaults.{name} must be >= 0")
        unknown = set(self.apply_to) - set(KINDS)
        if unknown:
            raise ValueError(f"ServerFaults.apply_to has unknown kinds {sorted(unknown)}; known: {KINDS}")

    # -- (de)serialisation for the admin endpoint and the CLI ------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The public knobs as JSON-compatible data."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["apply_to"] = list(self.apply_to)
        out["fail_paths"] = dict(self.fail_paths)
        out["fail_first"] = dict(self.fail_first)
        return out

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the given knobs (unknown names raise ValueError); validates the result, rolling back on error."""
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown fault knobs {sorted(unknown)}; known: {sorted(known)}")
        before = self.to_dict()
        for name, value in values.items():
            if name in ("fail_paths", "fail_first"):
                value = {str(k): int(v) for k, v in (value or {}).items()}
            setattr(self, name, value)
        try:
            self.validate()
        except ValueError:
            for name in values:
                setattr(self, name, before[name] if name != "apply_to" else tuple(before[name]))
            raise

    # -- decisions ------------------------------------------------------------------------------------------
    def retry_after_header(self) -> str:
        """The Retry-After value: an int when integral ("2"), else a float string ("0.5"); with
        ``retry_after_date``, the HTTP date that far ahead (whole seconds: "Wed, 02 Dec 2026 10:00:01 GMT")."""
        value = float(self.retry_after)
        if self.retry_after_date:
            return email.utils.formatdate(time.time() + value, usegmt=True)
        return str(int(value)) if value.is_integer() else repr(value)

    def _random(self) -> float:
        # called with self._lock held
        if self._rng is None:
            object.__setattr__(self, "_rng", random.Random(self.seed))
        return self._rng.random()

    def decide(self, kind: str, repo_path: Optional[str], method: str, in_flight: int = 0) -> FaultDecision:
        """Roll the dice for one request (thread-safe); the permanent/deterministic knobs win over the random ones.
        ``in_flight``: requests of this kind in flight when it arrived, itself included."""
        with self._lock:
            if kind == "raw" and repo_path is not None:
                status = self.fail_paths.get(repo_path)
                if status is not None:
                    return FaultDecision(status=int(status), reason="fail_path")
                wanted = int(self.fail_first.get(repo_path, 0))
                used = self._fail_first_used.get(repo_path, 0)
                if used < wanted:
                    self._fail_first_used[repo_path] = used + 1
                    return FaultDecision(status=503, reason="fail_first")
            if kind in self.apply_to and 0 < int(self.concurrency_limit) < in_flight:
                return FaultDecision(status=429, retry_after=self.retry_after_header(), reason="throttle")
            if kind in self.apply_to and (self.error_rate or self.throttle_rate):
                roll = self._random()
                if roll < self.error_rate:
                    status = _ERROR_STATUSES[int(self._random() * len(_ERROR_STATUSES))]
                    return FaultDecision(status=status, reason="error")
                if roll < self.error_rate + self.throttle_rate:
                    return FaultDecision(status=429, retry_after=self.retry_after_header(), reason="throttle")
            if kind == "raw" and method == "GET" and self.drop_rate and self._random() < self.drop_rate:
                return FaultDecision(drop=True, reason="drop")
            if kind == "raw" and method == "GET" and self.drip_rate and self._random() < self.drip_rate:
                return FaultDecision(drip=True, reason="drip")
        return FaultDecision()

    def reset_consumed(self) -> None:
        """Forget which ``fail_first`` failures were already served (they fire again)."""
        with self._lock:
            self._fail_first_used.clear()
