"""The benchmark's command line: ``python scripts/bench.py [--quick] [--json] [--only P1,P3]``.

Exit codes: 0 when every case ran (whether or not its goal was met), 1 if a case failed to run, 2 on a usage
error. ``streamloader bench`` (in a source checkout) runs this same command through ``scripts/bench.py``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from streamloader.commands.bench import add_bench_options

__all__ = ["build_parser", "main"]

DESCRIPTION = ("Generate synthetic data, start a local server with injected latency, run each case (P1-P15) and print "
               "one table of ratios. The full run takes several minutes; --quick takes seconds (tiny sizes: the "
               "figures only show that every case works). Exit code 1 if a case failed to run, else 0, whether or "
               "not the goals were met.")


def build_parser(prog: str = "scripts/bench.py") -> argparse.ArgumentParser:
    """The bench's options (declared once, in ``streamloader.commands.bench``, which forwards them here)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_bench_options(parser)
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (INFO)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the bench with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from benchmarks import format_table, parse_only, run_benchmarks, settings, to_json

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug or args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        only = parse_only(args.only)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        results = run_benchmarks(quick=args.quick, only=only, workdir=args.workdir, keep=args.keep,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    document = to_json(results, settings(args.quick))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(document + "\n")
    print(document if args.json else format_table(results))
    return 1 if any(row.error for row in results) else 0
