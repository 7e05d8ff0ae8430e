"""P12-P15: cold fetch of many small files, side by side with fsspec and with a fixed concurrency.

* P12: ``fs.prefetch`` vs fsspec's ``filecache`` over its ``http`` filesystem (aiohttp), ``fs.cat(urls)`` of the
  same files' raw URLs, at the bench's latency, against the default server and against one that leaves Nagle's
  algorithm on (P12n); P12b: streamloader's fetch phase against the bound N x latency / 32.
* P13: 100 ms latency, a server that accepts 128 requests in flight (429 above): the default (adaptive) prefetch vs
  ``max_concurrency=32``; the peak in flight is the server's count.
* P14: client CPU per file of a concurrent fetch, no latency (server in another process), fsspec's beside it, and
  the machine's floor: a bare keep-alive GET + write + rename per file in one thread (``sides_fetch._fetch_bare``).
* P15: P12 against an independent peer (:mod:`.peer`: aiohttp, one event loop, ~0.3 ms of CPU per file where
  ``streamloader serve`` takes ~1 ms), with Nagle off (P15) and on (P15n), and P15b its fetch phase vs the bound.

Every side runs in a fresh process with a fresh cache (and so a fresh host limiter); the sides take turns round by
round (alternating who goes first) and the medians count. The sides are in :mod:`.sides_fetch`.
"""
from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from benchmarks.report import CaseResult
from benchmarks.sides_fetch import fsspec_http_missing

if TYPE_CHECKING:
    from benchmarks.runner import BenchContext

__all__ = ["TITLES", "GOALS", "case_p12", "case_p13", "case_p14", "case_p15"]

TITLES = {
    "P12": "cold fetch of small files: fs.prefetch vs fsspec filecache over http (aiohttp), fs.cat(urls)",
    "P13": "100 ms latency, server accepting 128 in flight: prefetch, adaptive (default) vs max_concurrency=32",
    "P14": "client CPU per small file, concurrent fetch, no latency (fsspec filecache as baseline)",
    "P15": "P12 against an independent DagsHub-like server (aiohttp, one event loop: benchmarks/peer.py)",
}
GOALS = {"P12": ">= 1.5x", "P13": ">= 2.5x", "P14": "<= 0.5 ms", "P15": ">= 1.5x"}
FETCH_PHASE_GOAL = 0.85  # P12b: fraction of the bound N x latency / C


def _paths(ctx: "BenchContext", n: int) -> List[str]:
    return [f"data/{i:08d}.jpg" for i in range(min(n, ctx.sizes.n_images))]


class _Target:
    """The server a case's sides fetch from, with what :func:`_rounds` reads of it: its URLs and process id, and
    its own counts (since ``reset()``) of raw GETs and of the most raw GETs it had in flight at once."""

    def __init__(self, url: str, repo_url: str, pid: Optional[int], reset: Callable[[], None],
                 raw_gets: Callable[[], int], peak_in_flight: Callable[[], int]):
        self.url, self.repo_url, self.pid = url, repo_url, pid
        self.reset, self.raw_gets, self.peak_in_flight = reset, raw_gets, peak_in_flight


def _own_server(ctx: "BenchContext") -> _Target:
    """The bench's ``streamloader serve`` subprocess (its request log has the counts)."""
    def peak() -> int:
        return max((int(e.get("in_flight") or 0) for e in ctx.server.request_log
                    if e["kind"] == "raw" and e["method"] == "GET"), default=0)

    return _Target(ctx.server.url, ctx.repo_url, getattr(ctx.server, "pid", None), ctx.server.reset_counts,
                   lambda: sum(ctx.raw_gets().values()), peak)


def _peer(peer: Any) -> _Target:
    """A :class:`~benchmarks.peer.PeerProcess` (its ``/_peer/stats`` has the counts)."""
    return _Target(peer.url, peer.repo_url, peer.pid, peer.reset_counts, lambda: int(peer.stats()["raw_gets"]),
                   lambda: int(peer.stats()["peak"]))


def _rounds(ctx: "BenchContext", sides: Mapping[str, Mapping[str, Any]], paths: Sequence[str],
            rounds: int, target: Optional[_Target] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Run every side once per round, in fresh processes and caches, alternating the order, against ``target``
    (default: the bench's own server); each run gets the server's CPU, its peak in flight and the raw GETs it
    answered added to its figures."""
    target = target or _own_server(ctx)
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in sides}
    names = list(sides)
    for number in range(rounds):
        for name in (names if number % 2 == 0 else names[::-1]):
            target.reset()
            server_cpu = _process_cpu(target.pid)
            env = {**ctx.env(), "DAGSHUB_CLIENT_HOST": target.url}
            result = ctx.child("cold_fetch", {**sides[name], "repo_url": target.repo_url, "paths": list(paths)},
                               env=env)
            if server_cpu is not None:  # (it includes the side's branch lookup: two requests)
                result["server_cpu_s"] = _process_cpu(target.pid) - server_cpu  # type: ignore[operator]
            result["peak_in_flight"] = target.peak_in_flight()
            result["raw_gets"] = target.raw_gets()
            runs[name].append(result)
    reference = {(run["files"], run["bytes"]) for side in runs.values() for run in side}
    if len(reference) != 1:
        raise RuntimeError(f"the sides fetched different files/bytes: {sorted(reference)}")
    return runs


def _cpu_bound(runs: Sequence[Mapping[str, Any]], files: int) -> Dict[str, Any]:
    """What the CPUs allow: (client + server CPU seconds) / cores, the least wall time the machine can take for
    the work both did (medians of ``runs``), and the text P12b shows about it."""
    if not runs or any("server_cpu_s" not in run for run in runs):
        return {"text": ""}
    client = _median(runs, "cpu_s")
    server = _median(runs, "server_cpu_s")
    cores = os.cpu_count() or 1
    floor = (client + server) / cores
    return {"client_cpu_s": client, "server_cpu_s": server, "cores": cores, "cpu_floor_s": floor,
            "text": (f"; CPU per file: client {client / files * 1e3:.2f} ms + server {server / files * 1e3:.2f} ms "
                     f"on {cores} cores = a floor of {floor:.2f} s")}


def _process_cpu(pid: Optional[int]) -> Optional[float]:
    """CPU seconds the (server) process ``pid`` has used so far (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _of_rounds(n: int) -> str:
    return f"median of {n} rounds" if n > 1 else "1 round"


def _median(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def _ratio(baseline: float, ours: float) -> float:
    return baseline / ours if ours > 0 else float("inf")


def _fetch_sides(missing: Optional[str]) -> Dict[str, Dict[str, Any]]:
    sides: Dict[str, Dict[str, Any]] = {"streamloader": {"engine": "streamloader"}}
    if missing is None:
        sides["fsspec"] = {"engine": "fsspec"}
    return sides


def _p12_mode(ctx: "BenchContext", row_id: str, where: str, paths: Sequence[str], missing: Optional[str],
              target: Optional[_Target] = None) -> Tuple[CaseResult, Dict[str, Any]]:
    """One P12-like row: both sides' cold fetch of ``paths`` from ``target`` (``where`` names it in the title)."""
    sizes = ctx.sizes
    runs = _rounds(ctx, _fetch_sides(missing), paths, sizes.p12_rounds, target)
    ours = _median(runs["streamloader"], "seconds")
    peak = int(statistics.median(run["peak_in_flight"] for run in runs["streamloader"]))
    base = (f"{TITLES['P12']} ({len(paths)} JPEGs, {sizes.latency * 1e3:.0f} ms, {where}, "
            f"{_of_rounds(sizes.p12_rounds)}; server-side peak in flight {peak}")
    details: Dict[str, Any] = {"server": where, "runs": runs, "ours_s": ours, "ours_peak_in_flight": peak}
    if missing is not None:
        return (CaseResult(row_id, f"{base}) -- fsspec side NOT RUN: {missing}", ours, None, "s", None,
                           GOALS["P12"], None, details=details), details)
    theirs = _median(runs["fsspec"], "seconds")
    their_peak = int(statistics.median(run["peak_in_flight"] for run in runs["fsspec"]))
    ratio = _ratio(theirs, ours)
    details.update(fsspec_s=theirs, fsspec_peak_in_flight=their_peak,
                   round_ratios=[_ratio(t["seconds"], o["seconds"])
                                 for t, o in zip(runs["fsspec"], runs["streamloader"])])
    return (CaseResult(row_id, f"{base} vs {their_peak})", ours, theirs, "s", ratio, GOALS["P12"], ratio >= 1.5,
                       details=details), details)


def _bound_row(ctx: "BenchContext", row_id: str, of: str, paths: Sequence[str], default: Mapping[str, Any]
               ) -> CaseResult:
    """``of``'s fetch phase (``default``: its details) against the bound N x latency / C, with the CPU floor."""
    sizes = ctx.sizes
    concurrency = sizes.concurrency
    bound = len(paths) * sizes.latency / concurrency
    fraction = bound / default["ours_s"] if default["ours_s"] > 0 else float("inf")
    from streamloader.remote.limits import HostLimits

    ceiling = HostLimits().ceiling  # (the most the default limiter lets be in flight)
    at_ceiling = len(paths) * sizes.latency / ceiling
    extra = (f"; fsspec: {bound / default['fsspec_s']:.2f} of it" if "fsspec_s" in default else "")
    cpu = _cpu_bound(default["runs"]["streamloader"], len(paths))
    return CaseResult(
        row_id, f"{of} fetch phase vs bound N*latency/{concurrency} = {bound:.2f} s (vs N*latency/{ceiling} "
                f"= {at_ceiling:.2f} s: {at_ceiling / default['ours_s']:.2f}{extra}{cpu['text']})",
        default["ours_s"], bound, "s", fraction, f">= {FETCH_PHASE_GOAL}x", fraction >= FETCH_PHASE_GOAL,
        details={"bound_s": bound, "bound_at_ceiling_s": at_ceiling, "ceiling": ceiling, "ours_s": default["ours_s"],
                 **cpu})


def case_p12(ctx: "BenchContext") -> List[CaseResult]:
    """P12 (default server), P12n (Nagle on) and P12b (P12's fetch phase vs N x latency / 32)."""
    paths = _paths(ctx, ctx.sizes.p12_files)
    missing = fsspec_http_missing()
    default_row, default = _p12_mode(ctx, "P12", "default server", paths, missing)
    ctx.server.set_faults(nagle=True)  # new connections only: every side is a new process
    try:
        nagle_row, _nagle = _p12_mode(ctx, "P12n", "server with Nagle on", paths, missing)
    finally:
        ctx.server.set_faults(nagle=False)
    return [default_row, nagle_row, _bound_row(ctx, "P12b", "P12 (default server)", paths, default)]


def case_p15(ctx: "BenchContext") -> List[CaseResult]:
    """P12 against the independent peer (benchmarks/peer.py): Nagle off (P15), on (P15n), and P15b (P15's fetch
    phase vs N x latency / 32). Needs aiohttp (the peer's server): without it, one NOT RUN row."""
    from benchmarks.peer import PeerProcess

    paths = _paths(ctx, ctx.sizes.p12_files)
    missing = fsspec_http_missing()
    if missing is not None:
        return [CaseResult("P15", f"{TITLES['P15']} -- NOT RUN: {missing}", None, None, "s", None, GOALS["P15"],
                           None)]
    folders = sorted({path.split("/", 1)[0] for path in paths})
    with PeerProcess(ctx.repo_root, token=ctx.token, owner=ctx.server.owner, repo=ctx.server.repo,
                     only=folders) as peer:
        peer.set(latency=ctx.sizes.latency, nagle=False)
        default_row, default = _p12_mode(ctx, "P15", "independent server (aiohttp)", paths, missing, _peer(peer))
        peer.set(nagle=True)  # on each connection at its first request: every side is a new process
        nagle_row, _nagle = _p12_mode(ctx, "P15n", "independent server (aiohttp), Nagle on", paths, missing,
                                      _peer(peer))
    return [default_row, nagle_row, _bound_row(ctx, "P15b", "P15 (independent server)", paths, default)]


def case_p13(ctx: "BenchContext") -> List[CaseResult]:
    """100 ms per request, the server answers 429 above 128 in flight: adaptive prefetch vs a fixed 32."""
    sizes = ctx.sizes
    paths = _paths(ctx, sizes.p13_files)
    sides = {"adaptive": {"engine": "streamloader"}, "fixed32": {"engine": "streamloader", "concurrency": 32}}
    ctx.server.set_faults(latency=sizes.p13_latency, concurrency_limit=sizes.p13_server_limit)
    try:
        runs = _rounds(ctx, sides, paths, sizes.p13_rounds)
    finally:
        ctx.server.set_faults(latency=sizes.latency, concurrency_limit=0)
    adaptive, fixed = _median(runs["adaptive"], "seconds"), _median(runs["fixed32"], "seconds")
    peaks = {name: max(run["peak_in_flight"] for run in side) for name, side in runs.items()}
    throttled = {name: sum(run["raw_gets"] - run["files"] for run in side) for name, side in runs.items()}
    ratio = _ratio(fixed, adaptive)
    n = len(paths)
    title = (f"{TITLES['P13']} ({n} JPEGs, {_of_rounds(sizes.p13_rounds)}; {n / adaptive:.0f} vs "
             f"{n / fixed:.0f} files/s; server-side peak in flight {peaks['adaptive']} vs {peaks['fixed32']}; "
             f"extra GETs (429s retried) {throttled['adaptive']})")
    return [CaseResult("P13", title, adaptive, fixed, "s", ratio, GOALS["P13"], ratio >= 2.5,
                       details={"runs": runs, "peak_in_flight": peaks, "extra_gets": throttled,
                                "latency": sizes.p13_latency, "server_limit": sizes.p13_server_limit})]


def case_p14(ctx: "BenchContext") -> List[CaseResult]:
    """Client CPU per file of a concurrent cold fetch with no latency (server in another process)."""
    sizes = ctx.sizes
    paths = _paths(ctx, sizes.p14_files)
    missing = fsspec_http_missing()
    sides = _fetch_sides(missing)
    sides["one_process"] = {"engine": "streamloader", "processes": 1}
    sides["bare"] = {"engine": "bare"}  # the machine's floor: GET + write + rename, one thread (sides_fetch)
    ctx.server.set_faults(latency=0.0)
    try:
        runs = _rounds(ctx, sides, paths, sizes.p14_rounds)
    finally:
        ctx.server.set_faults(latency=sizes.latency)
    ours = _median(runs["streamloader"], "cpu_ms_per_file")
    one = _median(runs["one_process"], "cpu_ms_per_file")
    parent = statistics.median(run["self_cpu_s"] for run in runs["streamloader"]) / max(1, len(paths)) * 1e3
    floor = _median(runs["bare"], "cpu_ms_per_file")
    title = (f"{TITLES['P14']} ({len(paths)} JPEGs, {_of_rounds(sizes.p14_rounds)}; CPU of the client's "
             f"process + its prefetch workers; parent alone {parent:.2f} ms, processes=1: {one:.2f} ms; this "
             f"machine's floor, a bare keep-alive GET + write + rename per file in one thread: {floor:.2f} ms, "
             f"ours {ours / floor:.2f}x of it")
    goal = float(GOALS["P14"].split()[1])
    details: Dict[str, Any] = {"runs": runs, "one_process_ms": one, "parent_only_ms": parent,
                               "bare_floor_ms": floor, "ours_over_floor": ours / floor}
    if missing is not None:
        return [CaseResult("P14", f"{title}) -- fsspec side NOT RUN: {missing}", ours, None, "ms", None,
                           GOALS["P14"], ours <= goal, details=details)]
    theirs = _median(runs["fsspec"], "cpu_ms_per_file")
    return [CaseResult("P14", f"{title})", ours, theirs, "ms", _ratio(theirs, ours), GOALS["P14"], ours <= goal,
                       details={**details, "fsspec_ms": theirs})]
