"""What a path of a pinned repository is: folder listings, and a single path's entry (``info``/``stat``/``exists``)
learnt from the store, the cached copy or the content API about that path alone, never by listing its folder.

:class:`PathLookups` holds these methods of :class:`~streamloader.remote.repo.RemoteRepo` (which mixes it in and
provides the attributes declared below); a path found missing is believed missing for ``_MISSING_TTL`` s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from streamloader.cache.entrylock import EntryLock
from streamloader.errors import RemoteError, RemoteFileNotFoundError
from streamloader.remote.entries import RemoteEntry
from streamloader.remote.listings import DirListing
from streamloader.remote.urls import safe_repo_path

if TYPE_CHECKING:
    from streamloader.cache import CacheKey, FileCache
    from streamloader.remote.buckets import Buckets
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.listings import ListingStore

__all__ = ["PathLookups"]

_MISSING_TTL = 30.0  # seconds a path found missing (404) is believed missing without asking again
_UNLISTED_TTL = 1.0  # seconds a folder found not listed is believed so by _proven_missing (a hint: see there)


class PathLookups:
    """Listings and single-path lookups of :class:`~streamloader.remote.repo.RemoteRepo` (mixed into it)."""

    client: DagsHubClient
    cache: Optional[FileCache]
    offline: bool
    _missing: Dict[str, float]  # path -> when it was found missing (forgotten after _MISSING_TTL)
    _lock: threading.Lock
    _dir_locks: Dict[str, threading.Lock]
    _buckets: Buckets

    if TYPE_CHECKING:  # provided by RemoteRepo
        @property
        def store(self) -> ListingStore: ...

        def _location_key(self, path: str) -> CacheKey: ...

        def _cached_file(self, path: str, entry: Optional[RemoteEntry]) -> Optional[str]: ...

    def _note_missing(self, path: str) -> None:
        if len(self._missing) > 100_000:
            self._missing.clear()
        self._missing[path] = time.monotonic()

    def _proven_missing(self, path: str) -> bool:
        """Whether ``path`` is known not to exist: found missing moments ago (a 404 may be passing, so it is
        remembered for _MISSING_TTL s only), or absent from the stored listing of one of its folders."""
        seen = self._missing.get(path)
        if seen is not None:
            if time.monotonic() - seen < _MISSING_TTL:
                return True
            self._missing.pop(path, None)
        store = self.store
        parts = path.split("/")
        for depth in range(len(parts)):
            # a "not listed" up to _UNLISTED_TTL s old only makes this say "not proven" a little longer: the
            # download that follows then finds out (a 404), as it does for any path nothing is known of
            if store.is_listed("/".join(parts[:depth]), max_age=_UNLISTED_TTL):
                child = store.entry("/".join(parts[:depth + 1]))
                if child is None or (not child.is_dir and depth + 1 < len(parts)):
                    return True
        return False

    def listing(self, path: str = "") -> DirListing:
        """``{name: RemoteEntry}`` of a folder, read from the store (listed once per commit, without sizes).
        Missing → FileNotFoundError; a file → NotADirectoryError."""
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.listing(path)
        store = self.store
        if store.is_listed(path):
            return DirListing(store, path)
        known = store.entry(path) if path else None
        if known is not None and not known.is_dir:
            raise NotADirectoryError(20, "Not a directory", path)
        if self._proven_missing(path):
            raise RemoteFileNotFoundError(path)
        if self.offline:
            raise RemoteError(f"offline mode: the listing of {path or '/'!r} is not cached")
        with self._lock:
            dir_lock = self._dir_locks.setdefault(path, threading.Lock())
        with dir_lock:  # many threads asking for one folder make one request
            if not store.is_listed(path):
                with self._listing_lock(path):  # and so do many processes
                    if not store.is_listed(path):
                        self._fetch_listing(path)
        return DirListing(store, path)

    def _listing_lock(self, path: str) -> Any:
        if self.cache is None:
            return contextlib.nullcontext()
        digest = hashlib.sha256(f"{self.store.path}\x00{path}".encode()).hexdigest()
        return EntryLock(os.path.join(self.cache.root, "locks"), "listing", digest, self.cache.lock_timeout)

    def _fetch_listing(self, path: str) -> None:
        store = self.store
        try:
            entry = self.client.content(path, lambda items: store.put_listing(path, items))
        except FileNotFoundError:
            self._note_missing(path)
            raise RemoteFileNotFoundError(path) from None
        if entry is not None:
            store.put_entry(entry)
            raise NotADirectoryError(20, "Not a directory", path)

    def ls(self, path: str = "") -> List[RemoteEntry]:
        """Entries of a folder, sorted by name (sizes None where the listing did not say them)."""
        return list(self.listing(path).sorted_entries())

    def info(self, path: str) -> RemoteEntry:
        """The entry of a file or folder, asking about that path alone if it is not known yet (a file's ``size``
        may be None = unknown; :meth:`stat` fills it). Missing → FileNotFoundError (errno ENOENT)."""
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.info(path)
        if not path:
            return RemoteEntry("", "dir", 0)
        store = self.store
        entry = store.entry(path)
        if entry is not None:
            return entry
        if self._proven_missing(path):
            raise RemoteFileNotFoundError(path)
        downloaded = self._downloaded_entry(path)
        if downloaded is not None:
            return downloaded
        if self.offline:
            raise RemoteError(f"offline mode: {path!r} is not in the cached listings")
        if "/" not in path:  # a top-level name: the root listing is small and answers every such question
            try:
                self.listing("")
            except FileNotFoundError:
                pass
            entry = store.entry(path)
        else:
            entry = self._probe(path)
        if entry is None:
            self._note_missing(path)
            raise RemoteFileNotFoundError(path)
        return entry

    def _downloaded_entry(self, path: str) -> Optional[RemoteEntry]:
        """The entry of a file downloaded before anything was listed about it (its cached copy is proof, and
        tells the size); None if there is no such copy."""
        if self.cache is None:
            return None
        local = self.cache.get_settled(self._location_key(path))  # (a commit may be landing right now)
        if local is None:
            return None
        try:
            return RemoteEntry(path, "file", os.stat(local).st_size)
        except FileNotFoundError:  # evicted just now
            return None

    def _probe(self, path: str) -> Optional[RemoteEntry]:
        """Ask the content API about one path: a file's entry, or a folder (whose listing is then stored)."""
        store = self.store
        try:
            entry = self.client.content(path, lambda items: store.put_listing(path, items))
        except FileNotFoundError:
            return None
        if entry is None:
            return store.entry(path) or RemoteEntry(path, "dir", 0)
        store.put_entry(entry)
        return entry

    def stat(self, path: str) -> RemoteEntry:
        """Like :meth:`info`, with a file's real size: from the cached copy when there is one, else asked for
        that one path (never for its folder: sizes cost dagshub.com time per entry)."""
        path = safe_repo_path(path)
        if self._buckets.handles(path):
            return self._buckets.stat(path)
        entry = self.info(path)
        if entry.is_dir or entry.size is not None:
            return entry
        local = self._cached_file(entry.path, entry)
        if local is not None:
            try:
                size = os.stat(local).st_size
            except FileNotFoundError:
                pass
            else:
                self.store.set_size(entry.path, size)
                return dataclasses.replace(entry, size=size)
        if self.offline:
            raise RemoteError(f"offline mode: the size of {entry.path!r} is not known")
        sized = self.client.stat(entry.path)
        sized = dataclasses.replace(sized, size=sized.size or 0,  # asked with sizes on: None means 0
                                    hash=sized.hash or entry.hash, versioning=sized.versioning or entry.versioning)
        self.store.put_entry(sized)
        return sized

    def exists(self, path: str) -> bool:
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False
