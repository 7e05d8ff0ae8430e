"""P11: ``streamloader mount`` read by a C program (``find | xargs -P 8 cat``): cold vs the official client, warm
(fresh mount over a full cache) and re-read (kernel page cache) vs the same reader on local disk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from benchmarks.report import CaseResult

if TYPE_CHECKING:
    from benchmarks.runner import BenchContext

__all__ = ["TITLE", "GOAL", "case_p11"]

TITLE = "cold read by a C reader (find, xargs -P 8 cat) through streamloader mount"
GOAL = ">= 10x"


def _ratio(baseline: float, ours: float) -> float:
    return baseline / ours if ours > 0 else float("inf")


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def case_p11(ctx: "BenchContext") -> List[CaseResult]:
    """``streamloader mount`` read by a C program: cold vs the official client, warm and re-read vs local disk.

    The official side is ``dagshub mount`` with the same reader when it works on this machine; otherwise (it needs
    fusepy and libfuse 2, and dagshub 0.7's mount re-enters itself on every stat) the official hooks reading the
    same JPEGs one by one in Python, timed over ``p11_official_files`` files and scaled to all of them.
    """
    from streamloader.errors import MountError
    from streamloader.fusemount import check_fuse, load_binding

    sizes = ctx.sizes
    try:
        load_binding()
        check_fuse()
    except MountError as exc:
        return [CaseResult("P11", f"{TITLE}: not run, this machine cannot mount ({exc})", goal="-")]
    cache = ctx.fresh_dir("cache-p11")
    params = {"repo_url": ctx.repo_url, "folder": "data", "work_dir": ctx.fresh_dir("p11-mnt")}
    ctx.server.reset_counts()
    cold = ctx.child("mount_read", {**params, "passes": 2}, env=ctx.env(cache))  # cold, then re-read
    gets = {p: n for p, n in ctx.raw_gets().items() if p.endswith(".jpg")}
    warm_runs = [ctx.child("mount_read", {**params, "passes": 1}, env=ctx.env(cache))
                 for _ in range(sizes.p11_warm_mounts)]
    local = ctx.child("local_read", {"local_root": ctx.repo_root, "folder": "data", "passes": 3})
    n = cold["files"]
    if n != local["files"] or n != sizes.n_images:
        raise RuntimeError(f"the mount shows {n} JPEGs, the local folder {local['files']}")
    official = ctx.child("official_mount_read", {"repo_url": ctx.repo_url, "work_dir": params["work_dir"]})
    if official.get("works"):
        baseline, label = official["seconds"], "official `dagshub mount`, same reader"
    else:
        project = ctx.fresh_dir("project-p11")
        hooks = ctx.child("official_hooks_read", {"project_root": project, "repo_url": ctx.repo_url,
                                                  "limit": sizes.p11_official_files}, cwd=project)
        official["hooks"] = hooks
        baseline = hooks["s_per_file"] * n
        label = (f"official HOOKS' sequential read ({hooks['files']} files timed, x {n}); `dagshub mount` "
                 f"unusable here: {official['reason']}")
    ours_cold, ours_reread = cold["passes"]
    warm = _median([run["passes"][0] for run in warm_runs])
    local_s = _median(local["passes"])
    once = len(gets) == n and set(gets.values()) == {1}
    ratio = _ratio(baseline, ours_cold)
    details = {"cold": cold, "warm_runs": warm_runs, "local": local, "official": official,
               "downloads_once": once, "repeated": sorted(p for p, k in gets.items() if k > 1)[:20]}
    warm_ratio, reread_ratio = _ratio(local_s, warm), _ratio(local_s, ours_reread)
    return [
        CaseResult("P11", f"{TITLE} ({n} JPEGs, {sizes.latency * 1e3:.0f} ms) vs {label}", ours_cold,
                   baseline, "s", ratio, GOAL, ratio >= 10 and once, details=details),
        CaseResult("P11b", f"P11 warm: cache full, fresh mount, same reader vs local disk (median of "
                           f"{len(warm_runs)} mounts)", warm, local_s, "s", warm_ratio, ">= 0.7x", warm_ratio >= 0.7,
                   details=details),
        CaseResult("P11c", "P11 re-read through the same mount (kernel page cache) vs local disk", ours_reread,
                   local_s, "s", reread_ratio, ">= 0.7x", reread_ratio >= 0.7, details=details),
    ]
