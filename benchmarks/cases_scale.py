"""P10: the user's repo at its real scale — ``data/`` with 540k JPEGs (synthesised by the server, never written)
and a matching labels.tsv, served the way dagshub.com serves it (unpaged listings, sizes only on request, DVC md5,
presigned redirects, ignored Range), with the bench's latency; streamloader and the official client side by side.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List

from benchmarks.report import CaseResult

if TYPE_CHECKING:
    from benchmarks.runner import BenchContext

__all__ = ["TITLE", "GOAL", "case_p10"]

TITLE = "the user's repo at scale (one folder of N JPEGs, dagshub.com-like server)"
GOAL = "a: <= 4 requests, <= +100 MB, faster; b: no slower at <= 1/3 RSS; c: <= +50 MB, +0.5 s; d: 0 listings"


def _serve(ctx: "BenchContext", n: int) -> Any:
    from streamloader.server import DagsHubLike, ServerFaults, ServerProcess, write_synthetic_labels

    root = ctx.fresh_dir(f"scale-{n}")
    os.makedirs(os.path.join(root, "data"))
    write_synthetic_labels(os.path.join(root, "data", "labels.tsv"), n)
    mode = DagsHubLike(synthetic={"data": n}, max_in_flight=0)
    return ServerProcess(root, token=ctx.token, faults=ServerFaults(latency=ctx.sizes.latency), dagshub_like=mode)


def _env(ctx: "BenchContext", server: Any, cache: str) -> Dict[str, str]:
    env = ctx.env(cache)
    env["DAGSHUB_CLIENT_HOST"] = server.url
    return env


def _requests(server: Any) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for entry in server.request_log:
        counts[entry["kind"]] = counts.get(entry["kind"], 0) + 1
    return counts


def _side(ctx: "BenchContext", server: Any, task: str, client: str, cache: str, **extra: Any) -> Dict[str, Any]:
    project = ctx.fresh_dir(f"project-{client}")
    server.reset_counts()
    result = ctx.child(task, {"client": client, "project_root": project, "repo_url": server.repo_url, **extra},
                       env=_env(ctx, server, cache), cwd=project)
    result["requests"] = _requests(server)
    result["api_requests"] = sum(v for k, v in result["requests"].items() if k != "presigned")
    return result


def case_p10(ctx: "BenchContext") -> List[CaseResult]:
    """(a) install_hooks + labels.tsv + one Image.open; (b) os.listdir('data'); (c) a spawn DataLoader with 2
    workers reading 64 images, against the same run on a 1000-file folder; (d) a second process on one cache."""
    n = ctx.sizes.p10_files
    rows: List[CaseResult] = []
    with _serve(ctx, n) as big:
        ours_cache = ctx.fresh_dir("cache-p10")
        ours_a = _side(ctx, big, "scale_first_image", "ours", ours_cache)
        official_a = _side(ctx, big, "scale_first_image", "official", ctx.fresh_dir("cache-p10o"))
        second = _side(ctx, big, "scale_first_image", "ours", ours_cache)
        ours_b = _side(ctx, big, "scale_listdir", "ours", ours_cache)
        official_b = _side(ctx, big, "scale_listdir", "official", ctx.fresh_dir("cache-p10o"))
        images = ctx.sizes.p10_images
        loader_big = _side(ctx, big, "scale_loader", "ours", ours_cache, images=images)
    with _serve(ctx, 1000) as small:
        loader_small = _side(ctx, small, "scale_loader", "ours", ctx.fresh_dir("cache-p10s"), images=images)
    for side in (ours_a, official_a, second):
        if side["rows"] != n:
            raise RuntimeError(f"labels.tsv read {side['rows']} rows, expected {n}")
    ratio_a = official_a["seconds"] / ours_a["seconds"]
    met_a = ours_a["api_requests"] <= 4 and ours_a["rss_growth_mb"] <= 100 and ratio_a > 1
    rows.append(CaseResult(
        "P10a", f"{TITLE.replace('N', f'{n:,}')}: install_hooks + labels.tsv + first image "
                f"({ours_a['api_requests']} vs {official_a['api_requests']} requests, RSS +{ours_a['rss_growth_mb']:.0f}"
                f" vs +{official_a['rss_growth_mb']:.0f} MB)",
        ours_a["seconds"], official_a["seconds"], "s", ratio_a, "<= 4 req, <= +100 MB, > 1x", met_a,
        details={"ours": ours_a, "official": official_a}))
    ratio_b = official_b["seconds"] / ours_b["seconds"]
    rss_ratio = official_b["rss_growth_mb"] / max(ours_b["rss_growth_mb"], 1.0)
    rows.append(CaseResult(
        "P10b", f"os.listdir of the {n:,}-entry folder (RSS +{ours_b['rss_growth_mb']:.0f} vs "
                f"+{official_b['rss_growth_mb']:.0f} MB: {rss_ratio:.1f}x less)",
        ours_b["seconds"], official_b["seconds"], "s", ratio_b, ">= 1x at <= 1/3 RSS",
        ratio_b >= 1 and rss_ratio >= 3 and ours_b["entries"] == official_b["entries"],
        details={"ours": ours_b, "official": official_b}))
    extra_rss = loader_big["worker_rss_mb"] - loader_small["worker_rss_mb"]
    extra_s = loader_big["seconds"] - loader_small["seconds"]
    rows.append(CaseResult(
        "P10c", f"spawn DataLoader, 2 workers, {loader_big['images']} images: {n:,}-entry vs 1000-entry folder (worker RSS "
                f"{loader_big['worker_rss_mb']:.0f} vs {loader_small['worker_rss_mb']:.0f} MB)",
        loader_big["seconds"], loader_small["seconds"], "s", None, "<= +50 MB, <= +0.5 s",
        extra_rss <= 50 and extra_s <= 0.5, details={"big": loader_big, "small": loader_small,
                                                     "extra_rss_mb": extra_rss, "extra_s": extra_s}))
    listings = second["requests"].get("content", 0)
    rows.append(CaseResult(
        "P10d", f"a second process on the same cache: install_hooks + labels.tsv + first image "
                f"({second['api_requests']} requests: {second['requests']})",
        listings, 0, "listings", None, "== 0", listings == 0, details={"second": second}))
    return rows
