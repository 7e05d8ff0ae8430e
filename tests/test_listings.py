"""The per-commit listing store (streamloader/remote/listings.py) and the streaming JSON parser that fills it."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import threading

import pytest

from streamloader.remote.client import RemoteEntry
from streamloader.remote.jsonstream import JSONStreamError, JSONTooLarge, iter_json
from streamloader.remote.listings import DirListing, ListingStore


def _entries(n, parent="data", size=None):
    return [RemoteEntry(f"{parent}/{i:06d}.jpg", "file", size, f"{i:032x}", "dvc") for i in range(n)]


def _chunks(data: bytes, n: int):
    for i in range(0, len(data), n):
        yield data[i:i + n]


def test_a_listing_is_stored_and_read_back_without_loading(tmp_path):
    store = ListingStore(str(tmp_path / "s.sqlite"))
    assert store.put_listing("data", iter(_entries(1000))) == 1000
    assert store.is_listed("data") and not store.is_listed("other")
    other = ListingStore(str(tmp_path / "s.sqlite"))  # another process would open the same file
    assert other.entry("data/000123.jpg") == RemoteEntry("data/000123.jpg", "file", None, f"{123:032x}", "dvc")
    assert other.entry("data/nope.jpg") is None
    assert other.entry("data").type == "dir"  # the folder itself is known once listed
    listing = DirListing(other, "data")
    assert len(listing) == 1000 and "000999.jpg" in listing and "x" not in listing
    assert listing.names()[:2] == ["000000.jpg", "000001.jpg"]


def _selects(store: ListingStore) -> list:
    """The SELECTs ``store``'s connection runs from now on (a list that grows)."""
    seen: list = []
    store._conn().set_trace_callback(lambda sql: seen.append(sql) if sql.lstrip().upper().startswith("SELECT") else None)
    return seen


def test_priming_answers_the_next_lookups_in_a_few_queries_and_a_second_look_still_sees_new_rows(tmp_path):
    path = str(tmp_path / "s.sqlite")
    writer = ListingStore(path)
    writer.put_listing("data", iter(_entries(1200)))
    store = ListingStore(path)  # another process's view of the same file
    queries = _selects(store)
    wanted = [f"data/{i:06d}.jpg" for i in range(0, 1300, 2)] + ["top.txt", "other/x.bin"]
    assert store.prime(wanted) == 600  # 600 of the 652 are stored
    assert len(queries) == 4  # data/ in two chunks of 500 names, "" and other/: not one query per path
    assert store.entry("data/000002.jpg") == RemoteEntry("data/000002.jpg", "file", None, f"{2:032x}", "dvc")
    assert store.entry("data/001250.jpg") is None and store.entry("top.txt") is None  # primed: nothing stored
    assert len(queries) == 4
    # another process stores what was missing; a second look (a caller re-checking under a lock) must see it
    writer.put_entry(RemoteEntry("data/001250.jpg", "file", 5, "ab" * 16, "dvc"))
    assert store.entry("data/001250.jpg").size == 5 and len(queries) == 5
    assert store.entry("data/001252.jpg") is None and len(queries) == 5  # (its primed answer, used once)
    assert store.entry("data/001252.jpg") is None and len(queries) == 6
    assert store.prime(wanted[:10]) == 0 and len(queries) == 6  # already in the memo: nothing to ask


def _statements(store: ListingStore) -> list:
    """Every statement ``store``'s connection runs from now on (SELECTs and PRAGMAs alike)."""
    seen: list = []
    store._conn().set_trace_callback(seen.append)
    return seen


def test_a_hint_look_answers_a_recent_none_without_sqlite_and_sees_writes_elsewhere_soon(tmp_path, monkeypatch):
    import streamloader.remote.listings as listings

    path = str(tmp_path / "s.sqlite")
    writer = ListingStore(path)
    writer.put_entry(RemoteEntry("data/known.jpg", "file", 3, "cd" * 16, "dvc"))
    store = ListingStore(path)  # another process's view of the same file
    calls = _statements(store)
    names = [f"data/{i}.jpg" for i in range(50)]
    assert all(store.entry(name, hint=True) is None for name in names)
    first = len(calls)
    assert first <= len(names) + 1  # one query each (and one data_version)
    for _epoch in range(3):  # a warm epoch's looks: nothing asked of SQLite
        assert all(store.entry(name, hint=True) is None for name in names)
    assert len(calls) == first
    # a look that concludes from a None (no hint) always asks the file
    assert store.entry("data/7.jpg") is None and len(calls) == first + 1
    # another process stores one: a plain look sees it at once, a hint look once the recheck time has passed
    writer.put_entry(RemoteEntry("data/3.jpg", "file", 9, "ab" * 16, "dvc"))
    assert store.entry("data/3.jpg") == RemoteEntry("data/3.jpg", "file", 9, "ab" * 16, "dvc")
    writer.put_entry(RemoteEntry("data/4.jpg", "file", 4, "ef" * 16, "dvc"))
    monkeypatch.setattr(listings, "_ABSENT_RECHECK", 0.0)
    assert store.entry("data/4.jpg", hint=True).size == 4  # data_version moved: every None is forgotten
    assert store.entry("data/5.jpg", hint=True) is None
    before = len(calls)
    assert store.entry("data/5.jpg", hint=True) is None
    assert [sql for sql in calls[before:] if not sql.upper().startswith("PRAGMA")] == []  # a PRAGMA, no query


def test_own_writes_end_a_remembered_none_at_once(tmp_path):
    store = ListingStore(str(tmp_path / "s.sqlite"))
    assert store.entry("data/a.jpg", hint=True) is None and store.entry("data/b.jpg", hint=True) is None
    store.put_entry(RemoteEntry("data/a.jpg", "file", 1, "aa" * 16, "dvc"))  # (this connection: same data_version)
    assert store.entry("data/a.jpg", hint=True).size == 1
    store.put_listing("data", iter([RemoteEntry("data/b.jpg", "file", 2, "bb" * 16, "dvc")]))
    assert store.entry("data/b.jpg", hint=True).size == 2


def test_a_forked_child_asks_again_on_its_own_connection(tmp_path):
    path = str(tmp_path / "s.sqlite")
    store = ListingStore(path)
    assert store.entry("data/late.jpg", hint=True) is None
    ListingStore(path).put_entry(RemoteEntry("data/late.jpg", "file", 6, "66" * 16, "dvc"))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        found = store.entry("data/late.jpg", hint=True)
        queue.put(None if found is None else found.size)

    proc = ctx.Process(target=child)
    proc.start()
    assert queue.get(timeout=30) == 6  # the parent's remembered None is not the child's (new connection)
    proc.join(timeout=30)
    assert proc.exitcode == 0


def test_sizes_learnt_later_fill_in_and_a_relisting_keeps_them(tmp_path):
    store = ListingStore(str(tmp_path / "s.sqlite"))
    store.put_entry(RemoteEntry("data/000001.jpg", "file", 77))  # learnt from a download before any listing
    store.put_listing("data", iter(_entries(3)))
    assert store.entry("data/000001.jpg").size == 77 and store.entry("data/000001.jpg").hash == f"{1:032x}"
    store.set_size("data/000002.jpg", 12)
    assert ListingStore(store.path).entry("data/000002.jpg").size == 12


def test_a_stream_that_breaks_midway_leaves_nothing_behind(tmp_path):
    store = ListingStore(str(tmp_path / "s.sqlite"))

    def broken():
        yield from _entries(10)
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        store.put_listing("data", broken())
    assert not store.is_listed("data") and store.entry("data/000001.jpg") is None
    store.put_listing("data", iter(_entries(10)))  # the retry
    assert len(DirListing(store, "data")) == 10


def _child_reads_and_writes(path: str, i: int, out) -> None:
    try:
        store = _INHERITED_STORE  # the parent's object, connection included, inherited through fork
        assert store.entry("data/000005.jpg").hash == f"{5:032x}"
        store.put_entry(RemoteEntry(f"data/child{i}.bin", "file", i + 1))
        out.put(("ok", i))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(exc)))


_INHERITED_STORE = None


def test_forked_children_share_the_store_and_never_break_the_parents_connection(tmp_path):
    global _INHERITED_STORE
    store = _INHERITED_STORE = ListingStore(str(tmp_path / "s.sqlite"))
    store.put_listing("data", iter(_entries(50)))
    assert store.entry("data/000001.jpg") is not None  # the parent's connection is open at fork time
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child_reads_and_writes, args=(store.path, i, out)) for i in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(results) == [("ok", i) for i in range(4)], results
    # the parent goes on reading and writing through the connection it had before the forks
    store._memo.clear()
    assert [store.entry(f"data/child{i}.bin").size for i in range(4)] == [1, 2, 3, 4]
    store.put_listing("more", iter(_entries(5, "more")))
    assert store.is_listed("more")


def test_threads_share_one_connection_and_writers_take_turns(tmp_path):
    store = ListingStore(str(tmp_path / "s.sqlite"))
    errors = []

    def work(k):
        try:
            store.put_listing(f"d{k}", iter(_entries(200, f"d{k}")))
            for i in range(200):
                assert store.entry(f"d{k}/{i:06d}.jpg") is not None
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(store.is_listed(f"d{k}") for k in range(8))


def test_the_store_files_are_private(tmp_path):
    old = os.umask(0)
    try:
        store = ListingStore(str(tmp_path / "s.sqlite"))
        store.put_listing("data", iter(_entries(3)))
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o077 == 0, name


# -- the streaming JSON parser --------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", [[], [1, 2, 3], [{"a": 1}, {"b": [1, {"c": "d,]"}]}, "x"], [12345678, -1.5e3],
                                 {"entries": [1], "next_token": None}, {"path": "a", "size": 3}])
@pytest.mark.parametrize("chunk", [1, 2, 7, 1 << 16])
def test_streamed_json_equals_json_loads(doc, chunk):
    first, values = iter_json(_chunks(json.dumps(doc).encode(), chunk))
    got = list(values) if first == "[" else next(values)
    assert got == doc


@pytest.mark.parametrize("bad", [b"[1,", b"[1 2]", b"[1,]", b"", b"   ", b"[1]x", b'[{"a":', b"[tru]"])
def test_broken_json_is_an_error_not_a_partial_answer(bad):
    with pytest.raises(JSONStreamError):
        first, values = iter_json(_chunks(bad, 3))
        list(values)


def test_an_oversized_item_is_refused_with_bounded_memory():
    huge = b'[{"path": "' + b"a" * (64 << 20) + b'"}]'
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(JSONTooLarge):
        first, values = iter_json(_chunks(huge, 1 << 18), max_value=1 << 20)
        list(values)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 150 + 64  # the input itself


def test_a_big_array_streams_item_by_item():
    data = json.dumps([{"path": f"data/{i:09d}.jpg", "type": "file"} for i in range(50_000)]).encode()
    first, values = iter_json(_chunks(data, 1 << 18))
    assert first == "[" and sum(1 for _ in values) == 50_000
