"""streamloader._files.reserve_fds: the descriptor table grown at once, never a descriptor replaced.

Each case runs in a fresh interpreter (a small table to start from); the table's size is the kernel's
``FDSize`` in /proc/self/status (Linux)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the descriptor table of /proc is Linux's")

_PRELUDE = textwrap.dedent("""
    import json, os, resource, sys
    from streamloader._files import reserve_fds

    def table():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("FDSize:")).split()[1])

    def open_fds():
        return sorted(int(name) for name in os.listdir("/proc/self/fd"))
""")


def _run(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_table_grows_to_hold_that_many_more_and_nothing_is_left_open() -> None:
    got = _run("""
        before, fds = table(), open_fds()
        reserve_fds(before + 100)  # (more than the table holds: it has to grow)
        print(json.dumps({"before": before, "after": table(), "open": len(fds), "same": open_fds() == fds}))
    """)
    assert got["after"] - got["open"] >= got["before"] + 100
    assert got["same"]  # the descriptor it took to grow the table is closed again


def test_a_small_reserve_leaves_the_table_alone() -> None:
    got = _run("""
        before = table()
        reserve_fds(8)
        print(json.dumps({"before": before, "after": table()}))
    """)
    assert got["after"] == got["before"]


def test_a_descriptor_in_use_where_the_table_would_end_is_never_replaced() -> None:
    got = _run("""
        import tempfile
        f = tempfile.TemporaryFile()
        f.write(b"kept")
        f.flush()
        n = len(open_fds()) + 1  # (with the one dup2 adds)
        high = n + 300 - 1  # exactly where reserve_fds(300) asks for its descriptor
        os.dup2(f.fileno(), high)
        reserve_fds(300)
        os.lseek(high, 0, 0)
        same = os.fstat(high).st_ino == os.fstat(f.fileno()).st_ino
        print(json.dumps({"data": os.read(high, 10).decode(), "same": same, "open": high in open_fds()}))
    """)
    assert got == {"data": "kept", "same": True, "open": True}


def test_capped_by_the_open_files_limit_without_an_error() -> None:
    got = _run("""
        before = table()
        cap = min(before + 500, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        reserve_fds(cap * 10)
        print(json.dumps({"before": before, "cap": cap, "after": table()}))
    """)
    assert got["cap"] <= got["after"] < got["cap"] * 2
