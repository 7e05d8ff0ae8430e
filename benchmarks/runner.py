"""Benchmark orchestration: sizes, the synthetic data, the server subprocess and the per-side environments.

Usage (what ``scripts/bench.py`` calls, through :mod:`benchmarks.cli`)::

    results = run_benchmarks(quick=True, only=["P3", "P7"])
    print(format_table(results))

Every case runs both of its sides in fresh child processes (see :mod:`.child`) against one ``streamloader
serve`` subprocess with injected per-request latency, so the figures are ratios measured side by side.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from benchmarks.child import child_env
from benchmarks.report import CaseResult

log = logging.getLogger(__name__)

__all__ = ["BenchSizes", "FULL", "QUICK", "BenchContext", "run_benchmarks", "CASE_IDS", "parse_only"]

CASE_IDS = ("P1", "P2", "P2n", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P11", "P12", "P13", "P14", "P15")


@dataclass(frozen=True)
class BenchSizes:
    """How big each case is. ``FULL`` is the full-size setting (about 5 minutes); ``QUICK`` runs in seconds."""

    n_images: int = 2000  # P1-P3: LAION-like JPEGs in data/
    image_size: Tuple[int, int] = (200, 200)  # about 30 KB each
    latency: float = 0.02  # injected per-request server latency (seconds)
    concurrency: int = 32  # streamloader's download concurrency (the bound's divisor)
    p2_floor_files: int = 500  # images timed for P2's one-GET floor (per-image time is what counts)
    p2n_files: int = 300  # P2n: images of the guide loop against a Nagle server (per-image time is what counts)
    p3_repeats: int = 3
    p3_processes: int = 3  # P3 runs in this many fresh processes; the median counts
    p4_files: int = 500
    p4_passes: int = 10
    p4_rounds: int = 15
    p4_helper_n: int = 20000  # iterations of streamloader.hooks.measure_hook_overhead
    p5_images: int = 256
    p6_shards: int = 16  # 4000 samples: worker start-up stays a small part of an epoch, as in real training
    p6_per_shard: int = 250
    p6_repeats: int = 3
    p7_rows: int = 540_000
    p8_samples: int = 2000  # x ~1 MB each: a 2 GB shard
    p8_sample_bytes: int = 1_000_000
    p9_files: int = 500
    p9_processes: int = 4
    p10_files: int = 540_000  # P10: the user's folder at its real size (synthesised by the server)
    p10_images: int = 64  # images P10c's DataLoader reads
    p11_official_files: int = 300  # JPEGs the official hooks read one by one for P11 (per-file time x n_images)
    p11_warm_mounts: int = 3  # fresh mounts over the warm cache for P11b; the median counts
    p12_files: int = 1500  # P12: small files fetched cold by fs.prefetch and by fsspec's filecache (per server mode)
    p12_rounds: int = 5  # interleaved rounds of both sides; the medians count (P12 and P15: runs vary by ~1.5x here)
    p13_files: int = 2000  # P13: a fixed 32 in flight takes ~6 s for these at 100 ms
    p13_latency: float = 0.1
    p13_server_limit: int = 128  # the server answers 429 above this many requests in flight
    p13_rounds: int = 2
    p14_files: int = 1500  # P14: client CPU per file, no latency
    p14_rounds: int = 3


FULL = BenchSizes()
QUICK = BenchSizes(n_images=24, p2_floor_files=24, p3_repeats=1, p3_processes=1, p4_files=50, p4_passes=2, p4_rounds=3,
                   p4_helper_n=2000, p5_images=8, p6_shards=2, p6_per_shard=32, p6_repeats=1, p7_rows=20_000,
                   p8_samples=40, p8_sample_bytes=100_000, p9_files=24, p9_processes=4,
                   p10_files=3000, p10_images=8, p2n_files=24,
                   p11_official_files=24, p11_warm_mounts=1, p12_files=24, p12_rounds=1, p13_files=24,
                   p13_rounds=1, p14_files=24, p14_rounds=1)


def parse_only(text: Optional[str]) -> List[str]:
    """``"P1,p3"`` -> ``["P1", "P3"]``; None or "" -> every case. Unknown ids raise ValueError."""
    if not text:
        return list(CASE_IDS)
    wanted = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [w for w in wanted if w not in {case.upper() for case in CASE_IDS}]
    if unknown:
        raise ValueError(f"unknown benchmark id(s) {', '.join(unknown)}; known: {', '.join(CASE_IDS)}")
    return [case for case in CASE_IDS if case.upper() in wanted]


@dataclass
class BenchContext:
    """What the cases share: sizes, the work directory, the served repo and the server subprocess."""

    sizes: BenchSizes
    workdir: str
    token: str = field(default_factory=lambda: f"bench-{secrets.token_hex(8)}")
    repo_root: str = ""
    server: Any = None
    memo: Dict[str, Any] = field(default_factory=dict)  # figures shared by several cases

    @property
    def repo_url(self) -> str:
        return self.server.repo_url

    def fresh_dir(self, name: str) -> str:
        """A new empty directory under the work directory (a reused ``--workdir`` keeps its old ones)."""
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)

    def env(self, cache_dir: Optional[str] = None) -> Dict[str, str]:
        """Environment of a child side: talks to the bench server, with its own (cold) caches and token cache."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSHUB_", "STREAMLOADER_"))}
        env.update({
            "DAGSHUB_DISABLE_ANALYTICS": "1",
            "DAGSHUB_CLIENT_TOKENS_CACHE": os.path.join(self.fresh_dir("tokens"), "tokens.yaml"),
            "STREAMLOADER_CACHE": cache_dir or self.fresh_dir("cache"),
        })
        if self.server is not None:
            env.update({"DAGSHUB_CLIENT_HOST": self.server.url, "DAGSHUB_USER_TOKEN": self.token,
                        "DAGSHUB_TOKEN": self.token})
        return child_env(env)  # ``python -m benchmarks.child`` finds the checkout from any working directory

    def child(self, task: str, params: Mapping[str, Any], *, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None, timeout: float = 900.0) -> Dict[str, Any]:
        """Run one side in a fresh interpreter (see :func:`.child.run_child`)."""
        from benchmarks.child import run_child

        out = os.path.join(self.fresh_dir(f"out-{task}"), "result.json")
        started = time.perf_counter()
        result = run_child(task, params, out, env=env if env is not None else self.env(), cwd=cwd, timeout=timeout)
        log.debug("%s took %.1f s (process included)", task, time.perf_counter() - started)
        return result

    def raw_gets(self) -> Dict[str, int]:
        """``{path: n}`` of raw-file GETs the server answered since the last reset."""
        counts: Dict[str, int] = {}
        for entry in self.server.request_log:
            if entry["kind"] == "raw" and entry["method"] == "GET":
                counts[entry["path"]] = counts.get(entry["path"], 0) + 1
        return counts


def _make_data(ctx: BenchContext, cases: Sequence[str], say: Callable[[str], None]) -> None:
    """Write the served repo: LAION-like images + labels.tsv, and the big shard for P8."""
    from streamloader.synthetic import make_laion_repo

    sizes = ctx.sizes
    ctx.repo_root = os.path.join(ctx.workdir, "repo")
    started = time.perf_counter()
    make_laion_repo(ctx.repo_root, n_images=sizes.n_images, n_squirrel=min(12, sizes.n_images),
                    image_size=sizes.image_size)
    say(f"wrote {sizes.n_images} synthetic JPEGs in {time.perf_counter() - started:.1f} s")
    if "P8" in cases:
        from streamloader.data.shardgen import make_synthetic_shards

        started = time.perf_counter()
        make_synthetic_shards(os.path.join(ctx.repo_root, "shards"), 1, sizes.p8_samples, image_size=256,
                              extra_bytes=sizes.p8_sample_bytes, external_embeddings=True)
        size = os.path.getsize(os.path.join(ctx.repo_root, "shards", "0000.tar"))
        say(f"wrote a {size / 1e9:.2f} GB shard in {time.perf_counter() - started:.1f} s")


_SLOW_CREATE_US = 100.0


def _file_create_cost(directory: str, count: int = 300) -> float:
    """Microseconds to create, write (30 KB) and rename one file in ``directory``, as a cache does per file (the
    files stay: deleting them would slow the next creates near there, see run_benchmarks' warning)."""
    data = os.urandom(30_000)
    started = time.perf_counter()
    for number in range(count):
        name = os.path.join(directory, f"{number}")
        with open(name + ".part", "xb") as f:
            f.write(data)
        os.rename(name + ".part", name)
    return (time.perf_counter() - started) / count * 1e6


def run_benchmarks(quick: bool = False, only: Optional[Iterable[str]] = None, workdir: Optional[str] = None,
                   keep: bool = False, progress: Optional[Callable[[str], None]] = None) -> List[CaseResult]:
    """Run the selected cases (all by default) and return one row per measured figure.

    A case that fails becomes an ERROR row; the others still run. ``workdir`` (default: a temp dir, removed
    afterwards unless ``keep``) holds the data, caches and child outputs. ``progress`` gets one line per step.
    """

    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)

    from benchmarks import cases as case_module
    from streamloader.server import ServerFaults, ServerProcess

    selected = parse_only(",".join(only) if only is not None else None)
    sizes = QUICK if quick else FULL
    own_dir = workdir is None
    root = tempfile.mkdtemp(prefix="streamloader-bench-") if workdir is None else os.path.abspath(workdir)
    os.makedirs(root, exist_ok=True)
    ctx = BenchContext(sizes=sizes, workdir=root)
    results: List[CaseResult] = []
    try:
        create_us = _file_create_cost(ctx.fresh_dir("fs-probe"))
        say(f"file system: {create_us:.0f} us to create, write and rename a 30 KB file in {root}")
        if create_us > _SLOW_CREATE_US:
            say("WARNING: that is slow (a fresh directory of an idle ext4 takes ~25 us): every cold-fetch side pays it "
                "once per file, which narrows the ratios of P12-P15. On an ext4 without a journal, the inodes deleted "
                "in the last 5-10 minutes near that directory (a test run's, a bench run's) are skipped one by one at "
                "each create; wait, or pass --workdir on another top-level directory")
        _make_data(ctx, selected, say)
        server = ServerProcess(ctx.repo_root, token=ctx.token, faults=ServerFaults(latency=sizes.latency))
        with server:
            ctx.server = server
            for case_id in selected:
                started = time.perf_counter()
                say(f"{case_id}: running")
                server.reset_counts()
                load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
                try:
                    rows = getattr(case_module, f"case_{case_id.lower()}")(ctx)
                except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others' figures
                    log.debug("%s failed", case_id, exc_info=True)
                    say(f"{case_id}: FAILED: {type(exc).__name__}: {exc}")
                    rows = [CaseResult.failed(case_id, case_module.TITLES[case_id], case_module.GOALS[case_id],
                                              f"{type(exc).__name__}: {exc}")]
                say(f"{case_id}: done in {time.perf_counter() - started:.1f} s")
                for row in rows:
                    row.details["file_create_us"] = round(create_us, 1)  # (what every stored file costs here)
                    if load_before is not None:  # other processes' load explains noisy figures on a shared machine
                        row.details["loadavg_before_after"] = [load_before[0], os.getloadavg()[0]]
                results.extend(rows)
    finally:
        if own_dir and not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif keep:
            say(f"benchmark files kept in {root}")
    return results


def settings(quick: bool) -> Dict[str, Any]:
    """The sizes used, for the JSON report."""
    return {"quick": quick, **asdict(QUICK if quick else FULL)}
