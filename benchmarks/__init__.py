"""streamloader's benchmark (``scripts/bench.py``, ``streamloader bench``): speed measured side by side.

Every figure is a ratio of two sides measured in the same run, on the same machine, against the same
``streamloader serve`` subprocess with injected per-request latency (P15: an independent aiohttp server instead,
:mod:`.peer`); each side runs in a fresh child process with cold caches where the case says cold. Rows: cases P1-P15 (see :data:`.cases.TITLES` and :data:`.cases.GOALS`)::

    from benchmarks import run_benchmarks, format_table
    print(format_table(run_benchmarks(quick=True, only=["P7"])))

Layout: :mod:`.runner` (sizes, data, server, per-side environments), :mod:`.cases` (one function per row),
:mod:`.sides_remote` / :mod:`.sides_local` / :mod:`.sides_fetch` ... (the measured code, run by :mod:`.child` in a new interpreter) and
:mod:`.report` (the table and the JSON).
"""
from benchmarks.report import CaseResult, format_table, to_json
from benchmarks.runner import CASE_IDS, FULL, QUICK, BenchSizes, parse_only, run_benchmarks, settings

__all__ = ["CaseResult", "format_table", "to_json", "run_benchmarks", "parse_only", "settings", "BenchSizes",
           "FULL", "QUICK", "CASE_IDS"]
