"""P5's measured side: an epoch of features served by the feature cache vs extracting them with a small CNN.

Moved here from ``streamloader.data.features`` (it exists only for the benchmark)::

    from benchmarks.feature_cache import benchmark_feature_cache
    benchmark_feature_cache()["speedup"]          # extraction time / cached epoch time
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from streamloader.data.features import tiny_cnn_extractor

__all__ = ["benchmark_feature_cache"]


def benchmark_feature_cache(n_images: int = 256, image_size: Tuple[int, int] = (200, 200), input_size: int = 64,
                            workdir: Optional[str] = None, repeat: int = 3) -> Dict[str, float]:
    """P5: one epoch of features read from the feature cache vs extracting them with a small CNN on the CPU.

    On a synthetic repo (``image_size`` JPEGs, ~30 KB at 200x200) it times, per image: the guide's extraction
    (``extractor.extract(path)``: read + decode + preprocess + :class:`~streamloader.data.features.TinyCNN`), a first dataset epoch (the same
    plus storing the features) and an epoch of a fresh dataset object served by the cache alone (extraction: best
    of ``repeat``; the cached epoch, a few milliseconds that one context switch can double: best of
    ``5 * repeat``). ``speedup`` = extraction time / cached epoch time (the bench requires >= 50). torch runs single-threaded meanwhile: at batch
    size 1 extra intra-op threads only add overhead (and collapse on a busy machine), so this is the fastest, most
    conservative extraction baseline. Usage: ``benchmark_feature_cache()["speedup"]``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_benchmark(n_images, image_size, input_size, workdir, max(1, repeat))
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(n_images: int, image_size: Tuple[int, int], input_size: int, workdir: Optional[str],
                   repeat: int) -> Dict[str, float]:
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.synthetic import make_laion_repo

    with tempfile.TemporaryDirectory(prefix="streamloader-p5-", dir=workdir) as tmp:
        repo = make_laion_repo(Path(tmp) / "repo", n_images=n_images, n_squirrel=0, image_size=image_size)
        extractor = tiny_cnn_extractor(input_size=input_size)
        data_dir = str(repo.root / "data")
        paths = [str(repo.image_path(name)) for name in repo.files]
        extractor.extract(paths[0])  # warm-up: first-call allocations are not part of an epoch

        extract_s = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            for path in paths:
                extractor.extract(path)
            extract_s = min(extract_s, time.perf_counter() - started)

        def epoch() -> Tuple[float, Dict[str, Any]]:
            dataset = LaionAestheticsDataset(str(repo.labels_path), data_dir, extractor, cache_dir=tmp)
            begin = time.perf_counter()
            for index in range(len(dataset)):
                dataset[index]
            return time.perf_counter() - begin, dataset.stats

        first_s, _ = epoch()
        cached_s, stats = min((epoch() for _ in range(5 * repeat)), key=lambda timed: timed[0])
    if stats["features_computed"] or stats["features_cached"] != n_images:
        raise RuntimeError(f"feature cache benchmark: the cached epoch was not served from the cache: {stats}")
    return {
        "n_images": float(n_images),
        "extract_s": extract_s,
        "first_epoch_s": first_s,
        "cached_epoch_s": cached_s,
        "extract_ms_per_image": extract_s / n_images * 1e3,
        "cached_us_per_image": cached_s / n_images * 1e6,
        "speedup": extract_s / cached_s if cached_s > 0 else float("inf"),
    }
