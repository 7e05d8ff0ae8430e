"""``streamloader bench [--quick] [--json] [--only P1,P3]``: runs the checkout's ``scripts/bench.py``.

The benchmark is not part of the installed library (it needs the official client and webdataset, test-only
dependencies): it lives in the source checkout's top-level ``benchmarks/`` package. From a checkout (an editable
install) this command runs ``python scripts/bench.py`` with the same options; from an installed wheel it prints
one line saying so and exits 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any, List, Optional

NOT_IN_CHECKOUT = "the benchmarks live in the source checkout: run python scripts/bench.py there"


def register(subparsers: Any) -> None:
    """Add the ``bench`` sub-command (the options of ``scripts/bench.py``, forwarded to it)."""
    parser = subparsers.add_parser(
        "bench", help="measure streamloader side by side with the official client and local baselines (checkout only)",
        description="Run the source checkout's scripts/bench.py: generate synthetic data, start a local server with "
                    "injected latency, run each case (P1-P14) and print one table of ratios. The full run takes "
                    "several minutes; --quick takes seconds (tiny sizes: the figures only show that every case "
                    "works). Exit code 1 if a case failed to run, else 0, whether or not the goals were met; 2 when "
                    "streamloader is not installed from a source checkout.")
    add_bench_options(parser)
    parser.set_defaults(func=run)


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own options; ``benchmarks/cli.py`` declares its parser with this same function."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON results to FILE")
    parser.add_argument("--only", metavar="P1,P3", help="run only these cases (comma-separated ids)")
    parser.add_argument("--workdir", metavar="DIR", help="where data and caches go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")


def bench_script() -> Optional[str]:
    """``scripts/bench.py`` of the checkout this ``streamloader`` package sits in; None for an installed wheel."""
    import streamloader

    root = os.path.dirname(os.path.dirname(os.path.abspath(streamloader.__file__)))
    script = os.path.join(root, "scripts", "bench.py")
    if os.path.isfile(script) and os.path.isfile(os.path.join(root, "benchmarks", "__init__.py")):
        return script
    return None


def forwarded_argv(args: argparse.Namespace) -> List[str]:
    """The parsed options as ``scripts/bench.py`` arguments."""
    argv = [flag for flag, on in (("--quick", args.quick), ("--json", args.json), ("--keep", args.keep),
                                  ("--debug", args.debug), ("--verbose", args.verbose)) if on]
    for flag, value in (("--json-out", args.json_out), ("--only", args.only), ("--workdir", args.workdir)):
        if value is not None:
            argv += [flag, value]
    return argv


def run(args: argparse.Namespace) -> int:
    script = bench_script()
    if script is None:
        print(f"streamloader bench: {NOT_IN_CHECKOUT}", file=sys.stderr)
        return 2
    proc = subprocess.Popen([sys.executable, script, *forwarded_argv(args)])
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the bench got the same Ctrl-C: let it stop its server and clean up
            continue
