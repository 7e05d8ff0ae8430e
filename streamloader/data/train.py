"""The guide's aesthetic-predictor flow as functions: filter → prefetch → precompute features → train an MLP.

``scripts/train_aesthetic.py`` and ``streamloader demo`` are thin wrappers around :func:`run_aesthetic_demo`::

    result = run_aesthetic_demo("dagshub://owner/repo/data/labels.tsv", "dagshub://owner/repo/data",
                                keywords="squirrel", epochs=3, storage_options={"branch": "main"},
                                on_epoch=lambda s: print(s))
    result.train.history[-1].valid_loss

Without an extractor the demo uses :func:`~streamloader.data.features.tiny_cnn_extractor` (a toy: plug in
EfficientNet/CLIP through :class:`~streamloader.data.features.FeatureExtractor` for real predictions).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

__all__ = ["AestheticMLP", "EpochStats", "TrainResult", "DemoResult", "train_regressor", "run_aesthetic_demo"]


class AestheticMLP(nn.Module):
    """Feature vector → predicted aesthetic score (shape ``[B, 1]``): two hidden ReLU layers."""

    def __init__(self, in_dims: int, hidden: Sequence[int] = (64, 16), dropout: float = 0.1):
        super().__init__()
        layers: List[nn.Module] = []
        width = in_dims
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class EpochStats:
    """Mean squared errors of one epoch (valid_loss is NaN without validation data)."""

    epoch: int
    epochs: int
    train_loss: float
    valid_loss: float
    seconds: float

    def __str__(self) -> str:
        return (f"epoch {self.epoch}/{self.epochs}  train_loss {self.train_loss:.4f}  "
                f"valid_loss {self.valid_loss:.4f}  ({self.seconds:.2f} s)")


@dataclass
class TrainResult:
    """The trained model and the per-epoch losses."""

    model: nn.Module
    history: List[EpochStats] = field(default_factory=list)


def _mean_loss(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for features, scores in loader:
            pred = model(features.to(device, non_blocking=True))
            total += nn.functional.mse_loss(pred, scores.to(device), reduction="sum").item()
            count += scores.shape[0]
    return total / count if count else math.nan


def _mean_target(data: Any) -> float:
    """Mean score of a dataset of (features, score), from the labels when it is a (Subset of a) LAION dataset."""
    base, indices = getattr(data, "dataset", None), getattr(data, "indices", None)
    scores = getattr(base if indices is not None else data, "scores", None)
    if isinstance(scores, list) and scores:
        values = [scores[i] for i in indices] if indices is not None else scores
    else:
        values = [float(data[i][1].reshape(-1)[0]) for i in range(len(data))]
    return sum(values) / len(values)


def train_regressor(
    train_data: Any,
    valid_data: Any = None,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    num_workers: int = 0,
    model: Optional[nn.Module] = None,
    on_epoch: Optional[Callable[[EpochStats], None]] = None,
) -> TrainResult:
    """Fit an :class:`AestheticMLP` (or ``model``) on ``(features, score)`` items with MSE and Adam.

    Deterministic for a seed on the CPU. ``on_epoch`` gets each :class:`EpochStats` (the script prints them).
    Usage: ``train_regressor(*train_valid_split(dataset, 0.2), epochs=5)``.
    """
    if epochs < 1 or len(train_data) == 0:
        raise ValueError(f"need epochs >= 1 and a non-empty training set; got epochs={epochs}, {len(train_data)} items")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pin = device.type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=generator,
                              num_workers=num_workers, pin_memory=pin)
    valid_loader = (DataLoader(valid_data, batch_size=batch_size, num_workers=num_workers, pin_memory=pin)
                    if valid_data is not None and len(valid_data) else None)
    # Seeded model init, shuffling and dropout, without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            model = AestheticMLP(int(train_data[0][0].numel()))
            with torch.no_grad():  # start from the mean score, not 0: scores sit around 6.5-8.5
                model.net[-1].bias.fill_(_mean_target(train_data))
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        result = TrainResult(model)
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            for features, scores in train_loader:
                features, scores = features.to(device, non_blocking=True), scores.to(device, non_blocking=True)
                loss = nn.functional.mse_loss(model(features), scores)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * scores.shape[0]
                count += scores.shape[0]
            valid_loss = _mean_loss(model, valid_loader, device) if valid_loader is not None else math.nan
            stats = EpochStats(epoch, epochs, total / count, valid_loss, time.perf_counter() - started)
            result.history.append(stats)
            log.info("%s", stats)
            if on_epoch is not None:
                on_epoch(stats)
    return result


@dataclass
class DemoResult:
    """Everything the demo did: the dataset, the prefetch and precompute reports, the split sizes, the training."""

    dataset: Any
    prefetch: Any
    precompute: Any
    train_size: int
    valid_size: int
    train: TrainResult


def run_aesthetic_demo(
    annotations_file: Any,
    img_dir: str,
    *,
    extractor: Any = None,
    keywords: Any = None,
    limit: Optional[int] = None,
    epochs: int = 3,
    cache_dir: Optional[str] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
    valid_fraction: float = 0.2,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    num_workers: Optional[int] = None,
    precompute_batch_size: int = 256,
    prefetch: bool = True,
    progress: bool = True,
    on_error: str = "skip",
    on_epoch: Optional[Callable[[EpochStats], None]] = None,
    **filters: Any,
) -> DemoResult:
    """Filter rows, prefetch their images, precompute features (cached), split, train; see module docstring.

    ``filters`` go to the dataset (match, exclude, whole_word, regex, min_score, max_score, sample).
    ``num_workers`` decode images for the feature precompute (None: min(8, CPUs)); training reads cached
    features in the main process (about 15 µs per item, less than a worker's hand-off would cost).
    """
    from streamloader.data.features import tiny_cnn_extractor
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.data.precompute import precompute_features
    from streamloader.data.split import train_valid_split

    dataset = LaionAestheticsDataset(
        annotations_file, img_dir, extractor if extractor is not None else tiny_cnn_extractor(),
        limit, keywords=keywords, on_error=on_error, cache_dir=cache_dir, storage_options=storage_options, **filters,
    )
    if len(dataset) < 2:
        raise ValueError(f"the filter selected {len(dataset)} rows; the demo needs at least 2 to train and validate")
    log.info("%s", dataset.filter_result.summary())
    warmed = dataset.prefetch(progress=progress) if prefetch else None
    computed = precompute_features(dataset, batch_size=precompute_batch_size, device=device,
                                   num_workers=num_workers, progress=progress)
    train_set, valid_set = train_valid_split(dataset, valid_fraction, seed)
    trained = train_regressor(train_set, valid_set, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                              seed=seed, on_epoch=on_epoch)
    return DemoResult(dataset, warmed, computed, len(train_set), len(valid_set), trained)
