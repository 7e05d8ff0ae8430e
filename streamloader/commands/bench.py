"""``streamloader bench [--quick] [--json] [--only P1,P3]``: the speed benchmark (same code as scripts/bench.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``bench`` sub-command."""
    parser = subparsers.add_parser(
        "bench", help="measure streamloader side by side with the official client and local baselines",
        description="Generate synthetic data, start a local server with injected latency, run each case (P1-P9) "
                    "and print one table of ratios. The full run takes several minutes; --quick takes seconds "
                    "(tiny sizes: the figures only show that every case works). Exit code 1 if a case failed to "
                    "run, else 0, whether or not the goals were met.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON results to FILE")
    parser.add_argument("--only", metavar="P1,P3", help="run only these cases (comma-separated ids)")
    parser.add_argument("--workdir", metavar="DIR", help="where data and caches go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamloader.benchmarks import format_table, parse_only, run_benchmarks, settings, to_json

    try:
        only = parse_only(args.only)
    except ValueError as exc:
        print(f"streamloader bench: error: {exc}", file=sys.stderr)
        return 2
    results = run_benchmarks(quick=args.quick, only=only, workdir=args.workdir, keep=args.keep,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    document = to_json(results, settings(args.quick))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(document + "\n")
    print(document if args.json else format_table(results))
    return 1 if any(row.error for row in results) else 0
