"""Precomputed CLIP embeddings in train/eval/test splits for every rank: the DALLE2 prior's data loaders.

Batches come from an :class:`~streamloader.data.embedding_reader.EmbeddingReader` (or any object with
embedding-reader's call protocol)::

    reader = get_reader(text_conditioned=True, img_url="data/img_emb/", meta_url="data/meta/")
    train, val, test = make_splits(text_conditioned=True, batch_size=2, num_data_points=10000, train_split=0.5,
                                   eval_split=0.25, image_reader=reader, rank=0, world_size=3)
    for img_emb, captions in train:    # [2, 512] tensor, list of 2 str
        ...

Unlike DALLE2-pytorch's own splits, the per-rank ranges are disjoint and cover the data, and every rank gets the
same number of batches (unequal counts hang DDP): a rank with one sample fewer has one slightly smaller batch.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from streamloader.data.embedding_reader import EmbeddingReader, check_paired

log = logging.getLogger(__name__)

__all__ = ["PriorEmbeddingDataset", "make_splits", "rank_share"]


def _batch_bounds(start: int, stop: int, batch_size: int, num_batches: int) -> List[Tuple[int, int]]:
    # Full batches first; only the tail shrinks when the rank must stretch its rows over num_batches.
    bounds, lo, remaining = [], start, stop - start
    for i in range(num_batches):
        size = min(batch_size, remaining - (num_batches - i - 1))
        bounds.append((lo, lo + size))
        lo, remaining = lo + size, remaining - size
    return bounds


class PriorEmbeddingDataset(IterableDataset):
    """Batches ``(img_emb [B, D], captions)`` (text-conditioned) or ``(img_emb, txt_emb)`` over rows ``[start, stop)``.

    ``len()`` is the number of batches. Use with ``DataLoader(ds, batch_size=None)``; with DataLoader workers
    the batches are dealt out so each appears once. ``tokenizer`` (e.g. ``clip.tokenize``) turns the caption
    list into a tensor; ``num_batches`` stretches the rows over exactly that many batches (see make_splits).
    """

    def __init__(
        self,
        text_conditioned: bool,
        batch_size: int,
        start: int,
        stop: int,
        image_reader: Any,
        text_reader: Any = None,
        *,
        tokenizer: Optional[Callable[[List[str]], Any]] = None,
        num_batches: Optional[int] = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start} stop={stop}")
        if not text_conditioned and text_reader is None:
            raise ValueError("text_conditioned=False needs a text_reader")
        if text_conditioned and isinstance(image_reader, EmbeddingReader) and not image_reader.has_metadata:
            raise ValueError("text_conditioned=True needs an image_reader with metadata (captions)")
        super().__init__()
        n = stop - start
        if num_batches is None:
            num_batches = math.ceil(n / batch_size)
        elif not (num_batches <= n <= num_batches * batch_size) or (n == 0) != (num_batches == 0):
            raise ValueError(f"{n} rows cannot fill {num_batches} batches of at most {batch_size}")
        self.text_conditioned = text_conditioned
        self.batch_size, self.start, self.stop = batch_size, start, stop
        self.image_reader, self.text_reader = image_reader, text_reader
        self.tokenizer = tokenizer
        self.bounds = _batch_bounds(start, stop, batch_size, num_batches)

    def __len__(self) -> int:
        return len(self.bounds)

    def _read(self, reader: Any, lo: int, hi: int, captions: bool) -> Tuple[np.ndarray, Optional[list]]:
        if isinstance(reader, EmbeddingReader):
            return reader.read_rows(lo, hi), (reader.read_meta(lo, hi) if captions else None)
        emb, meta = next(iter(reader(batch_size=hi - lo, start=lo, end=hi, show_progress=False)))
        return emb, (list(meta["caption"]) if captions else None)

    def __iter__(self) -> Iterator[Tuple[Any, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for lo, hi in self.bounds[worker::workers]:
            img, captions = self._read(self.image_reader, lo, hi, self.text_conditioned)
            if self.text_conditioned:
                yield torch.from_numpy(img), (self.tokenizer(captions) if self.tokenizer else captions)
            else:
                txt, _ = self._read(self.text_reader, lo, hi, False)
                yield torch.from_numpy(img), torch.from_numpy(txt)

    def __repr__(self) -> str:
        return f"<PriorEmbeddingDataset: start: {self.start}, stop: {self.stop}, len: {len(self)}>"


def rank_share(size: int, rank: int, world_size: int, batch_size: int) -> Tuple[int, int, int]:
    """``(offset, rows, num_batches)`` of ``rank`` in a split of ``size`` rows; num_batches is equal on all ranks.

    Rows differ by at most one between ranks. When equal batch counts are impossible (fewer rows than ranks,
    or batch_size 1 with a remainder) the last ``size % world_size`` rows are dropped, with a warning.
    """
    q, r = divmod(size, world_size)
    if r and (q == 0 or batch_size == 1):
        log.warning(
            "%d rows cannot be split into equal batch counts over %d ranks (batch_size=%d): dropping the last %d",
            size, world_size, batch_size, r,
        )
        r = 0
    rows = q + (1 if rank < r else 0)
    offset = rank * q + min(rank, r)
    return offset, rows, math.ceil((q + (1 if r else 0)) / batch_size)


def make_splits(
    text_conditioned: bool,
    batch_size: int,
    num_data_points: int,
    train_split: float,
    eval_split: float,
    image_reader: Any,
    text_reader: Any = None,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    *,
    tokenizer: Optional[Callable[[List[str]], Any]] = None,
    num_workers: int = 0,
) -> Tuple[Any, Any, Any]:
    """``(train, eval, test)`` DataLoaders over ``[start, start+num_data_points)`` for this rank.

    The splits are consecutive and disjoint (test gets the rest), each split is divided among ranks into
    disjoint ranges, and all ranks get the same number of batches per split.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not (0 <= train_split <= 1 and 0 <= eval_split <= 1 and train_split + eval_split <= 1):
        raise ValueError(f"train_split={train_split} and eval_split={eval_split} must be fractions summing to <= 1")
    if not text_conditioned:
        if text_reader is None:
            raise ValueError("text_conditioned=False needs a text_reader")
        check_paired(image_reader, text_reader)
    count = image_reader.count
    if not 0 <= start < count:
        raise ValueError(f"start={start} is outside the {count} available embeddings")
    if num_data_points > count - start:
        log.warning("num_data_points=%d exceeds the %d embeddings after start=%d; using %d",
                    num_data_points, count - start, start, count - start)
        num_data_points = count - start
    train_size = int(train_split * num_data_points)
    eval_size = int(eval_split * num_data_points)
    edges = [start, start + train_size, start + train_size + eval_size, start + num_data_points]
    loaders = []
    for lo, hi in zip(edges, edges[1:]):
        offset, rows, num_batches = rank_share(hi - lo, rank, world_size, batch_size)
        dataset = PriorEmbeddingDataset(
            text_conditioned, batch_size, lo + offset, lo + offset + rows, image_reader, text_reader,
            tokenizer=tokenizer, num_batches=num_batches,
        )
        loaders.append(DataLoader(dataset, batch_size=None, num_workers=num_workers))
    return loaders[0], loaders[1], loaders[2]
