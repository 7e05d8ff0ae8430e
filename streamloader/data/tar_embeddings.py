"""(image, embedding) pairs from webdataset ``.tar`` shards and ``.npy`` embeddings: the DALLE2 decoder's loader.

Drop-in for ``dalle2_pytorch.dataloaders`` (both its original and its later parameter names are accepted)::

    loader = create_image_embedding_dataloader(
        tar_url="/data/{0000..0009}.tar", embeddings_url="/data/img_emb", shard_width=4,
        num_workers=4, batch_size=32, shuffle_num=200)
    for img, emb in loader:      # [32, 3, H, W] float in [0, 1], [32, 512]
        ...

Every sample is read exactly once per epoch across ``torch.distributed`` ranks and DataLoader workers (shards
are dealt out by rank, then by worker), shuffles are seeded by ``seed`` and the epoch (``set_epoch``), and
skips are counted in ``dataset.stats``.
"""
from __future__ import annotations

import logging
import os
import random
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from streamloader.data.counters import SharedCounters
from streamloader.data.embeddings import EmbeddingFolder, ShardEmbeddings, npy_from_bytes, parse_key
from streamloader.data.images import image_to_tensor
from streamloader.data.tars import (
    DEFAULT_MAX_MEMBER_BYTES,
    SKIP_REASONS,
    ErrorPolicy,
    Handler,
    expand_urls,
    raise_on_error,
)
from streamloader.data.tar_samples import IMAGE_EXTS, SKIP_SHARD, decode_extra, open_image
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["ImageEmbeddingDataset", "create_image_embedding_dataloader", "distributed_context"]


def distributed_context(fallback: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """``(rank, world_size)`` from an initialized ``torch.distributed``, else ``fallback``, else env, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if fallback is not None:
        return fallback
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ImageEmbeddingDataset(IterableDataset):
    """Iterable of ``(image, embedding, *extra_keys)`` read from webdataset tars plus in-tar or external ``.npy``.

    ``image`` is a float tensor ``[3, H, W]`` unless ``img_preproc`` is given (it receives the RGB PIL image).
    ``embedding`` is a tensor ``[D]``; with the later DALLE2 names (``img_embedding_folder_url`` /
    ``text_embedding_folder_url``) it is a dict ``{"img": [D], "text": [D]}`` as that version returns.
    ``extra_keys`` may name any extension (decoded by type: txt -> str, json -> object, images -> tensor) or
    ``__key__`` / ``__url__``.

    Keyword-only extras: ``shuffle_num`` (sample shuffle buffer), ``seed`` (with :meth:`set_epoch`, fixes every
    order), ``epoch_length`` (samples per epoch on this rank; required to end a ``resample=True`` epoch),
    ``embedding_dim`` (checked on every embedding), ``cache_dir`` (disk cache for remote shards), and
    ``rank``/``world_size`` (else from torch.distributed, else ``RANK``/``WORLD_SIZE``, else 0/1), and
    ``max_member_bytes`` (the largest tar member read into memory, default 64 MiB, None for no limit: a larger one
    goes to ``handler``, which raises or skips its sample, counted as ``oversized_member``).
    Example::

        ds = ImageEmbeddingDataset("/data/{0000..0009}.tar", embedding_folder_url="/data/img_emb", shard_width=4)
        loader = DataLoader(ds, batch_size=32, num_workers=2)
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        embedding_folder_url: Optional[str] = None,
        shard_width: Optional[int] = None,
        img_preproc: Optional[Callable[[Any], Any]] = None,
        extra_keys: Sequence[str] = (),
        handler: Handler = raise_on_error,
        resample: bool = False,
        shuffle_shards: bool = True,
        *,
        index_width: Optional[int] = None,
        img_embedding_folder_url: Optional[str] = None,
        text_embedding_folder_url: Optional[str] = None,
        shuffle_num: Optional[int] = None,
        seed: int = 0,
        epoch_length: Optional[int] = None,
        embedding_dim: Optional[int] = None,
        cache_dir: Optional[str] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        if max_member_bytes is not None and (
            isinstance(max_member_bytes, bool) or not isinstance(max_member_bytes, int) or max_member_bytes <= 0
        ):
            raise ValueError(f"max_member_bytes must be a positive integer or None; got {max_member_bytes!r}")
        self.max_member_bytes = max_member_bytes
        if embedding_folder_url is not None and img_embedding_folder_url is not None:
            raise ValueError("pass embedding_folder_url or img_embedding_folder_url, not both")
        self.urls = expand_urls(urls)
        later_api = img_embedding_folder_url is not None or text_embedding_folder_url is not None
        self.emb_as_dict = later_api
        img_url = embedding_folder_url if embedding_folder_url is not None else img_embedding_folder_url
        self.img_folder = EmbeddingFolder(img_url, prefix=None) if img_url is not None else None
        self.text_folder = (
            EmbeddingFolder(text_embedding_folder_url, prefix=None) if text_embedding_folder_url is not None else None
        )
        self.shard_width, self.index_width = shard_width, index_width
        self.img_preproc = img_preproc
        self.extra_keys = tuple(extra_keys)
        self.handler = handler
        self.resample = resample
        self.shuffle_shards = shuffle_shards
        self.shuffle_num = int(shuffle_num) if shuffle_num else 0
        self.seed = seed
        if epoch_length is not None and epoch_length <= 0:
            raise ValueError("epoch_length must be positive")
        self.epoch_length = epoch_length
        self.embedding_dim = embedding_dim
        self._dims: Dict[str, int] = {}  # without embedding_dim: the dimension first read, per kind (see _check_sample)
        self.cache_dir = cache_dir
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self._explicit_dist = (rank, world_size) if rank is not None else None
        self._parent_dist: Optional[Tuple[int, int]] = None
        self._counters = SharedCounters(SKIP_REASONS)
        self._epoch = SharedCounters(("epoch",))
        self._io = SharedCounters(("shards_opened", "members_read"))
        self._pass: Any = None  # this process's current pass (ReaderPass), whose position state_dict() reports
        self._resume: Optional[Dict[str, Any]] = None  # a loaded state the next pass starts from
        if resample and shuffle_shards:
            log.debug("resample=True draws shards at random; shuffle_shards is ignored")

    # --- public knobs -------------------------------------------------------------------------------------------
    @property
    def stats(self) -> Dict[str, int]:
        """Skip counts by reason, summed over all DataLoader workers (see ``streamloader.data.tars.SKIP_REASONS``)."""
        return self._counters.as_dict()

    def reset_stats(self) -> None:
        """Zero the skip counters."""
        self._counters.reset()

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s seeded shard/sample order from the next iteration on (reaches persistent workers)."""
        self._epoch.set("epoch", int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch` (0 by default)."""
        return self._epoch.get("epoch")

    def shuffle(self, size: int) -> "ImageEmbeddingDataset":
        """Set the sample shuffle buffer size (webdataset's fluid ``.shuffle(n)``); returns self."""
        self.shuffle_num = int(size)
        return self

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("ImageEmbeddingDataset has no length unless epoch_length is set")
        return self.epoch_length

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        # Pickled here = being sent to spawned workers, where torch.distributed is not initialized: carry ours.
        state["_parent_dist"] = self._explicit_dist or distributed_context()
        state["_pass"] = None
        return state

    # --- iteration -----------------------------------------------------------------------------------------------
    def _slot(self) -> Tuple[int, int, int, int]:
        rank, world = self._explicit_dist or distributed_context(self._parent_dist)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def _shard_order(self, slot: int, slots: int, epoch: int) -> Iterator[str]:
        n = len(self.urls)
        if self.resample:
            rng = random.Random(f"{self.seed}:{epoch}:{slot}:resample")
            while True:
                yield self.urls[rng.randrange(n)]
        order = list(range(n))
        if self.shuffle_shards:
            # Same seed on every rank and worker, so the deal below partitions the shards.
            random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)
        if n < slots and slot == 0:
            message = (
                f"only {n} shard(s) for {slots} readers (ranks x DataLoader workers): "
                f"{slots - n} reader(s) will get no data; use fewer workers or more shards"
            )
            log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
        for i in order[slot::slots]:
            yield self.urls[i]

    def _embedding(
        self, sample: Dict[str, Any], lookups: Dict[str, ShardEmbeddings], policy: ErrorPolicy
    ) -> Any:
        """The sample's embedding(s), None to skip the sample, or SKIP_SHARD to drop the rest of the shard."""
        url, key = sample["__url__"], sample["__key__"]
        found: Dict[str, np.ndarray] = {}
        if lookups:
            try:
                shard, index = parse_key(key, url, self.shard_width, self.index_width)
            except DataFormatError as exc:
                return None if policy.skip("bad_key", exc) else SKIP_SHARD
            for name, lookup in lookups.items():
                try:
                    rows = lookup.rows_for(shard)
                except FileNotFoundError as exc:
                    policy.skip("missing_embedding_file", exc)
                    return SKIP_SHARD
                except DataFormatError as exc:  # the whole file is unusable: count it once, drop the shard
                    policy.skip("bad_embedding", exc)
                    return SKIP_SHARD
                try:
                    found[name] = rows.row(index)
                except DataFormatError as exc:
                    return None if policy.skip("bad_embedding", exc) else SKIP_SHARD
        elif "npy" in sample:
            try:
                found["img"] = npy_from_bytes(sample["npy"], f"{url}:{key}.npy")
            except DataFormatError as exc:
                return None if policy.skip("bad_embedding", exc) else SKIP_SHARD
        else:
            exc = DataFormatError(f"{url}: sample {key!r} has no .npy embedding; did you set embedding_folder_url?")
            return None if policy.skip("incomplete_sample", exc) else SKIP_SHARD
        for name, vector in found.items():
            # without embedding_dim, the first embedding this reader sees sets it (per kind): one of another length
            # would only break the batch it lands in, later and less clearly
            expected = self.embedding_dim or self._dims.setdefault(name, int(vector.shape[-1]))
            if vector.shape[-1] != expected:
                exc = DataFormatError(
                    f"{url}: sample {key!r} {name} embedding has dimension {vector.shape[-1]}, expected {expected}"
                    + ("" if self.embedding_dim else " (the dimension of the first one read; set embedding_dim=)")
                )
                return None if policy.skip("bad_embedding", exc) else SKIP_SHARD
            if not np.any(vector):
                policy.always_skip("missing_embedding", f"{url}: sample {key!r} has an all-zero {name} embedding")
                return None
        return found

    def _lookups(self) -> Dict[str, ShardEmbeddings]:
        """Per-pass readers of the external embedding folders (close them when done)."""
        lookups: Dict[str, ShardEmbeddings] = {}
        if self.img_folder is not None:
            lookups["img"] = ShardEmbeddings(self.img_folder, self.embedding_dim)
        if self.text_folder is not None:
            lookups["text"] = ShardEmbeddings(self.text_folder)
        return lookups

    def _check_sample(
        self, sample: Dict[str, Any], lookups: Dict[str, ShardEmbeddings], policy: ErrorPolicy
    ) -> Any:
        """``(key, url, image bytes, embeddings, extras)`` for a good raw sample, None to skip it, or SKIP_SHARD
        to drop the rest of its shard (also when a handler said "stop")."""
        found = self._embedding(sample, lookups, policy)
        if found is SKIP_SHARD or policy.stopped:
            return SKIP_SHARD
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        missing = [k for k in self.extra_keys if k not in sample]
        if found is not None and (image_ext is None or missing):
            what = "an image" if image_ext is None else f"extra key(s) {missing}"
            exc = DataFormatError(f"{sample['__url__']}: sample {sample['__key__']!r} has no {what}")
            return None if policy.skip("incomplete_sample", exc) else SKIP_SHARD
        if found is None:
            return None
        extras = {k: sample[k] for k in self.extra_keys}
        return sample["__key__"], sample["__url__"], sample[image_ext], found, extras

    def _decoded(self, raw: Iterator[Tuple[Any, ...]], policy: ErrorPolicy) -> Iterator[Tuple[Any, ...]]:
        for key, url, image_bytes, found, extras, *_ref in raw:
            try:
                image = open_image(image_bytes)
                if self.img_preproc is not None:
                    image = self.img_preproc(image if image.mode == "RGB" else image.convert("RGB"))
                else:
                    image = image_to_tensor(image)
                extra_values = [decode_extra(k, v) for k, v in extras.items()]
            except Exception as exc:  # noqa: BLE001 - any decode/preproc failure goes to the handler
                wrapped = DataFormatError(f"{url}: sample {key!r} could not be decoded ({exc!r})")
                wrapped.__cause__ = exc
                if not policy.skip("decode_error", wrapped):
                    return
                continue
            tensors = {name: torch.from_numpy(vector) for name, vector in found.items()}
            emb = tensors if self.emb_as_dict else tensors["img"]
            yield (image, emb, *extra_values)

    def __iter__(self) -> Iterator[Tuple[Any, ...]]:
        from streamloader.data.resume import ReaderPass

        rank, world, worker, workers = self._slot()
        resume, self._resume = self._resume, None
        self._pass = ReaderPass(self, rank, world, worker, workers, self.epoch, resume)
        return iter(self._pass)

    # --- mid-epoch resume (torchdata's Stateful protocol; see streamloader.data.resume) ----------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Where this reader (this process or DataLoader worker) stands in its epoch; JSON-serializable.

        ``StatefulDataLoader`` (torchdata) calls it in every worker after each batch and hands it back through
        :meth:`load_state_dict`, so a restarted job finishes the interrupted epoch: it starts at the right shard
        and member and reads nothing it delivered before. Works without torchdata at ``num_workers=0``.
        """
        from streamloader.data.resume import STATE_VERSION

        live = self._pass.state() if self._pass is not None else self._resume
        return {"version": STATE_VERSION, "epoch": self.epoch if live is None else live["epoch"], "pass": live}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Make the next iteration resume from ``state`` (from :meth:`state_dict`; checked against this reader)."""
        from streamloader.data.resume import check_state

        self._resume = check_state(self, state)
        self._pass = None

    @property
    def io_stats(self) -> Dict[str, int]:
        """Shards opened and tar members of samples read, summed over all DataLoader workers."""
        return self._io.as_dict()


def create_image_embedding_dataloader(
    tar_url: Union[str, Sequence[str]],
    embeddings_url: Optional[str] = None,
    num_workers: int = 4,
    batch_size: int = 32,
    shard_width: Optional[int] = None,
    shuffle_num: Optional[int] = None,
    shuffle_shards: bool = True,
    resample_shards: bool = False,
    img_preproc: Optional[Callable[[Any], Any]] = None,
    extra_keys: Sequence[str] = (),
    handler: Handler = raise_on_error,
    *,
    img_embeddings_url: Optional[str] = None,
    text_embeddings_url: Optional[str] = None,
    index_width: Optional[int] = None,
    seed: int = 0,
    epoch_length: Optional[int] = None,
    embedding_dim: Optional[int] = None,
    cache_dir: Optional[str] = None,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """Build an :class:`ImageEmbeddingDataset` and wrap it in a ``DataLoader`` (DALLE2-pytorch's one-call helper).

    Example::

        loader = create_image_embedding_dataloader("/data/{0000..0009}.tar", "/data/img_emb", shard_width=4)
    """
    if not isinstance(embeddings_url, (str, os.PathLike, type(None))):
        raise TypeError(
            "embeddings_url must be a URL; this signature is (tar_url, embeddings_url, num_workers, batch_size, ...)"
            " - pass num_workers/batch_size by keyword"
        )
    if embeddings_url is not None and img_embeddings_url is not None:
        raise ValueError("pass embeddings_url or img_embeddings_url, not both")
    dataset = ImageEmbeddingDataset(
        tar_url,
        embedding_folder_url=None if embeddings_url is None else str(embeddings_url),
        shard_width=shard_width,
        img_preproc=img_preproc,
        extra_keys=extra_keys,
        handler=handler,
        resample=resample_shards,
        shuffle_shards=shuffle_shards,
        index_width=index_width,
        img_embedding_folder_url=img_embeddings_url,
        text_embedding_folder_url=text_embeddings_url,
        shuffle_num=shuffle_num,
        seed=seed,
        epoch_length=epoch_length,
        embedding_dim=embedding_dim,
        cache_dir=cache_dir,
        max_member_bytes=max_member_bytes,
    )
    rank, world = distributed_context()
    readers = max(1, num_workers) * world
    if not resample_shards and len(dataset.urls) < readers:
        warnings.warn(
            f"only {len(dataset.urls)} shard(s) for {readers} readers ({world} rank(s) x {max(1, num_workers)} "
            "worker(s)): some readers will get no data",
            UserWarning,
            stacklevel=2,
        )
    options: Dict[str, Any] = {"pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        options["prefetch_factor"] = 2  # keeps the next shard's embedding file opening off the critical path
    options.update(dataloader_kwargs)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, **options)
