"""Retrying transient failures: how hard (:class:`RetryPolicy`), what may be retried (:class:`Transient`), and the
loop that does it (:func:`retrying`, waiting :func:`backoff` between attempts).

The client runs every request under :func:`retrying` (see :meth:`~streamloader.remote.client.DagsHubClient._call`);
``RetryPolicy`` is also importable from :mod:`streamloader.remote.client`, where it is documented.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from streamloader.remote.transport import MIN_RATE

log = logging.getLogger("streamloader.remote.client")  # the client's retries, logged under the client's name

__all__ = ["RETRY_STATUSES", "RetryPolicy", "Transient", "backoff", "retrying"]

RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry transient failures (connection errors, timeouts, 5xx, 429, short bodies).

    Failures count against ``attempts`` and ``max_time`` (from the first failure); pushbacks (429, 503 with
    Retry-After) only against ``max_throttled_time`` (from the start of the call), so that a rate-limited job slows
    down instead of failing. A body must average ``min_rate`` bytes/s once ``read_timeout`` has passed.
    """

    attempts: int = 8
    max_time: float = 120.0
    initial_backoff: float = 0.05
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_throttled_time: float = 900.0
    min_rate: float = MIN_RATE


class Transient(Exception):
    """A retryable failure; ``retry_after`` is the server's hint in seconds; ``outcome`` what it tells the host's
    limiter: "throttled" (a pushback), "unreachable" (no usable answer) or "answered" (an error answer)."""

    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[float] = None,
                 outcome: str = "answered"):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.outcome = outcome


def retrying(policy: RetryPolicy, attempt: Callable[[], Any]) -> Any:
    """``attempt()``, again after each :class:`Transient` failure until the retry policy is spent (then that
    failure is raised); anything else is raised at once. A plain loop: a retry library's per-call objects cost
    ~60 us of CPU per download, a tenth of what a small file costs in all."""
    started = time.monotonic()
    failures, first_failure, number = 0, 0.0, 0
    while True:
        number += 1
        try:
            return attempt()
        except Transient as exc:
            now = time.monotonic()
            if exc.outcome == "throttled":  # pushbacks spend the throttled-time budget, not the attempts
                if now - started >= policy.max_throttled_time:
                    raise
            else:
                failures += 1
                if failures == 1:
                    first_failure = now
                if failures >= policy.attempts or now - first_failure >= policy.max_time:
                    raise
            delay = backoff(policy, exc, number)
            log.debug("retrying after %s (attempt %d)", type(exc).__name__, number)
        time.sleep(delay)


def backoff(policy: RetryPolicy, exc: Transient, number: int) -> float:
    """Seconds to wait before retrying after the ``number``-th attempt failed with ``exc``."""
    hint = exc.retry_after
    # exponential backoff with jitter
    ceiling = min(policy.max_backoff, policy.initial_backoff * 2 ** (number - 1))
    exponential = random.uniform(ceiling / 2, ceiling)
    if hint is None:
        return exponential
    hint = min(hint, policy.max_retry_after)
    # a Retry-After of 0, a negative one or a date past (all parsed as 0) is no reason to ask again at once: an
    # answer that says "wait" waits at least the backoff (once, ~180 refused requests a second were sent)
    if exc.outcome == "throttled" and hint >= exponential:
        return random.uniform(0, 0.01)  # the limiter holds back every request to the host until then
    return max(hint, exponential)
