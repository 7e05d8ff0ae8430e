"""streamloader.remote.limits: Retry-After parsing, AIMD, the circuit breaker, slots shared by processes (a killed
one leaks none), and what a slot costs. End-to-end scenarios live in tests/reliability/test_limits.py."""
from __future__ import annotations

import email.utils
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import timeit
import uuid

import pytest

from conftest import TOKEN
from streamloader.errors import HostUnreachableError, RemoteError
from streamloader.remote.client import DagsHubClient, RetryPolicy
from streamloader.remote._slots import OFD_LOCKS, FileSlots
from streamloader.remote.limits import ENV_VAR, HostLimits, host_limiter, parse_retry_after


@pytest.fixture
def limits_env(tmp_path, monkeypatch):
    """``make(knobs) -> a fresh limiter`` (its own host name), with its state under ``tmp_path``."""
    monkeypatch.setenv("STREAMLOADER_LIMITS_DIR", str(tmp_path / "limits"))

    def make(knobs: str = ""):
        monkeypatch.setenv(ENV_VAR, knobs)
        return host_limiter(f"http://host-{uuid.uuid4().hex[:8]}:1")

    return make


def _python(code: str, **env: str) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full, stdout=subprocess.PIPE,
                            text=True)


def test_retry_after_seconds_and_http_dates():
    now = 1_800_000_000.0
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:00", now=now) is not None  # no zone: GMT
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0  # in the past
    for bad in (None, "", "soon", "inf", "nan", "Mon, 99 Foo 2027 99:99:99 GMT"):
        assert parse_retry_after(bad) is None, bad
    assert parse_retry_after("-5") == 0.0


def test_knobs_come_from_the_environment_and_bad_ones_are_ignored(monkeypatch, caplog):
    monkeypatch.setenv(ENV_VAR, "ceiling=256, initial=64,breaker_cooldown=2.5,bogus=1,floor=x")
    with caplog.at_level(logging.WARNING):
        limits = HostLimits.from_env()
    assert (limits.ceiling, limits.initial, limits.breaker_cooldown, limits.floor) == (256, 64, 2.5, 1)
    assert sum("ignoring" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.setenv(ENV_VAR, "ceiling=8,initial=100")
    assert HostLimits.from_env().initial == 8  # clamped into [floor, ceiling]


def _past_a_round(since: float) -> None:
    """Sleep until a round (the fastest request time seen) has surely passed: no request took longer than the time
    since ``since``, taken before any of them started."""
    time.sleep(time.time() - since + 0.01)


def test_a_pushback_cuts_to_0_7_of_what_was_in_flight_once_per_round(limits_env):
    limiter = limits_env("initial=8,ceiling=16")
    assert limiter.shared  # OFD locks work here: the limits are machine-wide
    began = time.time()
    slots = [limiter.slot() for _ in range(6)]
    assert limiter.state()["in_flight"] == 6
    slots[0].throttled(None)
    slots[0].__exit__(None, None, None)
    # sent under a limit of 8: up to 8 may have been in flight (see the next test), 6 are
    assert limiter.state()["limit"] == pytest.approx(0.7 * 8)
    slots[1].throttled(None)  # sent before the cut: no second cut for the same round
    slots[1].__exit__(None, None, None)
    assert limiter.state()["limit"] == pytest.approx(5.6)
    for slot in slots[2:]:
        slot.__exit__(None, None, None)
    _past_a_round(began)
    with limiter.slot() as late:  # sent a round after the cut: a new round, a new cut
        late.throttled(None)
    # one in flight now, but the refused request went out under a limit of 5: 5 may have been in flight then
    assert limiter.state()["limit"] == pytest.approx(0.7 * 5)
    for _ in range(3):
        _past_a_round(began)
        with limiter.slot() as late:
            late.throttled(None)
    assert limiter.state()["limit"] == 1  # never below floor=1


def test_a_refusal_within_a_round_of_the_cut_does_not_cut_again(limits_env):
    """Right after a cut the host is still busy with what went before it (the refused requests among them, until
    they are answered): a request sent within a round of the cut may be refused for that, not for what the cut
    limit lets through."""
    limiter = limits_env("initial=16,ceiling=16")
    with limiter.slot():
        time.sleep(0.3)  # the fastest request seen takes 0.3 s: a round
    refused = limiter.slot()
    refused.throttled(None)
    refused.__exit__(None, None, None)
    assert limiter.state()["limit"] == pytest.approx(0.7 * 16)
    soon = limiter.slot()  # sent just after the cut
    soon.throttled(None)
    soon.__exit__(None, None, None)
    assert limiter.state()["limit"] == pytest.approx(0.7 * 16)  # stale: no second cut
    time.sleep(0.35)
    with limiter.slot() as later:  # sent a round after the cut
        later.throttled(None)
    assert limiter.state()["limit"] == pytest.approx(0.7 * 11)  # sent under a limit of 11


def test_a_cut_counts_what_was_in_flight_when_the_refused_request_went_out(limits_env):
    """Refusals come back together: by the time one is reported, the others that were refused with it have left,
    and what is still in flight understates what the host refused (cutting from it would cut twice as deep)."""
    limiter = limits_env("initial=10,ceiling=16")
    slots = [limiter.slot() for _ in range(10)]
    for slot in slots[3:]:
        slot.__exit__(None, None, None)  # answered (or refused, reported first)
    slots[2].throttled(None)
    slots[2].__exit__(None, None, None)  # 3 in flight as it is reported, 10 when it went out
    assert limiter.state()["limit"] == pytest.approx(0.7 * 10)
    assert limiter.state()["in_flight"] == 2


def test_a_cut_in_slow_start_counts_the_limit_the_refused_request_went_out_under(limits_env):
    """In slow start the limit grows while a request is out: more may be in flight when its refusal comes back
    than when it went out (the host refused at that level, not at the later one)."""
    limiter = limits_env("initial=4,ceiling=16")
    first = limiter.slot()  # sent under a limit of 4
    others = [limiter.slot() for _ in range(3)]
    with pytest.raises(RemoteError, match="slots stayed busy"):
        limiter.slot(deadline=time.time() + 0.05)  # all 4 busy: requests wait, the limit binds
    for slot in others:
        slot.__exit__(None, None, None)  # 3 successes: slow start raises the limit to 7
    assert limiter.state()["limit"] == 7
    more = [limiter.slot() for _ in range(6)]
    assert limiter.state()["in_flight"] == 7
    first.throttled(None)
    first.__exit__(None, None, None)
    assert limiter.state()["limit"] == pytest.approx(0.7 * 4)  # not 0.7 of the 7 in flight as it came back
    for slot in more:
        slot.__exit__(None, None, None)


def test_the_limit_grows_while_it_binds_slow_start_then_additive(limits_env):
    limiter = limits_env("initial=2,ceiling=8")
    held = [limiter.slot(), limiter.slot()]
    with pytest.raises(RemoteError, match="slots stayed busy"):
        limiter.slot(deadline=time.time() + 0.05)  # both slots busy: this caller had to wait
    held.pop().__exit__(None, None, None)
    assert limiter.state()["limit"] == 3  # slow start: +1 per success
    held.pop().__exit__(None, None, None)
    assert limiter.state()["limit"] == 4
    with limiter.slot() as slot:
        slot.throttled(None)
    limit = limiter.state()["limit"]
    limiter.slot(deadline=time.time() + 1).__exit__(None, None, None)
    assert limiter.state()["limit"] == pytest.approx(limit + 1 / limit)  # after a pushback: +1 per window


def test_the_breaker_opens_fails_fast_lets_one_probe_through_and_closes(limits_env):
    limiter = limits_env("breaker_failures=3,breaker_outage=0,breaker_cooldown=0.3")
    for _ in range(3):
        with limiter.slot() as slot:
            slot.unreachable("ConnectionRefusedError")
    started = time.monotonic()
    with pytest.raises(HostUnreachableError, match="ConnectionRefusedError") as info:
        limiter.slot()
    assert time.monotonic() - started < 0.05 and info.value.host == limiter.origin
    assert limiter.origin in str(info.value)
    time.sleep(0.35)
    probe = limiter.slot()  # the cool-down is over: one probe...
    with pytest.raises(HostUnreachableError):
        limiter.slot()  # ...at a time
    probe.unreachable("ConnectionRefusedError")
    probe.__exit__(None, None, None)
    with pytest.raises(HostUnreachableError):
        limiter.slot()  # the probe failed: open again
    time.sleep(0.35)
    with limiter.slot():
        pass  # the probe got an answer
    assert limiter.state()["failures"] == 0
    with limiter.slot(), limiter.slot():
        pass  # closed: no more probes


def test_an_answer_resets_the_count_of_failures(limits_env):
    limiter = limits_env("breaker_failures=3,breaker_outage=0")
    for _ in range(5):
        for outcome in ("unreachable", "unreachable", "answered"):
            with limiter.slot() as slot:
                getattr(slot, outcome)(*(("reset",) if outcome == "unreachable" else ()))
    with limiter.slot():
        pass


def test_a_killed_process_leaks_no_slot(limits_env):
    limiter = limits_env("initial=4,ceiling=4")
    holder = _python(f"""
        import time
        from streamloader.remote.limits import host_limiter
        slots = [host_limiter({limiter.origin!r}).slot() for _ in range(4)]
        print("held", flush=True)
        time.sleep(60)
        """, STREAMLOADER_HOST_LIMITS="initial=4,ceiling=4")
    try:
        assert holder.stdout.readline().strip() == "held"
        assert limiter.state()["in_flight"] == 4
        with pytest.raises(RemoteError, match="all 4 request slots stayed busy"):
            limiter.slot(deadline=time.time() + 0.2)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    started = time.monotonic()
    slots = [limiter.slot(deadline=time.time() + 5) for _ in range(4)]  # the kernel dropped the dead one's locks
    assert time.monotonic() - started < 1
    for slot in slots:
        slot.__exit__(None, None, None)


def test_a_retry_after_holds_back_another_process(limits_env):
    limiter = limits_env()
    with limiter.slot() as slot:
        slot.throttled(1.0)
    waiter = _python(f"""
        import time
        from streamloader.remote.limits import host_limiter
        started = time.monotonic()
        with host_limiter({limiter.origin!r}).slot():
            print(time.monotonic() - started)
        """)
    out, _ = waiter.communicate(timeout=30)
    assert 0.5 < float(out) < 3  # it waited out the pause that this process was told about


def _fork_child(origin: str, queue) -> None:
    limiter = host_limiter(origin)
    before = limiter.state()["in_flight"]
    with limiter.slot():
        during = limiter.state()["in_flight"]
    queue.put((before, during))


def test_a_forked_child_neither_shares_nor_frees_the_parents_slots(limits_env):
    limiter = limits_env()
    held = limiter.slot()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fork_child, args=(limiter.origin, queue))
    child.start()
    assert queue.get(timeout=30) == (1, 2)  # the parent's slot counts, the child took one of its own
    child.join(timeout=30)
    assert child.exitcode == 0
    assert limiter.state()["in_flight"] == 1  # the child's exit did not free the parent's slot
    held.__exit__(None, None, None)
    assert limiter.state()["in_flight"] == 0


def test_a_slot_costs_a_few_microseconds(limits_env, capsys):
    limiter = limits_env()

    def one() -> None:
        with limiter.slot():
            pass

    one()
    per_slot = min(timeit.repeat(one, number=2000, repeat=5)) / 2000
    with capsys.disabled():
        print(f"\n  limiter fast path: {per_slot * 1e6:.1f} us per request (slot taken and given back)")
    assert per_slot < 100e-6  # ~4-6 us on a loaded 2-core VM; the budget for a whole small file is 500 us


def test_pushbacks_do_not_spend_the_attempts(make_server, tmp_path, limits_env):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "x.bin").write_bytes(b"x" * 5000)
    srv = make_server(root, token=TOKEN)
    client = DagsHubClient(srv.repo_url, token=TOKEN, retry=RetryPolicy(attempts=2, initial_backoff=0.001,
                                                                        max_backoff=0.002))
    client.resolve_revision()
    srv.faults.update({"throttle_rate": 1.0, "retry_after": 0})

    def lift() -> None:
        while srv.request_count("data/x.bin", kind="raw") < 10:
            time.sleep(0.005)
        srv.faults.throttle_rate = 0.0

    lifter = threading.Thread(target=lift)
    lifter.start()
    assert client.read_bytes("data/x.bin") == b"x" * 5000  # 10+ pushbacks, 2 attempts: still fetched
    lifter.join()
    assert srv.request_count("data/x.bin", kind="raw") >= 10
    srv.faults.update({"throttle_rate": 0.0, "fail_paths": {"data/x.bin": 500}})
    with pytest.raises(RemoteError, match="HTTP 500"):
        client.read_bytes("data/x.bin")  # real errors still stop after the attempts


def test_try_slot_never_waits_and_a_discarded_slot_reports_nothing(limits_env):
    limiter = limits_env("initial=2,floor=1,ceiling=8")
    first, wait = limiter.try_slot()
    second, _ = limiter.try_slot()
    assert first is not None and second is not None and wait == 0.0
    started = time.monotonic()
    none, wait = limiter.try_slot()  # both slots taken: an answer at once, not a wait
    assert none is None and wait == 0.0 and time.monotonic() - started < 0.5
    before = limiter.state()
    first.discard()  # no request was sent: no success, no failure, no timing is counted
    assert limiter.state()["limit"] == before["limit"]
    again, _ = limiter.try_slot()
    assert again is not None
    second.__exit__(None, None, None)
    again.throttled(retry_after=5.0)
    again.__exit__(None, None, None)  # a pushback: the limit is cut and the host asked for a pause
    paused, wait = limiter.try_slot()
    assert paused is None and 4.0 < wait <= 5.5
    assert limiter.current_limit() == 1


def lock_calls(monkeypatch):
    """The fcntl commands the slot file issues from now on (``monkeypatch.undo()`` stops the count)."""
    import fcntl as fcntl_module

    import streamloader.remote._slots as slots_module

    calls: list = []

    class CountingFcntl:
        def __getattr__(self, name):
            return getattr(fcntl_module, name)

        @staticmethod
        def fcntl(fd, cmd, arg=0):
            calls.append(cmd)
            return fcntl_module.fcntl(fd, cmd, arg)

    monkeypatch.setattr(slots_module, "fcntl", CountingFcntl())
    return calls


@pytest.mark.skipif(not OFD_LOCKS, reason="open-file-description locks (Linux)")
def test_a_slot_given_back_is_taken_again_at_the_first_try(tmp_path, monkeypatch):
    """With many slots in flight, the next request takes the slot this process gave back last, with one lock call
    (a scan from one place would try the held slots first: one failed call each); a slot another process took
    meanwhile is skipped, and never handed out twice."""
    path = str(tmp_path / "host.limits")
    ours, other = FileSlots(path, 128), FileSlots(path, 128)  # two open files: as two processes
    held = [ours.take(0, 128) for _ in range(100)]
    assert sorted(index for _fd, index in held) == list(range(100))
    calls = lock_calls(monkeypatch)
    fd, index = held.pop(37)
    ours.give(fd, index)
    calls.clear()
    assert ours.take(99, 128)[1] == 37 and len(calls) == 1  # the scan from 99 would meet 99 first: held
    fd, index = ours.take(0, 128)  # nothing given back: the scan from 0 finds 100, past the held ones
    assert index == 100
    ours.give(fd, index)
    assert other.take(100, 128)[1] == 100  # another process takes the slot we gave back
    got = ours.take(0, 128)
    assert got is not None and got[1] == 101  # tried 100 first (busy now), then found the next free one
    monkeypatch.undo()
    assert ours.count(128) == other.count(128) == 102


@pytest.mark.skipif(not OFD_LOCKS, reason="open-file-description locks (Linux)")
def test_a_process_holding_the_limit_itself_asks_the_kernel_nothing(tmp_path, monkeypatch):
    """While this process holds every slot below the limit, take() answers None without a lock call (an event
    loop asks once per finished download while the limit binds: a failed scan was one call per slot)."""
    import fcntl as fcntl_module

    slots = FileSlots(str(tmp_path / "host.limits"), 64)
    held = [slots.take(0, 32) for _ in range(32)]
    assert None not in held
    calls = lock_calls(monkeypatch)
    assert slots.take(5, 32) is None and calls == []
    assert slots.take(32, 33)[1] == 32  # a higher limit: the next slot is free
    fd, index = held.pop()
    slots.give(fd, index)
    assert slots.take(0, 33)[1] == index
    assert slots.take(0, 33) is None and calls.count(fcntl_module.F_OFD_SETLK) == 3  # 2 takes + 1 give
