"""Small file-system primitives shared by the cache layers: private directories and atomic, private writes."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

__all__ = ["makedirs_private", "atomic_write"]


def makedirs_private(path: str) -> None:
    """Create ``path`` and any missing parents with mode 0700 (``os.makedirs`` gives ``mode`` to the leaf only)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # another process or thread made it first
            pass


def atomic_write(path: str, data: bytes, tmp_dir: Optional[str] = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The temp file is created 0600 (mkstemp), in ``tmp_dir`` (same file system!) or next to ``path``, then renamed
    over ``path``. Missing directories are created 0700.
    """
    directory = tmp_dir or os.path.dirname(os.path.abspath(path))
    makedirs_private(directory)
    makedirs_private(os.path.dirname(os.path.abspath(path)))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
