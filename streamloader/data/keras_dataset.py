"""``LaionAestheticsPyDataset``: the guide's Keras ``LAIONAestheticsDataGenerator`` as a ``keras.utils.PyDataset``.

It batches a :class:`~streamloader.data.laion.LaionAestheticsDataset` (the same filters, ``on_error`` policy,
feature extractor protocol and on-disk feature cache, so features cached by a torch run serve Keras and the other
way round) into ``(embeddings [B, D] float32, scores [B] float32)`` numpy batches, reshuffled every epoch::

    import os; os.environ.setdefault("KERAS_BACKEND", "torch")     # no TensorFlow needed
    from streamloader import LaionAestheticsDataset, LaionAestheticsPyDataset, train_valid_split, install_hooks

    install_hooks(project_root=".", repo_url="https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus")
    full = LaionAestheticsDataset("data/labels.tsv", "data", tiny_cnn_extractor(), keywords="squirrel")
    train, valid = train_valid_split(full, valid_fraction=0.2)
    model.fit(LaionAestheticsPyDataset(train, batch_size=32, workers=4),
              validation_data=LaionAestheticsPyDataset(valid, batch_size=32, shuffle=False), epochs=10)

or, as the guide builds it, straight from the labels file: ``LaionAestheticsPyDataset("data/labels.tsv", "data",
extractor, batch_size=32, keywords="squirrel")``. The extractor may be a :class:`FeatureExtractor` (features go
to the disk cache) or the guide's own class with only ``extract(image_path)`` (kept in memory per process).

``workers`` / ``use_multiprocessing`` / ``max_queue_size`` are Keras's: threads, or a process pool that Keras
forks per epoch; installed hooks and the dataset's counters follow into those processes. In those processes torch
runs single-threaded, as in DataLoader workers (a child forked from a thread that used torch's OpenMP threads
would hang in its first parallel op), and fresh downloads are stored in the cache before a batch is returned (the
pool's workers are terminated at the end of each epoch). If ``KERAS_BACKEND`` is
unset and TensorFlow is not installed, importing this module selects the torch backend (streamloader already
depends on torch) instead of letting ``import keras`` fail.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import multiprocessing
import os
import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["LaionAestheticsPyDataset", "LAIONAestheticsDataGenerator"]


def _default_backend() -> None:
    """Pick the torch backend when Keras would otherwise try TensorFlow and it is missing."""
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND") or importlib.util.find_spec("tensorflow"):
        return
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            configured = json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        configured = "tensorflow"
    if configured == "tensorflow":
        log.info("TensorFlow is not installed: using the torch backend for Keras (set KERAS_BACKEND to choose)")
        os.environ["KERAS_BACKEND"] = "torch"


_default_backend()

import keras  # noqa: E402  (after choosing the backend)

from streamloader.data.laion import LaionAestheticsDataset  # noqa: E402


class LaionAestheticsPyDataset(keras.utils.PyDataset):
    """``(embeddings [B, D], scores [B])`` numpy batches of a LaionAestheticsDataset; see module docstring.

    ``source``: a LaionAestheticsDataset, a ``torch.utils.data.Subset`` of one (e.g. from
    :func:`~streamloader.data.split.train_valid_split`), or a labels file (path, URL or rows); then ``img_dir``,
    ``feature_extractor``, ``limit`` and any keyword of LaionAestheticsDataset (``keywords``, ``min_score``,
    ``on_error``, ``cache_dir``, ``storage_options``, ...) build the dataset. ``shuffle`` reorders the samples every
    epoch (seeded by ``seed`` and the epoch number, the same in every process); ``drop_last`` drops a short last batch.
    """

    def __init__(
        self,
        source: Any,
        img_dir: Optional[str] = None,
        feature_extractor: Any = None,
        batch_size: int = 32,
        limit: Optional[int] = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        **dataset_options: Any,
    ):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.dataset, self.indices = _resolve(source, img_dir, feature_extractor, limit, dataset_options)
        if self.dataset.feature_extractor is None:
            raise ValueError("LaionAestheticsPyDataset batches features: pass a feature_extractor "
                             "(a FeatureExtractor, or any object with .extract(image_path))")
        self.feature_extractor = self.dataset.feature_extractor
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        indices = np.asarray(self.indices, dtype=np.int64)
        if not self.shuffle:
            return indices
        return np.random.default_rng([self.seed, self.epoch]).permutation(indices)

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        in_child = multiprocessing.parent_process() is not None
        if in_child:
            _worker_setup()
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        embeddings, scores = [], np.empty(len(chosen), dtype=np.float32)
        for i, j in enumerate(chosen.tolist()):
            embedding, score = self.dataset[j]
            embeddings.append(_to_numpy(embedding))
            scores[i] = float(score.reshape(-1)[0])
        if in_child:
            _store_downloads()
        return np.stack(embeddings).astype(np.float32, copy=False), scores

    def on_epoch_end(self) -> None:
        """Next epoch: a new seeded order of the samples (when ``shuffle``)."""
        self.epoch += 1
        self.order = self._order()

    def set_epoch(self, epoch: int) -> None:
        """Jump to epoch ``epoch``'s order (e.g. after restarting a job at that epoch)."""
        self.epoch = int(epoch)
        self.order = self._order()

    @property
    def stats(self) -> dict:
        """The underlying dataset's counters (rows, skips, features cached/computed; summed over processes)."""
        return self.dataset.stats

    def prefetch(self, **options: Any) -> Any:
        """Download every image concurrently first (see :meth:`LaionAestheticsDataset.prefetch`)."""
        return self.dataset.prefetch(**options)

    def __repr__(self) -> str:
        return (f"LaionAestheticsPyDataset({len(self.order)} samples, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, workers={self.workers}, use_multiprocessing={self.use_multiprocessing})")


#: the guide's name
LAIONAestheticsDataGenerator = LaionAestheticsPyDataset


def _resolve(source: Any, img_dir: Optional[str], extractor: Any, limit: Optional[int],
             options: dict) -> Tuple[LaionAestheticsDataset, Sequence[int]]:
    subset_of = getattr(source, "dataset", None)
    if isinstance(source, LaionAestheticsDataset) or isinstance(subset_of, LaionAestheticsDataset):
        if img_dir is not None or extractor is not None or limit is not None or options:
            raise ValueError("pass dataset options when building from a labels file, not with a dataset")
        if isinstance(source, LaionAestheticsDataset):
            return source, range(len(source))
        return subset_of, list(source.indices)
    if img_dir is None:
        raise ValueError("img_dir is required when source is a labels file")
    dataset = LaionAestheticsDataset(source, img_dir, extractor, limit, **options)
    return dataset, range(len(dataset))


_SET_UP_PID: Optional[int] = None


def _worker_setup() -> None:
    """Once per worker process: torch single-threaded, as in DataLoader workers.

    A child forked from a thread that ran torch's OpenMP thread pool hangs in its first parallel op (libgomp's pool
    does not survive fork); with one thread no parallel region starts. Also spares the cores from oversubscription.
    """
    global _SET_UP_PID
    if _SET_UP_PID == os.getpid():
        return
    _SET_UP_PID = os.getpid()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _store_downloads(timeout: float = 60.0) -> None:
    """Finish storing this process's fresh downloads in the cache before handing the batch back.

    The cache renames a download into place off the reader's path; Keras's process pool is dropped at the end of
    each epoch and terminates its workers, which would lose those pending renames (and download again next epoch).
    """
    from streamloader.cache.commit_queue import QUEUE

    if not QUEUE.drain(timeout):
        log.warning("cache writes still pending after %.0f s in a Keras worker process", timeout)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif not isinstance(value, np.ndarray):
        value = keras.ops.convert_to_numpy(value)  # a backend tensor from a Keras-model extractor
    return np.asarray(value, dtype=np.float32).reshape(-1)
