"""Measured sides of P11: a C reader (``find | xargs -P 8 cat``) through ``streamloader mount``, through the official
client's ``dagshub mount`` when it works here, the official hooks' sequential read otherwise, and local disk.

Run in a child process by :mod:`.child` with the environment the parent prepared (server, token, cache).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

__all__ = ["c_reader", "mount_read", "local_read", "official_mount_read", "official_hooks_read"]

_now = time.perf_counter


def c_reader(directory: str) -> float:
    """Seconds for ``find DIR -name '*.jpg' -print0 | xargs -0 -P 8 -n 50 cat > /dev/null`` (no Python)."""
    started = _now()
    subprocess.run(f"find '{directory}' -name '*.jpg' -print0 | xargs -0 -P 8 -n 50 cat > /dev/null", shell=True,
                   check=True, timeout=900)
    return _now() - started


def _count(directory: str) -> int:
    return sum(1 for name in os.listdir(directory) if name.endswith(".jpg"))


def mount_read(params: Dict[str, Any]) -> Dict[str, Any]:
    """Mount the repo with ``streamloader mount`` (cache from the environment), run the C reader ``passes`` times."""
    from streamloader.fusemount import MountOptions, start
    from streamloader.remote.urls import RepoRef

    ref = RepoRef.parse(params["repo_url"])
    mountpoint = tempfile.mkdtemp(prefix="p11-mnt-", dir=params.get("work_dir"))
    started = _now()
    handle = start(MountOptions(f"dagshub://{ref.owner}/{ref.repo}", mountpoint, branch="main", host=ref.host,
                                read_ahead=int(params.get("read_ahead", 32))))
    mounted = _now()
    try:
        target = os.path.join(mountpoint, params.get("folder", "data"))
        passes = [c_reader(target) for _ in range(int(params.get("passes", 1)))]
        files = _count(target)
    finally:
        handle.unmount()
        os.rmdir(mountpoint)
    return {"passes": passes, "files": files, "mount_s": mounted - started}


def local_read(params: Dict[str, Any]) -> Dict[str, Any]:
    """The C reader over the served folder itself (page cache warmed by one pass first): every pass timed."""
    target = os.path.join(params["local_root"], params.get("folder", "data"))
    c_reader(target)
    return {"passes": [c_reader(target) for _ in range(int(params.get("passes", 3)))], "files": _count(target)}


_FUSECTL = "/sys/fs/fuse/connections"


def _connection_id(mountpoint: str) -> str:
    """The FUSE connection number of a mount (the minor of its device in /proc/self/mountinfo), or ""."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4] == mountpoint:
                return parts[2].split(":")[-1]
    return ""


def _can_abort() -> bool:
    """Whether a hung FUSE connection can be aborted here (fusectl, mounted on demand; needs root)."""
    if os.geteuid() != 0 or not os.path.isdir(_FUSECTL):
        return False
    if not os.listdir(_FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", _FUSECTL], capture_output=True, timeout=30)
    return os.path.ismount(_FUSECTL)


def _forget_mount(proc: subprocess.Popen, mountpoint: str, connection: str) -> None:
    """Abort the connection (a killed libfuse 2 daemon can leave its waiters stuck), kill, unmount lazily."""
    if connection and os.path.isdir(os.path.join(_FUSECTL, connection)):
        with open(os.path.join(_FUSECTL, connection, "abort"), "w", encoding="ascii") as f:
            f.write("1")
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        subprocess.run([tool, "-u", "-z", mountpoint], capture_output=True, timeout=30)


def official_mount_read(params: Dict[str, Any]) -> Dict[str, Any]:
    """``dagshub mount`` (dagshub.streaming.mount, fusepy + libfuse 2) read by the C reader, if it works here.

    Returns ``{"works": False, "reason": ...}`` when it cannot be imported, cannot be probed safely (a hung FUSE
    mount is only cleaned up by aborting its connection, which needs root and fusectl), does not mount, or does not
    answer a ``stat`` of one file within ``probe_s`` seconds.
    """
    from streamloader.fusemount import is_mounted  # /proc/mounts: a stat of a hung mount point would hang too

    probe = subprocess.run([sys.executable, "-c", "import dagshub.streaming.mount"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return {"works": False, "reason": f"dagshub.streaming.mount does not import ({last[:160]})"}
    if not _can_abort():
        return {"works": False, "reason": "not tried: a hung dagshub mount could not be cleaned up here "
                                          "(needs root and fusectl)"}
    mountpoint = tempfile.mkdtemp(prefix="p11-official-", dir=params.get("work_dir"))
    code = ("import sys; from dagshub.streaming.mount import mount; "
            "mount(debug=True, project_root=sys.argv[1], repo_url=sys.argv[2], branch='main')")
    # it logs every operation at DEBUG: discard that (it is part of its cost, not of the figures)
    proc = subprocess.Popen([sys.executable, "-c", code, mountpoint, params["repo_url"]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    connection = ""
    checker = None
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                return {"works": False, "reason": "dagshub mount did not mount within 30 s"}
            time.sleep(0.05)
        connection = _connection_id(mountpoint)
        probe_s = float(params.get("probe_s", 3))
        checker = subprocess.Popen(["stat", os.path.join(mountpoint, "data", "labels.tsv")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            answered = checker.wait(probe_s) == 0
        except subprocess.TimeoutExpired:
            answered = False
        if not answered:
            return {"works": False, "reason": f"no answer to a stat within {probe_s:.0f} s: its getattr stats the "
                                              "path inside its own mount point, re-entering itself"}
        target = os.path.join(mountpoint, "data")
        seconds = c_reader(target)
        return {"works": True, "seconds": seconds, "files": _count(target)}
    finally:
        _forget_mount(proc, mountpoint, connection)
        if checker is not None and checker.poll() is None:
            checker.kill()
            checker.wait(30)
        try:
            os.rmdir(mountpoint)
        except OSError:
            pass


def official_hooks_read(params: Dict[str, Any]) -> Dict[str, Any]:
    """The official hooks reading the first ``limit`` JPEGs of data/ one after another (bytes only, no decode)."""
    from dagshub.streaming import install_hooks, uninstall_hooks

    root = params["project_root"]
    os.chdir(root)
    install_hooks(project_root=root, repo_url=params["repo_url"], branch="main")
    try:
        started = _now()
        names: List[str] = sorted(n for n in os.listdir("data") if n.endswith(".jpg"))
        listed = _now()
        names = names[: params.get("limit")]
        total = 0
        for name in names:
            with open(os.path.join("data", name), "rb") as f:
                total += len(f.read())
        done = _now()
    finally:
        uninstall_hooks()
    return {"files": len(names), "bytes": total, "list_s": listed - started, "read_s": done - listed,
            "s_per_file": (done - listed) / max(1, len(names))}
