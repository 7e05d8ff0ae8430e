"""Fill the feature cache for a dataset in batches: images decoded in DataLoader workers, the model on the GPU.

    ds = LaionAestheticsDataset("data/labels.tsv", "data", extractor, keywords="squirrel")
    result = precompute_features(ds, batch_size=256)       # cuda when available, else CPU
    print(result)                                           # 115 items: 0 cached, 115 computed, 0 failed ...

Resumable: entries are written one by one, atomically, and what is already cached is skipped, so an interrupted
run picks up where it stopped. Multi-GPU: under ``torchrun`` (or with RANK/WORLD_SIZE set) each rank takes the
items whose cache key hashes to it — a disjoint share whatever each rank has already seen — and the cache ends up
exactly as one process would have written it. With ``torch.distributed`` initialized, ranks meet at a barrier at
the end so every rank can read every feature afterwards. Several machines: with one shared cache directory the
default (global rank) split computes each image once in the cluster; with a cache per machine pass
``rank=LOCAL_RANK, world_size=LOCAL_WORLD_SIZE`` so that each machine fills its own cache completely.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from streamloader.data.feature_cache import FeatureCache, content_identity
from streamloader.data.images import decode_image, read_image_bytes
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["precompute_features", "PrecomputeResult"]

_BAD_ITEM = (FileNotFoundError, IsADirectoryError, NotADirectoryError, DataFormatError)


@dataclass
class PrecomputeResult:
    """What one rank did: items in the dataset, distinct images, already cached, computed now, failed, left to
    other ranks; ``failed`` maps image path → reason."""

    items: int = 0
    unique: int = 0
    cached: int = 0
    computed: int = 0
    other_ranks: int = 0
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def images_per_s(self) -> float:
        """Computed images per second."""
        return self.computed / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"{self.items} items ({self.unique} distinct images): {self.cached} cached, {self.computed} computed "
                f"({self.images_per_s:.0f}/s on {self.device}), {len(self.failed)} failed, {self.other_ranks} left "
                f"to other ranks [rank {self.rank}/{self.world_size}]")


class _Preprocessed(Dataset):
    """(position, preprocessed tensor or None, failure reason) for each image to compute; runs in workers."""

    def __init__(self, paths: List[str], fs: Any, preprocess: Any, skip_bad: bool):
        self.paths, self.fs, self.preprocess, self.skip_bad = paths, fs, preprocess, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], str]:
        path = self.paths[i]
        try:
            image = decode_image(read_image_bytes(path, self.fs), path)
        except _BAD_ITEM as exc:
            if not self.skip_bad:
                raise
            return i, None, f"{type(exc).__name__}: {exc}"
        return i, self.preprocess(image), ""


def _collate(items: List[Tuple[int, Optional[torch.Tensor], str]]) -> Tuple[torch.Tensor, Any, List[Tuple[int, str]]]:
    good = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, reason) for i, t, reason in items if t is None]
    positions = torch.tensor([i for i, _ in good], dtype=torch.long)
    tensors = [t for _, t in good]
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        return positions, torch.stack(tensors), failed
    return positions, tensors, failed  # mixed sizes: the model sees them one by one


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    from streamloader.data.tar_embeddings import distributed_context

    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    # Explicit arguments win over torch.distributed: a node-local cache is filled by its node's ranks alone
    # (rank=LOCAL_RANK, world_size=LOCAL_WORLD_SIZE) while the process group spans every node.
    rank, world_size = (rank, world_size) if rank is not None else distributed_context()  # type: ignore[assignment]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def precompute_features(
    dataset: Any,
    extractor: Any = None,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
    num_workers: Optional[int] = None,
    *,
    progress: bool = True,
    on_error: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> PrecomputeResult:
    """Compute and cache the features of every image of a LaionAestheticsDataset that is not cached yet.

    ``extractor`` defaults to the dataset's; ``device`` to cuda when available; ``num_workers`` (image reading
    and decoding) to min(8, CPUs). ``on_error`` defaults to the dataset's policy: "raise" stops at a missing or
    undecodable image, "skip"/"warn" record it in ``result.failed``. The model is moved back to its device after.
    ``progress`` draws a progress bar on rank 0 only (one bar per job, not one per rank).

    Usage: ``precompute_features(ds, batch_size=256)``; multi-GPU: ``torchrun --nproc_per_node 8 script.py``.
    """
    extractor = extractor if extractor is not None else getattr(dataset, "feature_extractor", None)
    if extractor is None or not getattr(extractor, "fingerprint", None):
        raise ValueError("precompute_features needs a feature extractor with a fingerprint (see FeatureExtractor)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    on_error = on_error or getattr(dataset, "on_error", "raise")
    rank, world_size = _rank_world(rank, world_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    cache = _cache_for(dataset, extractor)
    cache.sweep_temp()
    started = time.perf_counter()
    result = PrecomputeResult(items=len(dataset.paths), rank=rank, world_size=world_size, device=str(device))

    todo_paths, todo_ids = _plan(dataset, cache, rank, world_size, on_error, result)
    if todo_paths:
        _run(extractor, cache, todo_paths, todo_ids, dataset.filesystem, batch_size, device, num_workers,
             progress and rank == 0, on_error, result)
    result.seconds = time.perf_counter() - started
    log.info("precompute_features: %s", result)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def _cache_for(dataset: Any, extractor: Any) -> FeatureCache:
    cache = getattr(dataset, "feature_cache", None)
    if cache is not None and cache.fingerprint == extractor.fingerprint:
        return cache
    from streamloader.data.feature_cache import default_feature_dir

    describe = getattr(extractor, "describe", None)
    return FeatureCache(default_feature_dir(getattr(dataset, "cache_dir", None)), extractor.fingerprint,
                        describe() if callable(describe) else None)


def _plan(dataset: Any, cache: FeatureCache, rank: int, world_size: int, on_error: str,
          result: PrecomputeResult) -> Tuple[List[str], List[str]]:
    """Identities of all items (no image download when a listing hash is known); keep this rank's missing ones."""
    seen = set()
    todo_paths: List[str] = []
    todo_ids: List[str] = []
    fs = dataset.filesystem
    for path in dataset.paths:
        try:
            identity = content_identity(path, fs)
        except _BAD_ITEM as exc:
            _fail(result, path, exc, on_error)
            continue
        if identity in seen:
            continue
        seen.add(identity)
        if int(cache.key(identity)[:15], 16) % world_size != rank:
            result.other_ranks += 1
        elif cache.holds(identity):  # (read and checked: a damaged entry is computed again here, not in training)
            result.cached += 1
        else:
            todo_paths.append(path)
            todo_ids.append(identity)
    result.unique = len(seen)
    return todo_paths, todo_ids


def _fail(result: PrecomputeResult, path: str, exc: BaseException, on_error: str) -> None:
    if on_error == "raise":
        raise exc
    result.failed[path] = f"{type(exc).__name__}: {exc}"
    _log_skip(on_error, path, exc)


def _log_skip(on_error: str, path: str, why: Any) -> None:
    (log.warning if on_error == "warn" else log.debug)("precompute: skipped %s: %s", path, why)


def _run(extractor: Any, cache: FeatureCache, paths: List[str], identities: List[str], fs: Any, batch_size: int,
         device: torch.device, num_workers: int, progress: bool, on_error: str, result: PrecomputeResult) -> None:
    loader = DataLoader(
        _Preprocessed(paths, fs, extractor.preprocess, skip_bad=on_error != "raise"),
        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    movable = hasattr(extractor, "to") and hasattr(extractor, "device")
    original = extractor.device if movable else None
    if movable:
        extractor.to(device)
    bar = None
    if progress:
        from streamloader._progress import progress_bar

        bar = progress_bar(total=len(paths), unit="img", desc="features", leave=False)
    try:
        for positions, batch, failed in loader:
            for position, reason in failed:
                result.failed[paths[position]] = reason
                _log_skip(on_error, paths[position], reason)
            if len(positions):
                if isinstance(batch, list):
                    features = torch.cat([extractor.forward_batch(t.unsqueeze(0)) for t in batch])
                else:
                    features = extractor.forward_batch(batch.to(device, non_blocking=True))
                for position, vector in zip(positions.tolist(), features.numpy()):
                    cache.put(identities[position], vector)
                result.computed += len(positions)
            if bar is not None:
                bar.update(len(positions) + len(failed))
    finally:
        if bar is not None:
            bar.close()
        if movable:
            extractor.to(original)
