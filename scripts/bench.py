#!/usr/bin/env python
"""streamloader's speed benchmark: ``python scripts/bench.py [--quick] [--json] [--only P1,P3]``.

The same code as ``streamloader bench`` (see streamloader/benchmarks/): synthetic data, a ``streamloader serve``
subprocess with 20 ms injected latency, both sides of every case in fresh processes, one table of ratios.
The full run takes about 5 minutes on a 2-core machine; ``--quick`` is the test suite's smoke run.
"""
import sys

from streamloader.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
