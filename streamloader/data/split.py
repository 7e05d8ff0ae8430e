"""Deterministic, disjoint train/validation splits of a dataset (→ two ``Subset``) or of label rows (→ two lists).

Each item is ranked by a seeded hash of its identity (the image file name for LabelRow and for datasets that
expose ``files``; the index otherwise) and the first ``round(n * valid_fraction)`` go to validation. So the split
depends only on (seed, items): it is the same in every process and on every run, and a row keeps its side when
rows are added elsewhere (only the boundary moves)::

    train, valid = train_valid_split(dataset, valid_fraction=0.1, seed=0)    # torch Subsets
    train_rows, valid_rows = train_valid_split(filter_labels("data/labels.tsv", "squirrel").rows)
"""
from __future__ import annotations

import hashlib
from typing import Any, List, Sequence, Tuple

__all__ = ["train_valid_split", "split_indices"]


def _rank(name: str, seed: int) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()


def split_indices(names: Sequence[str], valid_fraction: float = 0.1, seed: int = 0) -> Tuple[List[int], List[int]]:
    """``(train_indices, valid_indices)``, each ascending, for items identified by ``names`` (see module doc)."""
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1); got {valid_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    n = len(names)
    n_valid = int(round(n * valid_fraction))
    if valid_fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)  # a requested split is never empty on either side
    order = sorted(range(n), key=lambda i: (_rank(names[i], seed), i))
    valid = sorted(order[:n_valid])
    train = sorted(order[n_valid:])
    return train, valid


def train_valid_split(dataset_or_rows: Any, valid_fraction: float = 0.1, seed: int = 0) -> Tuple[Any, Any]:
    """Split a map-style dataset into two ``torch.utils.data.Subset`` or a sequence of rows into two lists.

    Usage: ``train, valid = train_valid_split(LaionAestheticsDataset(...), valid_fraction=0.2, seed=1)``.
    """
    rows = getattr(dataset_or_rows, "rows", None) if _is_filter_result(dataset_or_rows) else None
    items = rows if rows is not None else dataset_or_rows
    if _is_torch_dataset(items):
        files = getattr(items, "files", None)
        names = list(files) if files is not None and len(files) == len(items) else [str(i) for i in range(len(items))]
        train, valid = split_indices(names, valid_fraction, seed)
        from torch.utils.data import Subset

        return Subset(items, train), Subset(items, valid)
    items = list(items)
    names = [_row_name(item, i) for i, item in enumerate(items)]
    train, valid = split_indices(names, valid_fraction, seed)
    return [items[i] for i in train], [items[i] for i in valid]


def _row_name(item: Any, index: int) -> str:
    file = getattr(item, "file", None)
    return file if isinstance(file, str) else str(index)


def _is_filter_result(obj: Any) -> bool:
    return type(obj).__name__ == "FilterResult" and hasattr(obj, "rows")


def _is_torch_dataset(obj: Any) -> bool:
    import sys

    data = sys.modules.get("torch.utils.data")  # never import torch just to split a list of rows
    return data is not None and isinstance(obj, data.Dataset)
