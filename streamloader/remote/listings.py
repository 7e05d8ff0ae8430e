"""The per-commit listing store: what a repository's folders hold, in one SQLite file per (repository, commit).

A folder of the LAION-Aesthetics repo holds ~540k entries. Kept as Python objects that is ~400 MB per process, and
as JSON it takes seconds to reload in every new process and every spawned DataLoader worker. SQLite (standard
library) answers a point query in a few microseconds straight from the file, needs nothing loaded up front, is safe
for many processes at once (write-ahead log: readers never wait for a writer) and is filled from a streaming parse
of the server's answer, so memory stays flat however big the folder is.

Layout: ``entries(dir, name, type, size, hash, versioning)`` keyed by (dir, name) — ``size`` NULL when unknown
(dagshub.com lists sizes only on request) — and ``dirs(dir, n)`` naming the folders whose complete listing is
stored. Rows for single paths (learnt from a stat or a download) may exist in folders that were never listed.
A listing is immutable for a commit, so nothing here ever goes stale; sizes learnt later only fill NULLs.

Usage::

    store = ListingStore("/cache/listings/<repo>/<sha>.sqlite")
    store.put_listing("data", entries)        # an iterable, consumed in one transaction
    store.entry("data/a.jpg"), store.names("data"), store.is_listed("data")
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from streamloader import _forksafe, _realos
from streamloader._forksafe import NO_FORK
from streamloader._files import makedirs_private
from streamloader.remote.entries import RemoteEntry

log = logging.getLogger(__name__)

__all__ = ["ListingStore", "DirListing"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    dir TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, size INTEGER, hash TEXT, versioning TEXT,
    PRIMARY KEY (dir, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dirs (dir TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
"""
_BUSY_TIMEOUT = 60.0  # seconds a connection waits for another process's write transaction
_BATCH = 5000  # rows per executemany call while a listing streams in
_MEMO_MAX = 1 << 16  # entries a process keeps in memory in front of the file (a warm epoch's lookups)
_PRIME_CHUNK = 500  # names per query of prime() (old SQLite builds allow 999 parameters)
# How long a "nothing is stored of this path" seen here answers a hint look (``entry(path, hint=True)``) without
# asking SQLite whether another process has written since: a warm epoch over files nothing lists reads each one
# with no SQLite call at all (measured: a query per image slowed the image's decode as well, ~50 us in all)
_ABSENT_RECHECK = 0.25


def _split(path: str) -> Tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _row_entry(parent: str, row: Tuple[Any, ...]) -> RemoteEntry:
    name, kind, size, digest, versioning = row
    return RemoteEntry(f"{parent}/{name}" if parent else name, kind, size if kind != "dir" else 0, digest,
                       versioning)


class ListingStore:
    """Listings of one repository at one commit (see module docstring). ``path=None``: a private temporary file
    (for repos without a cache), removed when the creating process exits."""

    def __init__(self, path: Optional[str] = None):
        self._owner_pid = os.getpid()
        self._tmpdir: Optional[str] = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="streamloader-listings-")
            path = os.path.join(self._tmpdir, "listings.sqlite")
            atexit.register(_remove_tree, self._tmpdir, self._owner_pid)
        self.path = path
        self._memo: Dict[str, RemoteEntry] = {}
        self._primed_absent: Dict[str, bool] = {}  # paths prime() found nothing stored of (see prime)
        # paths a query found nothing stored of -> the store's data_version before that query (see entry's hint)
        self._absent: Dict[str, int] = {}
        self._listed: Set[str] = set()  # folders known to be listed (a stored listing is never taken back)
        self._unlisted: Dict[str, float] = {}  # folder -> time.monotonic() it was last found not listed
        self._renew()

    def _renew(self) -> None:
        """Fresh per-process state (at creation, unpickling, and in a forked child)."""
        old = getattr(self, "_connection", None)
        if old is not None:
            # A connection inherited through fork must never be closed (nor garbage-collected, which closes it):
            # closing it here could roll back or checkpoint the parent's work. It is kept, unused, for good.
            _INHERITED.append(old)
        self._connection: Optional[sqlite3.Connection] = None
        self._absent = {}  # (a data_version is one connection's count: a new connection starts afresh)
        self._version: Optional[int] = None  # data_version as last read, and when (time.monotonic())
        self._version_read = 0.0
        self._pid = os.getpid()
        self._write_lock = threading.RLock()  # one connection per process: writers of its threads take turns
        _LIVE_STORES.add(self)

    def __repr__(self) -> str:
        return f"ListingStore({self.path!r})"

    def __getstate__(self) -> Dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.path = state["path"]
        self._owner_pid = -1
        self._tmpdir = None
        self._memo = {}
        self._primed_absent = {}
        self._listed = set()
        self._unlisted = {}
        self._connection = None
        self._renew()

    # -- connections ----------------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """The process's connection, shared by its threads (SQLite's serialized mode makes that safe)."""
        conn = self._connection
        if conn is not None and self._pid == os.getpid():
            return conn
        with self._write_lock:
            if self._connection is None or self._pid != os.getpid():
                if self._pid != os.getpid():
                    self._renew()
                with NO_FORK:
                    self._connection = self._open()
            return self._connection

    def _open(self) -> sqlite3.Connection:
        # Several processes opening a new store at once can get "database is locked" from the switch to WAL (SQLite
        # does not wait on that lock): try again for a while.
        deadline = time.monotonic() + _BUSY_TIMEOUT
        delay = 0.01
        while True:
            try:
                return self._open_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _open_once(self) -> sqlite3.Connection:
        folder = os.path.dirname(self.path)
        try:
            makedirs_private(folder)
        except OSError:
            if not _realos.exists_locally(self.path):
                raise
        if _realos.exists_locally(self.path) and not os.access(folder, os.W_OK):
            return self._open_read_only()
        try:  # created private up front: SQLite gives its -wal and -shm files the database file's mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            pass
        try:
            return self._connect()
        except sqlite3.OperationalError:
            raise  # (busy: _open tries again; anything else is not the file's fault)
        except sqlite3.DatabaseError as exc:  # not a database, or malformed: it only caches listings
            log.warning("listing store %s is damaged (%s): starting it afresh (its listings are asked again)",
                        self.path, exc)
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(self.path + suffix)
                except FileNotFoundError:
                    pass
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # e.g. some network file systems: still correct, writers just block readers
                log.debug("listing store %s: journal mode %s", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """A store in a folder this process cannot write (a cache on a read-only mount, or another user's): read
        as it is, through its ``-wal`` where SQLite can (read-only, its ``-shm`` there), else as the main file holds
        it (``immutable``: no locking, nothing read from the ``-wal``); a listing not stored yet cannot be added
        (an error where one is needed)."""
        log.info("listing store %s is read-only here: reading it as it is", self.path)
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("SELECT 1 FROM entries LIMIT 1").fetchall()  # (reads the -wal through its -shm)
            return conn
        except sqlite3.Error:  # no -shm to read the -wal by, and none can be made: what the file itself holds
            conn.close()
        return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)

    def _one(self, sql: str, params: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        """The first row of one query on this process's connection, inside the fork gate."""
        conn = self._conn()
        with NO_FORK:
            return conn.execute(sql, params).fetchone()

    # -- reading --------------------------------------------------------------------------------------------------
    def entry(self, path: str, hint: bool = False) -> Optional[RemoteEntry]:
        """The stored entry of ``path`` (a file or a folder), or None when nothing is known about it.

        ``hint=True`` (a first look that a caller repeats under the file's lock before it acts on a None: the cache's
        reads): a None found here moments before is answered again without asking SQLite, unless another
        connection has written to the store since (``PRAGMA data_version``, read at most every
        ``_ABSENT_RECHECK`` s), so a None may lag behind another process by that long. Without ``hint`` every None
        is asked of the file (what a caller that concludes "missing" from it needs)."""
        memo = self._memo
        found = memo.get(path)
        if found is not None:
            return found
        if self._primed_absent and self._primed_absent.pop(path, None) is not None:
            return None  # primed moments ago, used once (a second look, e.g. under a lock, asks the file again)
        absent = self._absent
        if hint and path in absent and absent[path] == self._data_version():
            return None
        version = self._version if self._version is not None else self._data_version()
        parent, name = _split(path)
        row = self._one("SELECT name, type, size, hash, versioning FROM entries WHERE dir=? AND name=?", (parent, name))
        if row is None:
            if len(absent) >= _MEMO_MAX:
                absent.clear()
            # (labelled with the version read before the query: a write in between makes the label old, which
            # only drops the answer sooner)
            absent[path] = version
            return None
        absent.pop(path, None)
        found = _row_entry(parent, row)
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[path] = found  # rows only ever gain facts: a memo can be stale only by a size learnt elsewhere
        return found

    def _data_version(self) -> int:
        """SQLite's ``data_version`` of this process's connection (it changes when another connection commits),
        as read at most ``_ABSENT_RECHECK`` s ago; a change forgets every remembered None."""
        now = time.monotonic()
        version = self._version
        if version is None or now - self._version_read >= _ABSENT_RECHECK:
            row = self._one("PRAGMA data_version", ())
            new = int(row[0]) if row is not None else -1
            if new != version:
                self._absent.clear()
            self._version, self._version_read, version = new, now, new
        return version

    def prime(self, paths: Sequence[str]) -> int:
        """Look up the stored entries of ``paths`` in a few queries (one per folder and :data:`_PRIME_CHUNK` names)
        instead of one each, ahead of the :meth:`entry` calls that follow (a prefetch asks for every file of its
        list). A found entry goes into the memo :meth:`entry` reads first (as a lookup of it would). That nothing is
        stored answers the next :meth:`entry` of that path only, once: a second look (the one a caller makes under
        a lock, to see what another process learnt meanwhile) asks the file again. Returns how many entries were
        found. Looks at most a quarter of the memo's room at once (the caller primes in windows)."""
        memo = self._memo
        by_dir: Dict[str, List[str]] = {}
        for path in paths[:_MEMO_MAX // 4]:
            if path not in memo:
                parent, name = _split(path)
                by_dir.setdefault(parent, []).append(name)
        if not by_dir:
            return 0
        if len(memo) >= _MEMO_MAX - _MEMO_MAX // 4:
            memo.clear()
        absent = self._primed_absent
        if len(absent) >= _MEMO_MAX // 4:
            absent.clear()
        conn, found = self._conn(), 0
        for parent, names in by_dir.items():
            for start in range(0, len(names), _PRIME_CHUNK):
                chunk = names[start:start + _PRIME_CHUNK]
                sql = ("SELECT name, type, size, hash, versioning FROM entries WHERE dir=? AND name IN "
                       f"({','.join('?' * len(chunk))})")
                with NO_FORK:
                    rows = conn.execute(sql, (parent, *chunk)).fetchall()
                stored = set()
                for row in rows:
                    entry = _row_entry(parent, row)
                    memo[entry.path] = entry
                    stored.add(row[0])
                for name in chunk:
                    if name not in stored:
                        absent[f"{parent}/{name}" if parent else name] = True
                found += len(rows)
        return found

    def is_listed(self, path: str, max_age: float = 0.0) -> bool:
        """Whether the complete listing of folder ``path`` is stored. A yes is remembered (listings of a commit are
        only ever added); a no is trusted for ``max_age`` seconds when the caller allows it (a hint that may lag
        behind another process's listing by that long), so a prefetch asking per file pays one query per folder
        and period, not per file."""
        if path in self._listed:
            return True
        if max_age > 0:
            seen = self._unlisted.get(path)
            if seen is not None and time.monotonic() - seen < max_age:
                return False
        if self._one("SELECT 1 FROM dirs WHERE dir=?", (path,)) is None:
            if max_age > 0:
                if len(self._unlisted) >= _MEMO_MAX:
                    self._unlisted.clear()
                self._unlisted[path] = time.monotonic()
            return False
        if len(self._listed) >= _MEMO_MAX:
            self._listed.clear()
        self._listed.add(path)
        return True

    def count(self, path: str) -> int:
        row = self._one("SELECT n FROM dirs WHERE dir=?", (path,))
        return int(row[0]) if row else 0

    def names(self, path: str) -> List[str]:
        """Names in folder ``path``, in code-point order (SQLite compares UTF-8 bytes: the same order)."""
        conn = self._conn()
        with NO_FORK:
            return [row[0] for row in conn.execute("SELECT name FROM entries WHERE dir=? ORDER BY name", (path,))]

    def entries(self, path: str) -> Iterator[RemoteEntry]:
        """Entries of folder ``path`` in name order, read lazily."""
        conn = self._conn()
        with NO_FORK:
            cursor = conn.execute(
                "SELECT name, type, size, hash, versioning FROM entries WHERE dir=? ORDER BY name", (path,))
        while True:
            with NO_FORK:  # a chunk at a time: the caller's work between chunks may fork
                rows = cursor.fetchmany(_BATCH)
            if not rows:
                return
            for row in rows:
                yield _row_entry(path, row)

    # -- writing --------------------------------------------------------------------------------------------------
    def put_listing(self, path: str, entries: Iterable[RemoteEntry]) -> int:
        """Store the complete listing of folder ``path`` from ``entries`` (consumed here, in one transaction: an
        exception while iterating leaves the store as it was). Returns the number of entries."""
        with self._write_lock:
            return self._put_listing(path, entries)

    def _put_listing(self, path: str, entries: Iterable[RemoteEntry]) -> int:
        conn = self._conn()
        count = 0
        self._memo.clear()
        self._primed_absent.clear()
        self._absent.clear()
        self._unlisted.clear()
        with NO_FORK:  # each call on its own: entries may stream in from the network between them
            conn.execute("BEGIN IMMEDIATE")
        try:
            if self._one("SELECT 1 FROM dirs WHERE dir=?", (path,)) is None:
                batch: List[Tuple[Any, ...]] = []
                for e in entries:
                    batch.append((path, e.name, e.type, e.size, e.hash, e.versioning))
                    if len(batch) >= _BATCH:
                        count += self._write_rows(conn, batch)
                        batch = []
                count += self._write_rows(conn, batch)
                parent, name = _split(path)
                with NO_FORK:
                    if path:
                        conn.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, 'dir', 0, NULL, NULL)",
                                     (parent, name))
                    conn.execute("INSERT OR REPLACE INTO dirs VALUES (?, ?)", (path, count))
            else:  # another process stored it meanwhile: drain nothing more, keep theirs
                count = self.count(path)
            with NO_FORK:
                conn.execute("COMMIT")
        except BaseException:
            with NO_FORK:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._absent.clear()  # (this connection's own writes leave its data_version as it was)
        return count

    @staticmethod
    def _write_rows(conn: sqlite3.Connection, rows: List[Tuple[Any, ...]]) -> int:
        # A listed row replaces what single-path lookups stored before, but a size learnt earlier survives a
        # listing that did not say it (dagshub.com lists size 0 = unknown without include_size).
        with NO_FORK:
            conn.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dir, name) DO UPDATE SET "
                "type=excluded.type, size=COALESCE(excluded.size, entries.size), hash=COALESCE(excluded.hash, "
                "entries.hash), versioning=COALESCE(excluded.versioning, entries.versioning)",
                rows)
        return len(rows)

    def put_entry(self, entry: RemoteEntry) -> None:
        """Remember one path's entry (from a stat or a download); a listed row keeps its hash."""
        parent, name = _split(entry.path)
        self._memo.pop(entry.path, None)
        self._primed_absent.pop(entry.path, None)
        try:
            with self._write_lock:
                self._write_rows(self._conn(), [(parent, name, entry.type, entry.size, entry.hash,
                                                 entry.versioning)])
        except sqlite3.OperationalError as exc:  # busy beyond the timeout: only a hint was lost
            log.debug("could not record %s in %s: %s", entry.path, self.path, exc)
        finally:  # (after the write too: a thread's look meanwhile may have remembered a None again)
            self._absent.pop(entry.path, None)

    def set_size(self, path: str, size: int) -> None:
        """Record the real size of a file learnt from a download (a NULL size becomes known)."""
        parent, name = _split(path)
        self._memo.pop(path, None)
        try:
            with self._write_lock:
                conn = self._conn()
                with NO_FORK:
                    conn.execute("UPDATE entries SET size=? WHERE dir=? AND name=? AND size IS NULL",
                                 (int(size), parent, name))
        except sqlite3.OperationalError as exc:
            log.debug("could not record the size of %s in %s: %s", path, self.path, exc)

    def close(self) -> None:
        """Close this process's connection (the next use opens a new one)."""
        with self._write_lock:
            if self._connection is not None and self._pid == os.getpid():
                with NO_FORK:
                    self._connection.close()
            self._connection = None


class DirListing(Mapping[str, RemoteEntry]):
    """A read-only ``{name: RemoteEntry}`` view of one stored folder; nothing is loaded until asked for."""

    def __init__(self, store: ListingStore, path: str):
        self._store, self.path = store, path
        self._len: Optional[int] = None

    def __getitem__(self, name: str) -> RemoteEntry:
        entry = self._store.entry(f"{self.path}/{name}" if self.path else name) if "/" not in name else None
        if entry is None:
            raise KeyError(name)
        return entry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and "/" not in name and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._store.names(self.path))

    def __len__(self) -> int:
        if self._len is None:
            self._len = self._store.count(self.path)
        return self._len

    def names(self) -> List[str]:
        """Every name, in order (one query; what ``os.listdir`` needs)."""
        return self._store.names(self.path)

    def sorted_entries(self) -> Iterator[RemoteEntry]:
        """Every entry, in name order, read lazily."""
        return self._store.entries(self.path)

    def items(self) -> Any:  # noqa: D102 - Mapping.items, in name order
        return [(e.name, e) for e in self._store.entries(self.path)]

    def values(self) -> Any:  # noqa: D102
        return list(self._store.entries(self.path))


_LIVE_STORES: "weakref.WeakSet[ListingStore]" = weakref.WeakSet()
_INHERITED: List[sqlite3.Connection] = []  # connections a forked child got from its parent: kept, never closed


def _after_fork_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._renew()


_forksafe.register(after_in_child=_after_fork_in_child)


def _remove_tree(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child exiting must not delete its parent's store
        shutil.rmtree(path, ignore_errors=True)
