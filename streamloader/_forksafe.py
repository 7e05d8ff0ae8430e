"""One way for a module to keep its process-wide state usable across ``fork()``: :func:`register`.

Locks held by another thread at fork time are never released in the child, and a child inherits the parent's open
lock files and background work; the modules that keep such state register handlers that renew or quiesce it
around a fork. ``os.register_at_fork`` does not exist where there is no ``fork()`` (Windows): there is nothing to
make safe there, so :func:`register` does nothing, and importing the library works on every platform.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

__all__ = ["register"]

Handler = Optional[Callable[[], None]]


def register(before: Handler = None, after_in_parent: Handler = None, after_in_child: Handler = None) -> bool:
    """Have ``before`` run just before every ``fork()``, ``after_in_parent`` / ``after_in_child`` just after it in
    the parent / the child (as :func:`os.register_at_fork`; handlers left None are not registered).

    Returns True when the handlers were registered, False where the platform has no ``fork()`` (nothing to do).
    """
    hooks: Dict[str, Callable[[], None]] = {name: handler for name, handler in
                                            (("before", before), ("after_in_parent", after_in_parent),
                                             ("after_in_child", after_in_child)) if handler is not None}
    if not hooks:
        raise TypeError("register() needs at least one handler")
    register_at_fork = getattr(os, "register_at_fork", None)
    if register_at_fork is None:
        return False
    register_at_fork(**hooks)
    return True
