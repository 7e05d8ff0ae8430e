"""The operating system's own ``stat`` and ``lstat``, which streamloader's file-system hooks never replace.

``install_hooks`` replaces ``os.stat`` and ``os.lstat`` so that the files of a hooked repository look local. Code
that must know what is really on this machine's disk (the feature cache's content identity, prefetch's "already
here, nothing to fetch") calls these instead. They are the C functions of the ``posix`` module (``nt`` on
Windows), which ``os`` re-exports and the hooks leave alone, so they are the unpatched ones whether this module
was imported before or after hooks were installed, and they never ask a repository::

    from streamloader import _realos
    _realos.exists_locally("data/0001.jpg")     # False while only the hooks serve it
    st = _realos.stat("data/labels.tsv")         # FileNotFoundError unless it is on this disk

Bottom layer: imports nothing from streamloader.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable

__all__ = ["stat", "lstat", "exists_locally"]

_native = importlib.import_module(os.name)  # "posix" or "nt": the module os takes stat/lstat from

#: ``os.stat`` as the OS provides it (follows symlinks), never a hook's wrapper
stat: Callable[..., os.stat_result] = _native.stat
#: ``os.lstat`` as the OS provides it (does not follow symlinks), never a hook's wrapper
lstat: Callable[..., os.stat_result] = _native.lstat


def exists_locally(path: Any, follow_symlinks: bool = True) -> bool:
    """Whether ``path`` exists on this machine's disk (not merely served by hooks); never asks a repository.

    ``follow_symlinks=False`` counts a symlink itself (even a dangling one), like ``os.path.lexists``.
    """
    try:
        (stat if follow_symlinks else lstat)(path)
        return True
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return False
