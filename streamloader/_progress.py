"""The library's progress bars: ``tqdm.auto`` bars whose lock belongs to this process alone.

tqdm's own lock includes a ``multiprocessing.RLock``: one POSIX semaphore, created once per process and shared
with every child forked after that (DataLoader workers, prefetch workers, any ``fork``). A child that dies while it
holds it — SIGKILLed, or ``terminate()``-d in the middle of a bar's refresh or a ``tqdm.write`` — leaves the
semaphore taken for good, and the parent's next bar update (or a log line through ``tqdm.write``) waits forever.
Our bars and log lines (:func:`progress_bar`, :func:`write`) use a thread lock instead, renewed in every forked
child (a copy held by a parent thread at the fork would never be released there). Bars drawn by several processes
at once are not coordinated by it; the library draws its bars in one process only.
"""
from __future__ import annotations

import threading
from typing import IO, Any, Optional

from streamloader import _forksafe

__all__ = ["progress_bar", "write"]

_BAR_CLASS: Any = None
_CLASS_LOCK = threading.Lock()


def _bar_class() -> Any:
    global _BAR_CLASS
    if _BAR_CLASS is None:
        with _CLASS_LOCK:
            if _BAR_CLASS is None:
                from tqdm.auto import tqdm

                class ProgressBar(tqdm):  # type: ignore[misc, valid-type]
                    """tqdm.auto's bar with a lock of this process (see the module docstring)."""

                ProgressBar.set_lock(threading.RLock())
                _BAR_CLASS = ProgressBar
    return _BAR_CLASS


def progress_bar(**options: Any) -> Any:
    """A ``tqdm.auto`` bar (``options`` as tqdm's: ``total``, ``unit``, ``desc``, ``leave``, ``disable``...)."""
    return _bar_class()(**options)


def write(line: str, file: Optional[IO[str]] = None) -> None:
    """``tqdm.write``: print ``line`` above the active bars instead of through them."""
    _bar_class().write(line, file=file)


def _renew_lock_in_child() -> None:
    if _BAR_CLASS is not None:
        _BAR_CLASS.set_lock(threading.RLock())


_forksafe.register(after_in_child=_renew_lock_in_child)
