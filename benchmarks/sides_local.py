"""Measured sides that need no server traffic while timed (run in a child process by :mod:`.child`)."""
from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable, Dict, List

__all__ = ["hook_overhead", "feature_epoch", "tar_loaders", "labels_speed"]

_now = time.perf_counter


def hook_overhead(params: Dict[str, Any]) -> Dict[str, Any]:
    """``os.stat`` + ``open``/``read`` of local files outside the hooked root, with streamloader's hooks vs without.

    Hooks are installed once; the plain side runs with the wrappers taken out and put back around it (what
    ``measure_hook_overhead`` does), so both sides share one warm process and one installed hook, alternating.
    """
    from benchmarks.hook_overhead import measure_hook_overhead
    from streamloader.hooks import install_hooks, targets

    local_dir = params["local_dir"]
    n = int(params.get("n_files", 500))
    os.makedirs(local_dir, exist_ok=True)
    paths: List[str] = []
    for i in range(n):
        path = os.path.join(local_dir, f"file_{i:05d}.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(int(params.get("file_bytes", 32 * 1024))))
        paths.append(path)
    passes = int(params.get("passes", 4))

    def loop(repeat: int) -> float:
        started = _now()
        for _ in range(repeat):
            for path in paths:
                os.stat(path)
                with open(path, "rb") as f:
                    f.read()
        return _now() - started

    def timed() -> float:
        gc.collect()  # a collection left due by either side must not land in the other side's loop
        loop(1)
        return loop(passes)

    def plain() -> float:
        targets.restore()
        try:
            return timed()
        finally:
            targets.apply()

    best = {"plain": float("inf"), "hooked": float("inf")}
    with install_hooks(project_root=params["project_root"], repo_url=params["repo_url"], branch="main"):
        for round_no in range(int(params.get("rounds", 7))):
            for side in (("hooked", "plain") if round_no % 2 else ("plain", "hooked")):
                best[side] = min(best[side], timed() if side == "hooked" else plain())
    ops = 2 * n * passes
    return {"plain_s": best["plain"], "hooked_s": best["hooked"], "ops": ops,
            "plain_us_per_op": best["plain"] / ops * 1e6, "hooked_us_per_op": best["hooked"] / ops * 1e6,
            # benchmarks.hook_overhead's micro-benchmark (one file; also bare open, bare stat and relative paths)
            "measure_hook_overhead": measure_hook_overhead(int(params.get("helper_n", 20000)))}


def feature_epoch(params: Dict[str, Any]) -> Dict[str, Any]:
    """Epoch of feature vectors from the feature cache vs extracting them (TinyCNN on CPU), local JPEGs."""
    from benchmarks.feature_cache import benchmark_feature_cache

    res = benchmark_feature_cache(n_images=int(params["n_images"]), image_size=tuple(params.get("image_size",
                                                                                                 (200, 200))),
                                  workdir=params.get("workdir"))
    return {**res, "images": int(res["n_images"]), "cached_s": res["cached_epoch_s"]}


def tar_loaders(params: Dict[str, Any]) -> Dict[str, Any]:
    """Samples/s of our tar + .npy loader vs a plain webdataset pipeline on the same local shards, decode included."""
    import torch  # noqa: F401
    import webdataset as wds
    from torch.utils.data import DataLoader

    from streamloader.data.tar_embeddings import create_image_embedding_dataloader

    url, total = params["tar_url"], int(params["samples"])
    batch = int(params.get("batch_size", 32))

    def webdataset_loader(workers: int) -> Any:
        ds = (wds.WebDataset(url, shardshuffle=False, empty_check=False)
              .decode("torchrgb").to_tuple("jpg", "npy"))
        return DataLoader(ds, batch_size=batch, num_workers=workers)

    def ours(workers: int) -> Any:
        return create_image_embedding_dataloader(url, None, num_workers=workers, batch_size=batch,
                                                 shuffle_shards=False)

    def rate(make: Callable[[int], Any], workers: int) -> float:
        loader = make(workers)
        started, seen = _now(), 0
        for images, _emb in loader:
            seen += images.shape[0]
        if seen != total:
            raise RuntimeError(f"loader yielded {seen} samples, expected {total}")
        return total / (_now() - started)

    out: Dict[str, Any] = {}
    repeats = int(params.get("repeats", 3))
    for workers in params.get("workers", [1, 2]):
        # interleave the two loaders so that background load hits both alike; keep each one's best
        best = {"ours": 0.0, "webdataset": 0.0}
        for _ in range(repeats):
            best["ours"] = max(best["ours"], rate(ours, workers))
            best["webdataset"] = max(best["webdataset"], rate(webdataset_loader, workers))
        out[f"ours_{workers}"] = best["ours"]
        out[f"webdataset_{workers}"] = best["webdataset"]
    return out


def labels_speed(params: Dict[str, Any]) -> Dict[str, Any]:
    """Rows/s of parsing + keyword-filtering a synthetic labels.tsv (best of ``repeat``)."""
    from streamloader.synthetic import benchmark_labels

    return benchmark_labels(n_rows=int(params["rows"]), keyword=params.get("keyword", "squirrel"),
                            repeat=int(params.get("repeat", 3)))
