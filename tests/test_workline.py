"""WorkLine: one list shared out to worker processes in chunks (streamloader/remote/workline.py), real processes."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
from typing import Any, List

import pytest

from streamloader.remote import workline
from streamloader.remote.workline import WorkLine

PATHS = [f"data/{i:04d}.jpg" for i in range(203)]


def _claim_all(line: WorkLine, index: int, out: Any) -> None:
    got: List[str] = []
    while True:
        chunk = line.claim(index)
        if not chunk:
            break
        got.extend(chunk)
    out.put((index, got))


def _drain(ctx: Any, line: WorkLine, workers: int) -> List[List[str]]:
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(line, i, out)) for i in range(workers)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return [results[i] for i in range(workers)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_every_file_is_claimed_once_by_processes_in_chunks(method: str) -> None:
    line = WorkLine(PATHS, 3)
    try:
        got = _drain(mp.get_context(method), line, 3)
        assert sorted(path for share in got for path in share) == sorted(PATHS)  # none twice, none left out
        assert line.chunk == 16 and line.n_chunks == 13
        for index, share in enumerate(got):
            assert sorted(line.held_by(index)) == sorted(share)  # the parent reads who claimed what
        assert line.claim(0) == []  # all taken
    finally:
        path = line.path
        line.close()
    assert path is not None and not os.path.exists(path)
    assert sorted(line.held_by(0) + line.held_by(1) + line.held_by(2)) == sorted(PATHS)  # (answers once closed)


def _die_holding_the_lock(line: WorkLine) -> None:
    import fcntl

    fcntl.lockf(line._fd, fcntl.LOCK_EX)  # the lock a claim holds, taken on the descriptor it inherited
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_holding_the_claim_lock_never_blocks_the_others() -> None:
    ctx = mp.get_context("fork")
    line = WorkLine(PATHS, 2)
    try:
        dying = ctx.Process(target=_die_holding_the_lock, args=(line,))
        dying.start()
        dying.join(timeout=30)
        assert dying.exitcode == -signal.SIGKILL
        got = _drain(ctx, line, 1)  # (bounded by the queue's 60 s: a lock left held would fail, not hang)
        assert sorted(got[0]) == sorted(PATHS) and line.held_by(1) == []
    finally:
        line.close()


def test_a_copy_sent_to_a_spawned_worker_claims_by_name_and_its_close_keeps_the_parents_file() -> None:
    line = WorkLine(PATHS, 2)
    try:
        copy = pickle.loads(pickle.dumps(line))  # what a spawned worker gets
        assert copy.claim(1) == PATHS[:16] and line.held_by(1) == PATHS[:16]
        copy.close()
        assert line.path is not None and os.path.exists(line.path)  # the parent's, until the parent closes it
        assert line.claim(0) == PATHS[16:32]
    finally:
        line.close()
    assert not os.path.exists(line.path)


def test_small_lists_still_make_several_chunks_per_worker_and_empty_ones_none() -> None:
    line = WorkLine(PATHS[:20], 2)
    assert (line.chunk, line.n_chunks) == (2, 10)
    line.close()
    empty = WorkLine([], 2)
    assert empty.path is None and empty.claim(0) == [] and empty.held_by(0) == []
    empty.close()


def test_without_fcntl_the_chunks_are_dealt_out_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workline, "fcntl", None)
    line = WorkLine(PATHS, 2)
    assert line.path is None
    shares: List[List[str]] = [[], []]
    for index in (0, 1):
        while True:
            chunk = line.claim(index)
            if not chunk:
                break
            shares[index].extend(chunk)
    assert sorted(shares[0] + shares[1]) == sorted(PATHS)
    assert shares[0][:16] == PATHS[:16] and shares[1][:16] == PATHS[16:32]
    assert line.held_by(0) == shares[0] and line.held_by(1) == shares[1]
