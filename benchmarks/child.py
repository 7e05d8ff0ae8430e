"""Run one measured side of a benchmark in a fresh interpreter and write its figures as JSON.

``python -m benchmarks.child TASK PARAMS_JSON OUT_JSON``. Each side gets its own process so that
process-global state (the official client's hooks and settings read at import, warm caches, the peak RSS) never
leaks from one side into the other. :func:`run_child` is the parent's end. ``benchmarks`` lives in the source
checkout, not in the installed package: :func:`child_env` puts the checkout's root first on the child's
``PYTHONPATH`` (the child may run with another working directory).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["TASKS", "REPO_ROOT", "child_env", "run_child", "ChildError"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The source checkout holding ``benchmarks/`` (and ``streamloader/``, when not installed elsewhere)."""


def child_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's environment) with :data:`REPO_ROOT` prepended to ``PYTHONPATH``."""
    result = dict(os.environ if env is None else env)
    parts = [part for part in result.get("PYTHONPATH", "").split(os.pathsep) if part]
    if REPO_ROOT not in parts:
        result["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *parts])
    return result


class ChildError(RuntimeError):
    """A measured side failed; the message ends with the tail of its stderr."""


def _tasks() -> Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]]:
    from benchmarks import sides_fetch, sides_local, sides_mount, sides_remote, sides_scale

    return {
        "guide_loop": sides_remote.guide_loop,
        "one_get_floor": sides_remote.one_get_floor,
        "dataset_epoch": sides_remote.dataset_epoch,
        "warm_epoch": sides_remote.warm_epoch,
        "shared_cache_reader": sides_remote.shared_cache_reader,
        "stream_tar": sides_remote.stream_tar,
        "hook_overhead": sides_local.hook_overhead,
        "feature_epoch": sides_local.feature_epoch,
        "tar_loaders": sides_local.tar_loaders,
        "labels_speed": sides_local.labels_speed,
        "scale_first_image": sides_scale.scale_first_image,
        "scale_listdir": sides_scale.scale_listdir,
        "scale_loader": sides_scale.scale_loader,
        "mount_read": sides_mount.mount_read,
        "local_read": sides_mount.local_read,
        "official_mount_read": sides_mount.official_mount_read,
        "official_hooks_read": sides_mount.official_hooks_read,
        "cold_fetch": sides_fetch.cold_fetch,
    }


TASKS = ("guide_loop", "one_get_floor", "dataset_epoch", "warm_epoch", "shared_cache_reader", "stream_tar",
         "hook_overhead", "feature_epoch", "tar_loaders", "labels_speed", "scale_first_image", "scale_listdir",
         "scale_loader", "mount_read", "local_read", "official_mount_read", "official_hooks_read", "cold_fetch")


def run_child(task: str, params: Mapping[str, Any], out_path: str, *, env: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None, timeout: float = 600.0) -> Dict[str, Any]:
    """Run ``task`` in a new interpreter and return the dict it wrote; raises ChildError if it failed."""
    if task not in TASKS:
        raise ValueError(f"unknown benchmark task {task!r}")
    cmd = [sys.executable, "-m", "benchmarks.child", task, json.dumps(dict(params)), out_path]
    try:
        proc = subprocess.run(cmd, env=child_env(env), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildError(f"{task} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "")[-2000:]
        raise ChildError(f"{task} exited with {proc.returncode}:\n{tail}")
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Optional[list] = None) -> int:
    """Entry point of the child process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m benchmarks.child TASK PARAMS_JSON OUT_JSON", file=sys.stderr)
        return 2
    task, params, out_path = args[0], json.loads(args[1]), args[2]
    result = _tasks()[task](params)
    import _io

    # the C-level open: never routed through hooks, whatever a side left installed
    with _io.open(os.fspath(out_path), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
