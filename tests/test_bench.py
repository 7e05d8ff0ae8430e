"""The benchmark's quick mode runs every case end to end (so scripts/bench.py cannot rot); no timing assertions.

One ``--quick`` run of the whole bench (about 15 s: a server subprocess, the official client in a subprocess,
DataLoader workers) is shared by the tests that read its table and its JSON.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import why_no_mount
from benchmarks import CASE_IDS, CaseResult, format_table, parse_only, to_json
from benchmarks.sides_fetch import fsspec_http_missing
from streamloader.cli import main

ROOT = Path(__file__).resolve().parents[1]


NO_MOUNT = why_no_mount()
NO_FSSPEC_HTTP = fsspec_http_missing()  # aiohttp is in the test extra; without it P12's fsspec side is "NOT RUN"
# every row the full table has: one per case, plus P1's bound, P4's many-file loop, P6's 2 workers and scaling,
# P11's warm and re-read rows (P11 is one "not run" row on a machine that cannot mount), P12's Nagle-server row and bound,
# and P15's (P15 is one "not run" row without aiohttp, which its independent server needs)
ROW_IDS = ["P1", "P1b", "P2", "P2n", "P3", "P4", "P4b", "P5", "P6", "P6b", "P6c", "P7", "P8", "P9", "P10a", "P10b", "P10c",
           "P10d"] + (["P11"] if NO_MOUNT else ["P11", "P11b", "P11c"]) + ["P12", "P12n", "P12b", "P13", "P14"] + (
           ["P15"] if NO_FSSPEC_HTTP else ["P15", "P15n", "P15b"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """``python scripts/bench.py --quick --json-out FILE`` in a clean environment: its table and its JSON."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSHUB_", "STREAMLOADER_"))}
    env.update(DAGSHUB_DISABLE_ANALYTICS="1", STREAMLOADER_CACHE=str(tmp / "cache"), HOME=str(tmp / "home"))
    out = tmp / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json-out", str(out),
         "--workdir", str(tmp / "work")],
        cwd=str(tmp), env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return {"table": proc.stdout, "json": json.loads(out.read_text()), "workdir": tmp / "work"}


def _table_rows(table: str) -> Dict[str, List[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 7 and cells[0] not in ("id", ""):
            rows[cells[0]] = cells
    return rows


def test_quick_table_has_every_row_measured(quick_run):
    rows = _table_rows(quick_run["table"])
    assert list(rows) == ROW_IDS
    header = quick_run["table"].splitlines()[0]
    assert [c.strip() for c in header.split("|")] == ["id", "measurement", "streamloader", "baseline", "ratio",
                                                      "goal", "met?"]
    for case_id, cells in rows.items():
        if case_id in ("P12", "P12n") and NO_FSSPEC_HTTP:
            assert cells[6] == "?" and f"fsspec side NOT RUN: {NO_FSSPEC_HTTP}" in cells[1]
            continue
        if case_id == "P15" and NO_FSSPEC_HTTP:
            assert cells[6] == "?" and f"NOT RUN: {NO_FSSPEC_HTTP}" in cells[1]
            continue
        assert cells[6] in ("yes", "NO", "-"), f"{case_id} did not run: {cells}"  # never ERROR
        if case_id == "P11" and NO_MOUNT:
            assert "cannot mount" in cells[1]
            continue
        assert cells[2] != "-", f"{case_id} has no streamloader figure"


def test_quick_json_parses_and_matches_the_table(quick_run):
    doc = quick_run["json"]
    assert doc["settings"]["quick"] is True and doc["machine"]["cpus"] == os.cpu_count()
    results = {r["id"]: r for r in doc["results"]}
    assert list(results) == ROW_IDS
    assert all(r["error"] is None and (isinstance(r["ours"], (int, float)) or (r["id"] == "P11" and NO_MOUNT))
               for r in results.values())
    # figures that are counts, not timings, are exact even in quick mode
    p9 = results["P9"]
    assert p9["ours"] == p9["baseline"] == doc["settings"]["p9_files"] and p9["met"] is True
    assert results["P3"]["details"]["downloads_during_warm_epoch"] == 0
    assert len(results["P3"]["details"]["runs"]) == doc["settings"]["p3_processes"]
    assert results["P1"]["details"]["ours"]["prefetched"] == doc["settings"]["n_images"]
    assert results["P8"]["details"]["samples"] == doc["settings"]["p8_samples"]
    assert results["P7"]["details"]["matched"] > 0
    # P12-P14: every cold side fetched each file once (one raw GET per file), through its own fresh cache; the
    # server saw no more than 32 in flight from the fixed-32 side
    for case_id in ("P12", "P12n", "P13", "P14") + (() if NO_FSSPEC_HTTP else ("P15", "P15n")):
        for side, runs in results[case_id]["details"]["runs"].items():
            assert runs and all(run["raw_gets"] == run["files"] > 0 for run in runs), (case_id, side, runs)
    assert 1 <= results["P13"]["details"]["peak_in_flight"]["fixed32"] <= 32
    p14 = results["P14"]["details"]  # the machine's floor ran beside the two sides, and the row names it
    assert p14["bare_floor_ms"] > 0
    assert p14["ours_over_floor"] == pytest.approx(results["P14"]["ours"] / p14["bare_floor_ms"])
    assert "floor" in results["P14"]["measurement"]
    if not NO_MOUNT:  # the cold mount read downloaded every JPEG exactly once
        assert results["P11"]["details"]["downloads_once"] is True
    assert doc["all_met"] == all(r["met"] is True for r in doc["results"])


def test_quick_run_kept_its_workdir_and_left_no_server(quick_run):
    work = quick_run["workdir"]
    assert (work / "repo" / "data" / "labels.tsv").exists()  # --workdir keeps the data...
    assert (work / "repo" / "shards" / "0000.tar").exists()
    leftovers = []  # ...but no server or child process of the run is still alive
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmdline:
            leftovers.append(cmdline)
    assert leftovers == []


def test_json_flag_prints_only_json_and_cli_runs_the_same_code(tmp_path, capfd):
    # capfd: from a checkout, `streamloader bench` runs scripts/bench.py in a child process
    code = main(["bench", "--quick", "--only", "p7", "--json", "--workdir", str(tmp_path / "w")])
    assert code == 0
    doc = json.loads(capfd.readouterr().out)
    assert [r["id"] for r in doc["results"]] == ["P7"]
    assert doc["results"][0]["unit"] == "rows/s" and doc["results"][0]["ours"] > 0


def test_only_rejects_unknown_ids(capfd):
    assert main(["bench", "--only", "P1,P42"]) == 2
    assert "P42" in capfd.readouterr().err
    assert parse_only("p3, P1") == ["P1", "P3"] and parse_only(None) == list(CASE_IDS)
    with pytest.raises(ValueError):
        parse_only("P0")


def test_table_marks_errors_and_missing_goals():
    rows = [
        CaseResult("P7", "parse", ours=9.1e5, unit="rows/s", goal=">= 500k rows/s", met=True),
        CaseResult("P6b", "two workers", ours=900.0, baseline=850.0, unit="samples/s", ratio=900 / 850, goal="-"),
        CaseResult.failed("P5", "features", ">= 50x", "RuntimeError: boom"),
    ]
    rows_by_id = _table_rows(format_table(rows))
    assert rows_by_id["P7"][2] == "910k rows/s" and rows_by_id["P7"][6] == "yes"
    assert rows_by_id["P6b"][4] == "1.06x" and rows_by_id["P6b"][6] == "-"
    assert rows_by_id["P5"][6] == "ERROR" and "RuntimeError: boom" in format_table(rows)
    doc = json.loads(to_json(rows))
    assert doc["all_met"] is False and doc["results"][2]["error"] == "RuntimeError: boom"


def test_cli_outside_a_checkout_says_where_the_bench_is(tmp_path):
    """An installed wheel holds streamloader/ without benchmarks/ or scripts/ beside it: `streamloader bench` prints
    one line and exits 2 (no traceback). Layout of such an install: the package alone in a folder on sys.path."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "streamloader").symlink_to(ROOT / "streamloader", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSHUB_", "STREAMLOADER_"))}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import streamloader, importlib.util as u; "
                            "print(streamloader.__file__, u.find_spec('benchmarks'))"],
                           cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split() == [str(site / "streamloader" / "__init__.py"), "None"], where.stderr
    proc = subprocess.run([sys.executable, "-m", "streamloader", "bench", "--quick"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "streamloader bench: the benchmarks live in the source checkout: run python scripts/bench.py there"]


def test_the_library_never_imports_the_bench():
    """The wheel's modules import neither the top-level benchmarks package nor the bench-only test dependencies
    (webdataset, the official client's hooks), and the runtime hooks do not load the test server."""
    bench_only = re.compile(r"^\s*(?:from|import)\s+(?:benchmarks|webdataset|dagshub\.streaming)\b")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in sorted((ROOT / "streamloader").rglob("*.py"))
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if bench_only.match(line)]
    assert offenders == []
    loaded = subprocess.run([sys.executable, "-c", "import sys, streamloader.hooks, streamloader.cli; "
                             "streamloader.cli.build_parser(); print(sorted(m for m in sys.modules if "
                             "m.split('.')[0] in ('benchmarks', 'webdataset') or m.startswith('streamloader.server')))"],
                            cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stderr
