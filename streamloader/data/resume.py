"""Mid-epoch resume for the tar-shard loader: one reader's pass over an epoch, as a cursor ``state_dict()`` captures.

A reader is one (rank, DataLoader worker) slot of :class:`.tar_embeddings.ImageEmbeddingDataset`. Its pass is:
its shards in the epoch's seeded order -> the samples of each shard -> the shuffle buffer -> decode ->
yield. After any yielded sample the pass's state is small (no sample bytes) and exact:

    shard, offset    the position in this reader's shard sequence, and the tar offset where unread members start
    buffer           the shuffle buffer as references (shard, key, member offsets and sizes)
    rng              the shuffle RNG's state; draining: the buffer is being emptied at the end of the epoch
    yielded, skips   samples yielded so far (for ``epoch_length``) and skips by reason (restored into ``stats``)
    shards           the content identity of the shards the state points into (the current one, the buffer's):
                     a shard rewritten since (another order of members, other members) refuses the resume, where
                     reading at the saved offsets would pair images with other embeddings

A resumed pass opens the shard at ``shard``, seeks to ``offset`` (a compressed tar is read through without
extracting the members before it), reads back only the buffered samples, and continues with the same RNG, so
the rest of the epoch comes out in the order an uninterrupted pass would have produced, and nothing delivered
before the interruption is read again. torchdata's ``StatefulDataLoader`` collects these states per worker::

    loader = StatefulDataLoader(dataset, batch_size=32, num_workers=4)
    ...; torch.save({"loader": loader.state_dict(), ...}, "ckpt.pt")       # after any batch
    loader.load_state_dict(torch.load("ckpt.pt")["loader"])               # new process: same workers/ranks
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from contextlib import closing
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from streamloader.data.feature_cache import content_identity
from streamloader.data.tar_samples import SKIP_SHARD
from streamloader.data.tars import ErrorPolicy, is_compressed, iter_shard_samples, iter_tar_entries, open_url
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = ["STATE_VERSION", "ReaderPass", "check_state", "read_samples_at"]

STATE_VERSION = 1
# the constructor arguments that decide which samples a reader gets and in what order
_ORDER_OPTIONS = ("seed", "shuffle_num", "shuffle_shards", "resample", "epoch_length")


def _config(dataset: Any) -> Dict[str, Any]:
    urls = hashlib.sha256(json.dumps(dataset.urls).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {"urls": urls, **{name: getattr(dataset, name) for name in _ORDER_OPTIONS}}


def check_state(dataset: Any, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The pass state inside a dataset ``state_dict()``, after checking it fits ``dataset`` (None: start fresh)."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not an ImageEmbeddingDataset state (version {STATE_VERSION}): {str(state)[:80]!r}")
    saved = state.get("pass")
    if saved is None:
        return None
    current = _config(dataset)
    changed = [name for name, value in current.items() if saved["config"].get(name) != value]
    if changed:
        raise ValueError(f"cannot resume: the dataset's {', '.join(changed)} changed since the state was saved")
    return saved


class ReaderPass:
    """One reader's resumable pass over one epoch (see module docstring); ``iter()`` it once, ask ``state()``."""

    def __init__(self, dataset: Any, rank: int, world: int, worker: int, workers: int, epoch: int,
                 resume: Optional[Dict[str, Any]] = None):
        self.ds = dataset
        self.reader = [rank, world, worker, workers]
        self.slot, self.slots = rank * workers + worker, world * workers
        self.epoch = epoch
        self.shard, self.offset, self.yielded = 0, 0, 0
        self.draining = self.done = False
        self.share: Optional[int] = None
        if dataset.epoch_length is not None:
            length = dataset.epoch_length
            self.share = length // workers + (1 if worker < length % workers else 0)
        self.rng = random.Random(f"{dataset.seed}:{epoch}:{self.slot}:samples") if dataset.shuffle_num > 1 else None
        self.buffer: List[Tuple[Any, ...]] = []
        self.pending: List[List[Any]] = []  # buffered samples of a restored state, not read back yet
        self.policy = ErrorPolicy(dataset.handler, dataset._counters)
        self.index = {url: i for i, url in enumerate(dataset.urls)}
        self.config = _config(dataset)  # once: state() runs after every batch
        self.identities: Dict[int, Optional[str]] = {}  # shard index -> content identity, noted as it is opened
        self.current: Optional[int] = None  # the index of the shard being read
        if resume is not None:
            self._restore(resume)

    def _identity(self, url_index: int) -> Optional[str]:
        """The shard's content identity (size and mtime of a local file, a repo file's hash...; never its bytes
        hashed), or None where none can be had cheaply."""
        if url_index not in self.identities:
            try:
                self.identities[url_index] = content_identity(self.ds.urls[url_index], read_bytes=False)
            except (OSError, ValueError):
                self.identities[url_index] = None
        return self.identities[url_index]

    # --- state ---------------------------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """This pass's position (JSON-serializable; see module docstring)."""
        rng = None
        if self.rng is not None:
            version, internal, gauss = self.rng.getstate()
            rng = [version, list(internal), gauss]
        return {
            "reader": list(self.reader), "config": self.config, "epoch": self.epoch,
            "shard": self.shard, "offset": self.offset, "draining": self.draining, "done": self.done,
            "buffer": self.pending + [list(item[-1]) for item in self.buffer], "rng": rng,
            "yielded": self.yielded, "skips": dict(self.policy.local), "shards": self._pointed_at(),
        }

    def _pointed_at(self) -> Dict[str, Optional[str]]:
        wanted = {ref[0] for ref in self.pending} | {item[-1][0] for item in self.buffer}
        if self.current is not None:
            wanted.add(self.current)
        return {str(i): self.identities.get(i) for i in sorted(wanted)}

    def _restore(self, saved: Dict[str, Any]) -> None:
        if list(saved["reader"]) != self.reader:
            (rank, world, worker, workers), now = saved["reader"], self.reader
            raise ValueError(
                f"cannot resume: the state is reader rank {rank}/{world} worker {worker}/{workers}, this is rank "
                f"{now[0]}/{now[1]} worker {now[2]}/{now[3]} (resume with the same world size and num_workers)"
            )
        self.epoch = int(saved["epoch"])
        self.shard, self.offset, self.yielded = int(saved["shard"]), int(saved["offset"]), int(saved["yielded"])
        self.draining, self.done = bool(saved["draining"]), bool(saved["done"])
        self.rng = random.Random(f"{self.ds.seed}:{self.epoch}:{self.slot}:samples") if saved["rng"] else None
        if self.rng is not None:
            version, internal, gauss = saved["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.pending = [list(ref) for ref in saved["buffer"]]
        for index, identity in dict(saved.get("shards") or {}).items():
            url_index = int(index)
            if identity is not None and 0 <= url_index < len(self.ds.urls):
                now = self._identity(url_index)
                if now is not None and now != identity:
                    raise ValueError(f"cannot resume: the shard {self.ds.urls[url_index]} changed since the state was "
                                     "saved (its saved positions would name other members)")
        for reason, count in saved["skips"].items():  # the interrupted part of the epoch counts in stats
            self.policy.local[reason] += count
            self.ds._counters.add(reason, count)
        log.info("reader %d/%d: resuming epoch %d at shard %d of its share, offset %d (%d yielded, %d buffered)",
                 self.slot, self.slots, self.epoch, self.shard, self.offset, self.yielded, len(self.pending))

    # --- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[Any, ...]]:
        lookups = self.ds._lookups()
        try:
            if self.pending:
                self._read_back(lookups)
            stream: Iterator[Tuple[Any, ...]] = iter(()) if self.draining or self.done else self._raw(lookups)
            if self.rng is not None:
                stream = self._shuffled(stream)
            items = self.ds._decoded(stream, self.policy)
            while not self.done and (self.share is None or self.yielded < self.share):
                item = next(items, None)
                if item is None:
                    break
                self.yielded += 1
                yield item
            self.done = True
        finally:
            for lookup in lookups.values():
                lookup.close()
        if self.policy.local:
            log.info("rank %d worker %d epoch %d: skipped %s", self.reader[0], self.reader[2], self.epoch,
                     dict(self.policy.local))

    def _raw(self, lookups: Dict[str, Any]) -> Iterator[Tuple[Any, ...]]:
        """Good raw samples + their reference, shard by shard from the cursor, moving the cursor as it goes."""
        policy, ds = self.policy, self.ds
        empty_streak = 0
        order = ds._shard_order(self.slot, self.slots, self.epoch)
        for position, url in enumerate(itertools.islice(order, self.shard, None), self.shard):
            start = self.offset if position == self.shard else 0
            self.shard, self.offset = position, start
            self.current = self.index[url]
            self._identity(self.current)
            produced = 0
            ds._io.add("shards_opened")
            samples = iter_shard_samples(url, policy, ds.cache_dir, ds.max_member_bytes, start=start, positions=True)
            with closing(samples):
                for sample in samples:
                    spans = sample.get("__spans__", [])
                    ds._io.add("members_read", len(spans))
                    checked = ds._check_sample(sample, lookups, policy)
                    if checked is SKIP_SHARD:
                        break
                    self.offset = sample.get("__end__", self.offset)
                    if checked is not None:
                        produced += 1
                        yield (*checked, (self.index[url], sample["__key__"], spans))
            if policy.stopped:
                return
            self.shard, self.offset = position + 1, 0
            empty_streak = 0 if produced else empty_streak + 1
            # Resampling never runs out of shards: if none of them yields anything, say so instead of spinning.
            if ds.resample and empty_streak >= 2 * len(ds.urls) + 10:
                raise DataFormatError(
                    f"no usable sample in {empty_streak} shards drawn in a row; skips so far: {ds.stats}"
                )

    def _shuffled(self, raw: Iterator[Tuple[Any, ...]]) -> Iterator[Tuple[Any, ...]]:
        """webdataset's shuffle buffer (same draws as :func:`.tar_samples.shuffle_buffer`), contents kept in state."""
        buffer, size, rng = self.buffer, self.ds.shuffle_num, self.rng
        assert rng is not None
        if not self.draining:
            for item in raw:
                if len(buffer) < size:
                    buffer.append(item)
                    continue
                i = rng.randrange(size)
                out, buffer[i] = buffer[i], item
                yield out
            rng.shuffle(buffer)
            buffer.reverse()  # popped from the end: the shuffled order, with only undelivered items kept
            self.draining = True
        while buffer:
            yield buffer.pop()

    def _read_back(self, lookups: Dict[str, Any]) -> None:
        """Rebuild the shuffle buffer of a restored state by reading its samples' members again (by offset)."""
        refs, self.pending = self.pending, []
        by_url: Dict[int, List[int]] = {}
        for position, (url_index, _key, _spans) in enumerate(refs):
            by_url.setdefault(url_index, []).append(position)
        rebuilt: Dict[int, Tuple[Any, ...]] = {}
        for url_index, positions in by_url.items():
            url = self.ds.urls[url_index]
            try:
                samples = read_samples_at(url, [refs[p][2] for p in positions], self.ds.cache_dir)
            except FileNotFoundError as exc:
                self.policy.skip("missing_shard", exc)
                continue
            except PermissionError:
                raise
            except (OSError, ValueError) as exc:  # DataFormatError is a ValueError
                self.policy.skip("unreadable_shard", exc)
                continue
            for p, sample in zip(positions, samples):
                key, spans = refs[p][1], refs[p][2]
                self.ds._io.add("members_read", len(spans))
                sample.update({"__key__": key, "__url__": url})
                checked = self.ds._check_sample(sample, lookups, self.policy)
                if checked is not None and checked is not SKIP_SHARD:
                    rebuilt[p] = (*checked, (url_index, key, [tuple(s) for s in spans]))
        self.buffer[:0] = [rebuilt[p] for p in sorted(rebuilt)]
        if len(rebuilt) < len(refs):
            log.warning("resume: %d of %d buffered samples could not be read again", len(refs) - len(rebuilt),
                        len(refs))


def read_samples_at(
    url: str, spans: Sequence[Sequence[Tuple[str, int, int]]], cache_dir: Optional[str] = None
) -> List[Dict[str, bytes]]:
    """Read samples of one shard again from their ``"__spans__"``: one ``{ext: bytes}`` per entry of ``spans``.

    A plain tar is read by seeking to each member (one ranged read each on a remote file); a compressed one is
    read through once. Raises FileNotFoundError / DataFormatError when the shard no longer has those members.
    """
    out: List[Dict[str, bytes]] = [{} for _ in spans]
    with open_url(url, cache_dir) as f:
        if not is_compressed(url, f):
            for sample, members in zip(out, spans):
                for ext, offset, size in members:
                    f.seek(offset)
                    sample[ext] = f.read(size)
                    if len(sample[ext]) != size:
                        raise DataFormatError(f"{url}: member at offset {offset} is cut short (shard changed?)")
            return out
        wanted = {offset: (i, ext, size) for i, members in enumerate(spans) for ext, offset, size in members}
        for _name, data, offset in iter_tar_entries(f, url):
            found = wanted.pop(offset, None)
            if found is not None:
                out[found[0]][found[1]] = data
            if not wanted:
                break
    if wanted:
        raise DataFormatError(f"{url}: {len(wanted)} member(s) to read again are gone (shard changed?)")
    return out
