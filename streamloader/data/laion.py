"""``LaionAestheticsDataset``: the DagsHub guide's LAIONAestheticsDataset, filtered, cached and safe with workers.

The guide's four positional arguments keep their meaning; everything else is a keyword::

    ds = LaionAestheticsDataset("data/labels.tsv", "data")                       # plain paths (hooks stream them)
    ds = LaionAestheticsDataset("dagshub://owner/repo/data/labels.tsv", "dagshub://owner/repo/data",
                                tiny_cnn_extractor(), limit=500, keywords="squirrel",
                                storage_options={"branch": "main"})
    ds.prefetch()                      # warm every image concurrently (progress bar)
    feature, score = ds[0]             # score: float32 tensor of shape [1], like the guide

Items: without an extractor, ``(image, score)`` with the image a float tensor ``[3, H, W]`` in [0, 1] (or
``transform(pil_image)``); with one, ``(features, score)``. Features come from the on-disk feature cache keyed by
(image content, extractor fingerprint), so a second epoch or a new process reads them without the network or the
model (:mod:`streamloader.data.feature_cache`). An extractor without a ``fingerprint`` (e.g. the guide's own class
with only ``.extract(path)``) gets the guide's per-process in-memory cache instead.

Rows: ``labels.tsv`` (path, URL, or an iterable of LabelRow such as ``filter_labels(...).rows``) filtered by
:class:`~streamloader.data.filters.LabelFilter` (keywords, match, exclude, whole_word, regex, min/max score,
sample), passed as ``label_filter=`` or built from those keywords; ``limit`` keeps the first N selected rows
(without filters: the first N rows, as in the guide).

Errors (``on_error``): malformed rows, including NaN scores, follow the label reader's policy. A missing or
undecodable image: ``"raise"`` raises (FileNotFoundError / DataFormatError naming the file); ``"skip"`` (and
``"warn"``, which also logs) serves the next readable item in index order instead, so default batches stay full
and valid, and counts the skip in ``stats`` (summed over DataLoader workers). A bad item is counted when its own
index is requested, not each time it is passed over for another one: once per epoch for any sampler that visits
every index once, whatever the number of workers. It is re-read only by a new process. Network and authentication
errors always raise.
"""
from __future__ import annotations

import hashlib
import logging
import math
import operator
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Pattern, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from streamloader._realos import exists_locally
from streamloader.data.feature_cache import FeatureCache, content_identity, default_feature_dir
from streamloader.data.filters import FilterResult, Keywords, LabelFilter, as_label_filter, filter_labels
from streamloader.data.counters import SharedCounters
from streamloader.data.images import decode_image, image_to_tensor, join_path, read_image_bytes, url_filesystem
from streamloader.data.labels import ON_ERROR_POLICIES, LabelRow, file_name_problem
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["LaionAestheticsDataset", "LAIONAestheticsDataset", "COUNTERS"]

#: keys of the per-dataset counters in ``stats`` (summed over DataLoader workers)
COUNTERS = ("missing_image", "decode_error", "features_cached", "features_computed")
_WARN_LIMIT = 10
# Bad data, as opposed to network/auth failures (RemoteError, AuthenticationError), which always propagate.
_BAD_ITEM = (FileNotFoundError, IsADirectoryError, NotADirectoryError, DataFormatError)


class LaionAestheticsDataset(Dataset):
    """Map-style dataset of ``(image or features, score)`` for a LAION-style labels.tsv and its image folder.

    The DagsHub guide's ``LAIONAestheticsDataset(annotations_file, img_dir, feature_extractor, limit)``, with
    filters, a feature cache and safe DataLoader workers::

        ds = LaionAestheticsDataset("data/labels.tsv", "data", tiny_cnn_extractor(), keywords="squirrel")
        features, score = ds[0]          # score: float32 tensor of shape [1]

    Args:
        annotations_file: labels.tsv as a path (hooked paths stream), a URL (``dagshub://owner/repo/...``), an
            iterable of LabelRow, or a FilterResult.
        img_dir: folder (path or URL) the rows' file names are relative to.
        feature_extractor: None → items are ``(image [3, H, W] float in [0, 1], score)``; a FeatureExtractor
            (or the guide's class with ``.extract(path)``) → ``(features, score)``, cached on disk by content and
            extractor fingerprint.
        limit: keep the first N selected rows (without filters: the first N rows, as in the guide).
        label_filter: the rows to keep, as one :class:`~streamloader.data.filters.LabelFilter` value; or build it
            from these keywords (not both):
        keywords, match ("any"/"all"), exclude, whole_word, regex, min_score, max_score: row filters, all of
            which must hold (see LabelFilter); sample, seed: keep a deterministic fraction of the matches.
        transform: ``transform(pil_image)`` instead of the default tensor conversion (images only).
        on_error: malformed rows follow the label reader's policy; a missing or undecodable image raises with
            "raise", or is replaced by the next readable item (and counted in ``stats``) with "skip"/"warn".
        cache_dir: cache root for images fetched by URL and for features (default: the streamloader cache).
        storage_options: fsspec options for URLs (``branch``, ``host``, ``token``, ...).
        cache_features: False computes features every time.

    Also: ``prefetch()`` warms every image (``wait=False``: in the background), ``files``/``scores``, ``stats``.
    Network and authentication errors always raise. The module docstring has the details.
    """

    def __init__(
        self,
        annotations_file: Union[str, Iterable[LabelRow], FilterResult],
        img_dir: str,
        feature_extractor: Any = None,
        limit: Optional[int] = None,
        *,
        label_filter: Optional[LabelFilter] = None,
        keywords: Keywords = None,
        match: str = "any",
        exclude: Keywords = None,
        whole_word: bool = False,
        regex: Union[str, Pattern[str], None] = None,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
        sample: Optional[float] = None,
        seed: int = 0,
        transform: Optional[Callable[[Any], Any]] = None,
        on_error: str = "raise",
        cache_dir: Optional[str] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        cache_features: bool = True,
    ):
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_POLICIES)}; got {on_error!r}")
        if transform is not None and feature_extractor is not None:
            raise ValueError("transform applies to images; with a feature_extractor its own preprocess is used")
        self.img_dir = str(img_dir)
        self.feature_extractor = feature_extractor
        self.transform = transform
        self.on_error = on_error
        self.cache_dir = cache_dir
        self.storage_options: Dict[str, Any] = dict(storage_options or {})
        if cache_dir and "cache_dir" not in self.storage_options and self.img_dir.startswith("dagshub://"):
            self.storage_options["cache_dir"] = cache_dir  # images and features under one root
        self.label_filter: LabelFilter = as_label_filter(
            label_filter, keywords=keywords, match=match, exclude=exclude, whole_word=whole_word, regex=regex,
            min_score=min_score, max_score=max_score, limit=limit, sample=sample, seed=seed,
        )
        self.filter_result = self._select(annotations_file)
        self.rows: List[LabelRow] = self.filter_result.rows
        self.paths: List[str] = [join_path(self.img_dir, row.file) for row in self.rows]
        self.feature_cache: Optional[FeatureCache] = None
        if feature_extractor is not None and cache_features and getattr(feature_extractor, "fingerprint", None):
            describe = getattr(feature_extractor, "describe", None)
            self.feature_cache = FeatureCache(default_feature_dir(cache_dir), feature_extractor.fingerprint,
                                              describe() if callable(describe) else None)
        self._counters = SharedCounters(COUNTERS)
        self._fs: Any = None
        self._bad: Dict[int, str] = {}  # per process: items known to be unreadable -> reason
        self._memory: Dict[int, torch.Tensor] = {}  # per process: the guide's in-memory embeddings
        self._warned = 0

    # -- rows ---------------------------------------------------------------------------------------------------
    def _select(self, source: Any) -> FilterResult:
        if isinstance(source, FilterResult):
            source = source.rows
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") or hasattr(source, "read"):
            so = dict(self.storage_options)
            if self.cache_dir and "cache_dir" not in so and str(source).startswith("dagshub://"):
                so["cache_dir"] = self.cache_dir
            return filter_labels(source, label_filter=self.label_filter, on_error=self.on_error, storage_options=so)
        rows, bad = self._checked_rows(source)
        result = filter_labels(rows, label_filter=self.label_filter)
        if bad:
            result.skipped += sum(bad.values())
            result.scanned += sum(bad.values())
            result.reasons.update(bad)
        return result

    def _checked_rows(self, rows: Iterable[LabelRow]) -> Tuple[List[LabelRow], Counter]:
        """In-memory rows get the reader's checks: an unsafe file name (absolute, ``..``, control characters) or a
        NaN/infinite score follows ``on_error``, so no row can point outside ``img_dir``."""
        good: List[LabelRow] = []
        bad: Counter = Counter()
        for number, row in enumerate(rows, 1):
            problem = file_name_problem(row.file) if isinstance(row.file, str) else "file name is not a string"
            if problem is None and (isinstance(row.score, bool) or not isinstance(row.score, (int, float))
                                    or not math.isfinite(row.score)):
                problem = "non-finite score"
            if problem is None:
                good.append(row)
                continue
            message = f"row {number} ({row.file!r}, score {row.score!r}): {problem}"
            if self.on_error == "raise":
                raise DataFormatError(message)
            if self.on_error == "warn":
                log.warning("skipped %s", message)
            bad[problem] += 1
        return good, bad

    # -- dataset protocol ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        mode = "features" if self.feature_extractor is not None else "images"
        return f"LaionAestheticsDataset({len(self)} rows, img_dir={self.img_dir!r}, {mode}, on_error={self.on_error!r})"

    @property
    def files(self) -> List[str]:
        """Image file names (relative to ``img_dir``), in item order."""
        return [row.file for row in self.rows]

    img_files = files  # the guide's attribute name

    @property
    def img_path(self) -> str:
        """The guide's name for ``img_dir``."""
        return self.img_dir

    @property
    def scores(self) -> List[float]:
        """Aesthetic scores, in item order."""
        return [row.score for row in self.rows]

    def __getitem__(self, idx: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(self.rows)
        if type(idx) is not int or not 0 <= idx < n:
            idx = self._normalize_index(idx, n)
        for step in range(n):
            j = idx + step if idx + step < n else idx + step - n
            reason = self._bad.get(j) if self._bad else None
            if reason is None:
                try:
                    return self._item(j)
                except _BAD_ITEM as exc:
                    if self.on_error == "raise":
                        raise
                    reason = "missing_image" if isinstance(exc, OSError) else "decode_error"
                    self._bad[j] = reason
                    self._log_skip(j, exc)
            if step == 0:
                # Only the requested item is counted: the sampler requests each index once per epoch, in whichever
                # worker, so a bad item passed over here is counted when its own turn comes.
                self._counters.add(reason)
        raise DataFormatError(f"none of the {n} images of {self!r} could be read (see dataset.stats)")

    @staticmethod
    def _normalize_index(idx: Any, n: int) -> int:
        if torch.is_tensor(idx):
            idx = idx.tolist()
        if isinstance(idx, bool):
            raise TypeError(f"dataset index must be an integer; got {idx!r}")
        try:
            idx = operator.index(idx)  # int, numpy integers
        except TypeError:
            raise TypeError(f"dataset index must be an integer; got {idx!r}") from None
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for a dataset of {n} items")
        return idx % n

    def _log_skip(self, j: int, exc: BaseException) -> None:
        self._warned += 1
        if self.on_error == "warn" and self._warned <= _WARN_LIMIT:
            log.warning("skipping item %d (%s): %s", j, self.paths[j], exc)
        else:
            log.debug("skipping item %d (%s): %s", j, self.paths[j], exc)

    def _item(self, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # from_numpy is ~40 µs cheaper per item than torch.full (no dispatcher/allocator round trip)
        score = torch.from_numpy(np.array([self.rows[j].score], dtype=np.float32))
        cache = self.feature_cache
        if cache is not None:  # the hot path of every epoch after the first
            identity = content_identity(self.paths[j], self.filesystem)
            vector = cache.get(identity)
            if vector is not None:
                self._counters.add("features_cached")
                return torch.from_numpy(vector), score
            embedding = self.feature_extractor.extract_image(self.load_image(j))
            cache.put(identity, embedding.numpy())
            self._counters.add("features_computed")
            return embedding, score
        extractor = self.feature_extractor
        if extractor is None:
            image = self.load_image(j)
            return (self.transform(image) if self.transform is not None else image_to_tensor(image)), score
        embedding = self._memory.get(j)  # the guide's behaviour: compute once per process, keep in memory
        if embedding is None:
            if hasattr(extractor, "extract_image"):
                embedding = extractor.extract_image(self.load_image(j))
            else:
                embedding = extractor.extract(self.paths[j])
            self._memory[j] = embedding
        return embedding, score

    def load_image(self, j: int) -> Any:
        """The decoded RGB PIL image of item ``j`` (no skipping: errors raise)."""
        return decode_image(read_image_bytes(self.paths[j], self.filesystem), self.paths[j])

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem of ``img_dir`` when it is a URL (made once per process), else None."""
        if self._fs is None and "://" in self.img_dir:
            self._fs = url_filesystem(self.img_dir, self.storage_options)
        return self._fs

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs=None, _bad={}, _memory={}, _warned=0)  # per-process state; counters stay shared
        return state

    # -- stats ------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> Dict[str, Any]:
        """Row selection counts plus image/feature counters summed over all DataLoader workers.

        Keys: rows, scanned, matched, malformed_rows, malformed_reasons, missing_image, decode_error, skipped
        (= missing_image + decode_error), features_cached, features_computed.
        """
        counters = self._counters.as_dict()
        result = self.filter_result
        return {
            "rows": len(self.rows), "scanned": result.scanned, "matched": result.matched,
            "malformed_rows": result.skipped, "malformed_reasons": dict(result.reasons),
            **counters, "skipped": counters["missing_image"] + counters["decode_error"],
        }

    def reset_stats(self) -> None:
        """Zero the image/feature counters (the row selection counts stay)."""
        self._counters.reset()

    # -- warm-up ----------------------------------------------------------------------------------------------
    def prefetch(self, max_concurrency: Optional[int] = None, progress: bool = True, on_error: Optional[str] = None,
                 skip_cached_features: bool = True, processes: Optional[int] = None, wait: bool = True) -> Any:
        """Download every image of the dataset concurrently into the cache, with a progress bar.

        ``dagshub://`` images go through the filesystem's prefetch; plain paths that are not on local disk
        through :func:`streamloader.prefetch` (hooks); local files need nothing. Images whose features are already
        cached are left out (``skip_cached_features``). ``on_error`` defaults to "raise" when the dataset's
        policy is "raise", else "skip". ``processes``: download worker processes (None = automatic, see
        :meth:`RemoteRepo.prefetch`). Returns a PrefetchResult; with ``wait=False`` a PrefetchJob at once, while
        the downloads go on in the background and the epoch can start (items not fetched yet are fetched by
        ``__getitem__``, each file once)::

            job = dataset.prefetch(wait=False)
            for images, scores in DataLoader(dataset, batch_size=64):
                ...
            job.result()
        """
        from streamloader.remote.prefetch import PrefetchJob, PrefetchResult, settle

        on_error = on_error or ("raise" if self.on_error == "raise" else "skip")

        def nothing() -> Any:
            return settle(PrefetchJob.finished(PrefetchResult(), on_error), wait)

        paths = self.paths
        if skip_cached_features and self.feature_cache is not None:
            paths = [p for p in paths if not self._features_cached(p)]
        if not paths:
            return nothing()
        fs = self.filesystem
        if fs is not None:
            if not hasattr(fs, "prefetch"):
                log.info("prefetch: %s has no cache to warm; nothing to do", type(fs).__name__)
                return nothing()
            return fs.prefetch(paths, max_concurrency=max_concurrency, progress=progress, on_error=on_error,
                               processes=processes, wait=wait)
        remote = [p for p in paths if not exists_locally(p)]
        if not remote:
            return nothing()
        from streamloader.hooks.warmup import prefetch  # the hooks' prefetch (imported only when needed)

        return prefetch(remote, max_concurrency=max_concurrency, progress=progress, on_error=on_error,
                        processes=processes, wait=wait)

    def _features_cached(self, path: str) -> bool:
        try:
            identity = content_identity(path, self.filesystem, read_bytes=False)
        except _BAD_ITEM:
            return False
        return identity is not None and identity in self.feature_cache  # type: ignore[operator]

    # -- mid-epoch resume (torchdata's Stateful protocol) ------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What this process (or DataLoader worker) learned that a resumed run should not pay for again.

        The position in the epoch is the sampler's: torchdata's ``StatefulDataLoader`` saves its (stateful)
        ``RandomSampler`` / ``StatefulDistributedSampler``, so a resumed epoch fetches only the items not yet
        delivered. This state adds the items found unreadable (``on_error="skip"``/``"warn"``), so they are neither
        requested nor reported again. JSON-serializable.
        """
        return {"version": 1, "rows": len(self.rows), "selection": self._selection(),
                "bad": {str(j): reason for j, reason in self._bad.items()}}

    def _selection(self) -> str:
        """A digest of the selected rows (file names and scores, in order), made once: what a state is for."""
        digest = getattr(self, "_selection_digest", None)
        if digest is None:
            hasher = hashlib.sha256()
            for row in self.rows:
                hasher.update(f"{row.file}\t{row.score!r}\n".encode("utf-8", "surrogatepass"))
            digest = self._selection_digest = hasher.hexdigest()[:32]
        return digest

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state of the same rows; another selection, or a malformed state, raises
        ValueError: item numbers of other rows would name other images)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"not a LaionAestheticsDataset state: {str(state)[:80]!r}")
        if state.get("rows") != len(self.rows):
            raise ValueError(f"cannot resume: the state is for {state.get('rows')} rows, this dataset has {len(self)}")
        selection = state.get("selection")
        if selection is not None and selection != self._selection():
            raise ValueError("cannot resume: the state is for other rows (the labels file or the filter changed "
                             "since it was saved)")
        bad: Dict[int, str] = {}
        for j, reason in dict(state.get("bad") or {}).items():
            index = int(j) if str(j).isdigit() else -1
            if not 0 <= index < len(self.rows) or reason not in ("missing_image", "decode_error"):
                raise ValueError(f"cannot resume: a malformed entry in the state ({str(j)[:20]!r}: "
                                 f"{str(reason)[:40]!r})")
            bad[index] = reason
        self._bad.update(bad)


#: the guide's spelling
LAIONAestheticsDataset = LaionAestheticsDataset
