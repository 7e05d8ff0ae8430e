"""Where the wrappers of :mod:`streamloader.hooks.patches` are installed, and how every original comes back.

Besides ``builtins``/``io``/``os``, a few modules keep their own reference to an original, taken when they were
imported, and would never see a patch of ``os`` alone: ``tarfile``, ``bz2`` and ``tokenize``'s copies of
``open`` (``tarfile.open`` probes every compression, bz2 included), ``pathlib._NormalAccessor``
(Python 3.10), ``glob._StringGlobber`` (Python 3.13+, used by ``Path.glob``), IPython's ``io_open`` (behind the
``open`` of notebooks) and ``multiprocessing.spawn.get_preparation_data`` (see :mod:`streamloader.hooks.spawn`).
Class attributes are installed as ``staticmethod`` so that they do not bind like methods.
"""
from __future__ import annotations

import builtins
import io
import logging
import os
import sys
from typing import Any, Callable, List, Tuple

from streamloader.hooks import patches

log = logging.getLogger(__name__)

__all__ = ["apply", "restore", "applied"]

# (owner, attribute, value before, value installed, owner is a class)
_applied: List[Tuple[Any, str, Any, Any, bool]] = []

_WRAPPERS = {
    "open": patches.open, "stat": patches.stat, "lstat": patches.lstat, "listdir": patches.listdir,
    "scandir": patches.scandir, "mkdir": patches.mkdir,
}
# os functions wrapped under their own names (os.open is patches.os_open: builtins' open is patches.open)
_OS_WRAPPERS = {"open": patches.os_open, "utime": patches.utime, "access": patches.access}
if hasattr(os, "listxattr"):
    _OS_WRAPPERS["listxattr"] = patches.listxattr
_OURS = frozenset(id(fn) for fn in (*_WRAPPERS.values(), *_OS_WRAPPERS.values()))
# Modules that copy the original open() at import time (``from builtins import open as ...``). IPython's is what
# ``open`` in a notebook calls.
_OPEN_ALIASES = (("tarfile", "bltn_open"), ("bz2", "_builtin_open"), ("tokenize", "_builtin_open"),
                 ("IPython.core.interactiveshell", "io_open"))


def _targets() -> List[Tuple[Any, str, Callable[..., Any], bool]]:
    found: List[Tuple[Any, str, Callable[..., Any], bool]] = [(builtins, "open", patches.open, False),
                                                              (io, "open", patches.open, False)]
    found += [(os, name, _WRAPPERS[name], False) for name in ("stat", "lstat", "listdir", "scandir", "mkdir")]
    found += [(os, name, wrapper, False) for name, wrapper in _OS_WRAPPERS.items()]
    for module_name, name in _OPEN_ALIASES:
        module = sys.modules.get(module_name)  # not imported yet: it will copy the patched open itself
        if module is not None and getattr(module, name, None) is patches.originals()["open"]:
            found.append((module, name, patches.open, False))
    accessor = getattr(sys.modules.get("pathlib"), "_NormalAccessor", None)  # Python 3.10
    if accessor is not None:
        found += [(accessor, name, _WRAPPERS[name], True)
                  for name in ("open", "stat", "lstat", "listdir", "scandir", "mkdir") if name in vars(accessor)]
    globber = getattr(sys.modules.get("glob"), "_StringGlobber", None)  # Python 3.13+
    if globber is not None:
        found += [(globber, name, _WRAPPERS[name], True) for name in ("lstat", "scandir") if name in vars(globber)]
    import multiprocessing.spawn

    from streamloader.hooks.spawn import wrap_get_preparation_data

    current = multiprocessing.spawn.get_preparation_data
    found.append((multiprocessing.spawn, "get_preparation_data", wrap_get_preparation_data(current), False))
    return found


def _current(owner: Any, name: str, is_class: bool) -> Any:
    return vars(owner).get(name) if is_class else getattr(owner, name)


def apply() -> None:
    """Install every wrapper (idempotent)."""
    if _applied:
        return
    # the functions the wrappers delegate to: whatever is there now, unless it is already one of ours
    sources = {"open": io.open, "stat": os.stat, "lstat": os.lstat, "listdir": os.listdir, "scandir": os.scandir,
               "mkdir": os.mkdir, "os_open": os.open, "utime": os.utime, "access": os.access,
               "listxattr": getattr(os, "listxattr", None)}
    patches.capture_originals({k: v for k, v in sources.items() if id(v) not in _OURS})
    for owner, name, wrapper, is_class in _targets():
        before = _current(owner, name, is_class)
        installed = staticmethod(wrapper) if is_class else wrapper
        setattr(owner, name, installed)
        _applied.append((owner, name, before, installed, is_class))
    log.debug("installed %d file-system hooks", len(_applied))


def restore() -> None:
    """Put every original back (identity preserved). A function someone else replaced after us is left alone."""
    while _applied:
        owner, name, before, installed, is_class = _applied.pop()
        if _current(owner, name, is_class) is installed:
            setattr(owner, name, before)
        else:
            log.warning("%s.%s was replaced by someone else while hooks were installed; leaving it as it is",
                        getattr(owner, "__name__", owner), name)


def applied() -> bool:
    """Whether the wrappers are installed."""
    return bool(_applied)
