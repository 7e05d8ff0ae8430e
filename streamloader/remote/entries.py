"""What a listing says: :class:`RemoteEntry` and the parsing of the content API's answers into entries.

Every entry from a server is checked before it is trusted: a path must be a safe repo path naming a direct child of
the folder listed (anything that changes under normalisation is refused too, so ``data/.`` cannot shadow a real
entry), a size must be a non-negative integer (0 = unknown: dagshub.com lists sizes only on request), and entries
that are not files or folders (``type: "storage"``, a connected bucket) are left out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, Optional

from streamloader.errors import RemoteError
from streamloader.remote.urls import safe_repo_path

log = logging.getLogger(__name__)

__all__ = ["RemoteEntry", "parse_entries", "file_entry"]


@dataclass(frozen=True)
class RemoteEntry:
    """One item of a repo listing: full repo ``path``, ``type`` "file"/"dir", ``size`` (None while unknown:
    dagshub.com lists sizes only on request), content ``hash`` (git blob sha1, or DVC's md5)."""

    path: str
    type: str
    size: Optional[int]
    hash: Optional[str] = None
    versioning: Optional[str] = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


_MAX_SIZE = 1 << 62  # no file is this large (SQLite's integers end at 2**63: a larger size failed every ls)


def entry_size(item: Dict[str, Any]) -> Optional[int]:
    """A listed file's size; None when unknown (dagshub.com lists 0 unless asked for sizes)."""
    size = item.get("size")
    if size is None or size == 0:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < _MAX_SIZE:
        raise ValueError(f"invalid size {str(size)[:40]!r}")
    return size


def str_or_none(value: Any) -> Optional[str]:
    return str(value) if value not in (None, "") else None



def file_entry(item: Dict[str, Any], path: str, url: str) -> RemoteEntry:
    """The entry of ``path`` from the content API's single-object answer about it (``url``: for the error)."""
    try:
        raw_path = str(item.get("path", path))
        if safe_repo_path(raw_path) != path or raw_path != path:
            raise ValueError(f"the answer names {raw_path[:200]!r}")
        if item.get("type", "file") not in ("file", "dir"):
            raise ValueError(f"type {item.get('type')!r}")
        if item.get("type") == "dir":
            return RemoteEntry(path, "dir", 0, item.get("hash") or None, item.get("versioning"))
        size = entry_size(item)
    except (TypeError, ValueError) as exc:
        raise RemoteError(f"unexpected content answer for {path!r}: {exc}", url=url) from None
    return RemoteEntry(path, "file", size, str_or_none(item.get("hash")), str_or_none(item.get("versioning")))


def parse_entries(items: Iterable[Any], parent: str) -> Iterator[RemoteEntry]:
    """The valid entries of folder ``parent`` among ``items`` (a listing's JSON objects); others are logged."""
    prefix = parent + "/" if parent else ""
    for item in items:
        try:
            kind = item.get("type")
            if kind not in ("file", "dir"):
                # e.g. "storage" (a connected bucket): not a file of this folder
                log.debug("listing of %r: leaving out %r of type %r", parent or "/", item.get("path"), kind)
                continue
            raw_path = str(item["path"])
            entry_path = safe_repo_path(raw_path)
            size = entry_size(item) if kind == "file" else 0
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A hostile or broken listing must not steer us outside the repo: skip and say so.
            log.warning("skipping malformed listing entry under %r: %s", parent or "/", exc)
            continue
        if (entry_path != raw_path.rstrip("/") or not entry_path.startswith(prefix)
                or "/" in entry_path[len(prefix):] or entry_path == parent):
            log.warning("skipping listing entry %r outside directory %r", raw_path, parent or "/")
            continue
        yield RemoteEntry(entry_path, kind, size, str_or_none(item.get("hash")), str_or_none(item.get("versioning")))
