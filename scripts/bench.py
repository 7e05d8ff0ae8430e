#!/usr/bin/env python
"""streamloader's speed benchmark: ``python scripts/bench.py [--quick] [--json] [--only P1,P3]``.

The code lives in the checkout's top-level ``benchmarks/`` package (not in the installed library, as
mosaicml-streaming and litdata keep theirs): synthetic data, a ``streamloader serve`` subprocess with 20 ms injected
latency, both sides of every case in fresh processes, one table of ratios. The checkout's root goes first on
``sys.path`` and on ``PYTHONPATH`` (the child processes run ``python -m benchmarks.child``). The full run takes
about 5 minutes on a 2-core machine; ``--quick`` is the test suite's smoke run.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _put_checkout_on_path() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    parts = [part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part]
    if ROOT not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *parts])


if __name__ == "__main__":
    _put_checkout_on_path()
    from benchmarks.cli import main

    raise SystemExit(main(sys.argv[1:]))
