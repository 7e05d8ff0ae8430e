"""Stream webdataset-style tar shards as samples with bounded memory.

A shard is read once, front to back, through ``tarfile`` stream mode (``r|*``), so a 2 GB shard never sits in
memory: only the members of the sample being assembled do. Members are grouped into samples exactly like
webdataset does (the key is the member path up to the first ``.`` of its basename, the rest is the extension)::

    from streamloader.data.tars import iter_samples, skip_and_count
    for sample in iter_samples("/data/{0000..0009}.tar", handler=skip_and_count):
        sample["__key__"], sample["jpg"]   # "00010509", b"\\xff\\xd8..."

Error policy: every problem is either raised as a typed error or skipped *and counted* under a named reason
(see :data:`SKIP_REASONS`), as the handler decides. Handlers never sleep. Members that could escape a directory
(``../x``, absolute names, links, devices) are never read: they are always skipped and counted.

Member size: a member is read whole into memory, so one larger than ``max_member_bytes`` (default
:data:`DEFAULT_MAX_MEMBER_BYTES`, 64 MiB; None for no limit) is refused before any of it is read: a DataFormatError
naming it, or, as the handler decides, a skip counted once as ``oversized_member`` that drops its whole sample (its
data is passed over in bounded pieces, so a 300 KB .tar.gz holding 300 MB of zeros costs no 300 MB of memory).
"""
from __future__ import annotations

import logging
import re
import tarfile
from collections import Counter
from contextlib import contextmanager
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from streamloader.data.counters import SharedCounters
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "SKIP_REASONS",
    "DEFAULT_MAX_MEMBER_BYTES",
    "Handler",
    "raise_on_error",
    "skip_and_count",
    "warn_and_continue",
    "resolve_handler",
    "ErrorPolicy",
    "expand_urls",
    "open_url",
    "iter_tar_members",
    "iter_tar_entries",
    "group_members",
    "iter_shard_samples",
    "is_compressed",
    "iter_samples",
    "split_key",
    "make_synthetic_shards",
]

#: Why a shard, member or sample was skipped; the keys of ``dataset.stats``.
SKIP_REASONS: Tuple[str, ...] = (
    "missing_shard",  # the tar does not exist (handler decides)
    "unreadable_shard",  # truncated / corrupt / unreadable tar; the rest of that shard is dropped (handler)
    "unsafe_member",  # link, device, absolute or ``..`` member name: never read (always skipped)
    "oversized_member",  # a member over max_member_bytes: never read; its sample is dropped (handler)
    "ignored_member",  # member name without ``key.ext`` (always skipped)
    "malformed_sample",  # the same extension twice in one sample (handler)
    "bad_key",  # key not of the form <shard><index>, or naming another shard (handler)
    "missing_embedding_file",  # no img_emb_<shard>.npy for a shard; that shard is dropped (handler)
    "bad_embedding",  # index past the array, dimension mismatch, unreadable .npy (handler)
    "missing_embedding",  # an all-zero embedding row marks a missing sample (always skipped)
    "incomplete_sample",  # no image, no embedding or a requested extra key absent (handler)
    "decode_error",  # the image could not be decoded or img_preproc failed (handler)
)

#: Largest tar member read into memory (bytes); larger ones are refused or skipped (see the module docstring).
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
_DRAIN_PIECE = 1 << 20  # an oversized member's data is passed over this much at a time

# A handler gets the exception and returns True to skip and go on, False to stop this stream; or it raises.
Handler = Callable[[BaseException], bool]

# webdataset's key/extension split, kept identical so tars written by its TarWriter group the same way.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_DRIVE = re.compile(r"^[A-Za-z]:")


def raise_on_error(exc: BaseException) -> bool:
    """Default handler: re-raise, so bad data stops the run with a typed error."""
    raise exc


def skip_and_count(exc: BaseException) -> bool:
    """Handler that skips the bad item; the skip is counted in ``stats`` and logged at DEBUG."""
    log.debug("skipped: %s", exc)
    return True


def warn_and_continue(exc: BaseException) -> bool:
    """Handler that skips the bad item, counts it and logs a warning (without sleeping, unlike webdataset's)."""
    log.warning("skipped: %s", exc)
    return True


def _stop_quietly(exc: BaseException) -> bool:
    log.debug("stopping this stream: %s", exc)
    return False


def _warn_and_stop(exc: BaseException) -> bool:
    log.warning("stopping this stream: %s", exc)
    return False


# webdataset's handlers sleep 0.5 s per warning; users switching from DALLE2 pass them, so we swap in ours.
_WEBDATASET_EQUIVALENTS = {
    "reraise_exception": raise_on_error,
    "warn_and_continue": warn_and_continue,
    "ignore_and_continue": skip_and_count,
    "ignore_and_stop": _stop_quietly,
    "warn_and_stop": _warn_and_stop,
}


def resolve_handler(handler: Optional[Handler]) -> Handler:
    """Return ``handler`` (None means :func:`raise_on_error`), replacing webdataset's sleeping handlers by ours."""
    if handler is None:
        return raise_on_error
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {handler!r}")
    if str(getattr(handler, "__module__", "")).startswith("webdataset"):
        return _WEBDATASET_EQUIVALENTS.get(getattr(handler, "__name__", ""), handler)
    return handler


class ErrorPolicy:
    """Applies a handler to errors and counts every skip under its reason."""

    def __init__(self, handler: Optional[Handler] = None, counters: Optional[SharedCounters] = None):
        self.handler = resolve_handler(handler)
        self.counters = counters if counters is not None else SharedCounters(SKIP_REASONS)
        # Set once a handler answers "stop": every loop of the stream checks it and ends.
        self.stopped = False
        self.local: Counter = Counter()  # this stream's skips (counters are shared with other workers)

    def skip(self, reason: str, exc: BaseException) -> bool:
        """Ask the handler about ``exc`` (it may raise); count the skip; return True to go on, False to stop."""
        go_on = bool(self.handler(exc))
        self.counters.add(reason)
        self.local[reason] += 1
        if not go_on:
            self.stopped = True
        return go_on

    def always_skip(self, reason: str, message: str) -> None:
        """Count a skip that no handler can turn into an error (unsafe members, all-zero embeddings)."""
        self.counters.add(reason)
        self.local[reason] += 1
        log.debug("skipped (%s): %s", reason, message)


def expand_urls(urls: Union[str, Iterable[str]]) -> List[str]:
    """Expand brace notation (``/d/{0000..0009}.tar``, padding kept) in a URL or a list of URLs."""
    from braceexpand import braceexpand

    items = [urls] if isinstance(urls, (str, bytes)) or not isinstance(urls, Iterable) else list(urls)
    out: List[str] = []
    for item in items:
        out.extend(braceexpand(str(item)))
    if not out:
        raise ValueError("no shard URLs given")
    return out


@contextmanager
def open_url(url: str, cache_dir: Optional[str] = None) -> Iterator[IO[bytes]]:
    """Open any fsspec URL (local path, ``file://``, ``memory://``, ``https://``, ``dagshub://``) for reading.

    With ``cache_dir`` a remote file is first copied to that directory (fsspec ``simplecache``) and read from
    disk on later epochs.
    """
    import fsspec

    target, options = url, {}
    if cache_dir is not None and "://" in url and not url.startswith("file://"):
        target, options = f"simplecache::{url}", {"simplecache": {"cache_storage": str(cache_dir)}}
    with fsspec.open(target, "rb", **options) as f:
        yield f


class _StrictTarInfo(tarfile.TarInfo):
    """Records header errors that ``TarFile.next`` silently treats as the end of the archive."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            # Past offset 0 tarfile ends iteration quietly on these; a cut-off download would look complete.
            tf._streamloader_bad_end = exc  # type: ignore[attr-defined]
            raise


def _unsafe_reason(info: tarfile.TarInfo) -> Optional[str]:
    if info.issym() or info.islnk():
        return f"link to {info.linkname!r}"
    if not info.isreg():
        return "not a regular file"
    name = info.name
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "path with '..'"
    return None


def _oversized(info: tarfile.TarInfo, url: str, limit: int) -> DataFormatError:
    return DataFormatError(
        f"{url}: member {info.name!r} is {info.size:,} bytes, over the {limit:,}-byte limit on one member "
        "(max_member_bytes)"
    )


def _drain(member: IO[bytes]) -> None:
    # tarfile's own skip in stream mode reads 10 KiB at a time and re-copies its whole decompressed buffer each
    # time: quadratic on a gzip of zeros. Bounded pieces keep it linear and the memory small.
    while member.read(_DRAIN_PIECE):
        pass


def iter_tar_members(
    fileobj: IO[bytes], url: str, policy: Optional[ErrorPolicy] = None,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Tuple[str, Optional[bytes]]]:
    """Yield ``(member name, bytes)`` for the regular, safe members of a tar stream, in order.

    A member over ``max_member_bytes`` goes to the policy's handler (reason ``oversized_member``); when it is
    skipped, it is yielded as ``(name, None)`` so that :func:`group_members` drops its sample. Raises
    :class:`DataFormatError` for a truncated or corrupt archive (after yielding what came before).
    """
    for name, data, _offset in iter_tar_entries(fileobj, url, policy, max_member_bytes):
        yield name, data


def iter_tar_entries(
    fileobj: IO[bytes], url: str, policy: Optional[ErrorPolicy] = None,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES, *, base: int = 0, start: int = 0,
    compression: str = "*",
) -> Iterator[Tuple[str, Optional[bytes], int]]:
    """Like :func:`iter_tar_members`, with each member's data offset: ``(name, bytes, offset)``.

    ``base`` is where ``fileobj`` stands in the tar stream (a caller that seeked into the archive); members whose
    header lies before ``start`` are passed over without reading their data (a compressed stream, which cannot
    seek, resumes this way). ``compression``: tarfile's stream suffix ("*" detects it, "" for a plain tar).
    """
    policy = policy or ErrorPolicy()
    try:
        tar = tarfile.open(fileobj=fileobj, mode=f"r|{compression}", tarinfo=_StrictTarInfo)
        for info in tar:
            # Stream mode still appends every TarInfo to .members; forget them to keep memory flat.
            tar.members = []
            if info.isdir():
                continue
            if base + info.offset < start:  # before the resume point: passed over, in bounded pieces
                if info.isreg():
                    _drain(tar.extractfile(info))  # type: ignore[arg-type]
                continue
            unsafe = _unsafe_reason(info)
            if unsafe is not None:
                policy.always_skip("unsafe_member", f"{url}: member {info.name!r}: {unsafe}")
                continue
            member = tar.extractfile(info)
            if member is None:  # pragma: no cover - isreg() members always have data
                continue
            if max_member_bytes is not None and info.size > max_member_bytes:
                if not policy.skip("oversized_member", _oversized(info, url, max_member_bytes)):
                    return
                _drain(member)
                yield info.name, None, base + info.offset_data
                continue
            yield info.name, member.read(), base + info.offset_data
        bad_end = getattr(tar, "_streamloader_bad_end", None)
    except (tarfile.TarError, EOFError) as exc:
        raise DataFormatError(f"{url}: truncated or corrupt tar ({exc})") from exc
    if bad_end is not None:
        raise DataFormatError(f"{url}: truncated or corrupt tar (no end-of-archive marker: {bad_end})")


def split_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """Split a member name into ``(key, extension)`` like webdataset: ``a/0001.seg.png`` -> ``a/0001``, ``seg.png``."""
    match = _KEY_EXT.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def group_members(
    members: Iterable[Tuple[Any, ...]], url: str, policy: Optional[ErrorPolicy] = None
) -> Iterator[Dict[str, Any]]:
    """Group consecutive members sharing a key into sample dicts ``{"__key__", "__url__", ext: bytes, ...}``.

    A member whose data is None (skipped and counted by :func:`iter_tar_members`) drops its whole sample. Members
    are ``(name, bytes)``, or ``(name, bytes, offset)`` as :func:`iter_tar_entries` gives them: then each sample
    also carries ``"__spans__"`` (``[(ext, offset, size), ...]``, enough to read it again) and ``"__end__"`` (the
    tar offset right after its last member, where the next one's header starts).
    """
    policy = policy or ErrorPolicy()
    current: Optional[Dict[str, Any]] = None
    bad_key: Optional[str] = None  # a sample already rejected: swallow its remaining members
    for item in members:
        name, data = item[0], item[1]
        if _META.match(name):  # webdataset's __meta__ members are not samples
            continue
        key, ext = split_key(name)
        if key is None or ext is None:
            policy.always_skip("ignored_member", f"{url}: member {name!r} has no key.extension name")
            continue
        ext = ext.lower()
        if key == bad_key:
            continue
        if data is None:  # already counted: the sample goes without a second count (e.g. as incomplete)
            if current is not None and key != current["__key__"]:
                yield current
            current, bad_key = None, key
            continue
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current, bad_key = {"__key__": key, "__url__": url}, None
        if ext in current:
            exc = DataFormatError(f"{url}: sample {key!r} has two {ext!r} members")
            current, bad_key = None, key
            if not policy.skip("malformed_sample", exc):
                return
            continue
        current[ext] = data
        if len(item) > 2:
            offset = item[2]
            current.setdefault("__spans__", []).append((ext, offset, len(data)))
            current["__end__"] = offset + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if current is not None:
        yield current


def iter_shard_samples(
    url: str, policy: Optional[ErrorPolicy] = None, cache_dir: Optional[str] = None,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES, *, start: int = 0, positions: bool = False,
) -> Iterator[Dict[str, Any]]:
    """Yield the samples of one shard; a missing or corrupt shard raises or is skipped and counted per policy.

    ``start``: the tar offset to begin at (a sample boundary, e.g. a previous sample's ``"__end__"``): a plain tar
    is seeked there, a compressed one is read through without extracting the members before it. ``positions``:
    samples carry ``"__spans__"``/``"__end__"`` (see :func:`group_members`). Returns normally after a skipped
    shard error; when a handler says "stop", ``policy.stopped`` is set.
    """
    policy = policy or ErrorPolicy()
    try:
        with open_url(url, cache_dir) as f:
            base, compression = 0, "*"
            if start > 0:
                if is_compressed(url, f):
                    f.seek(0)
                else:
                    f.seek(start)
                    base, compression = start, ""
            entries = iter_tar_entries(f, url, policy, max_member_bytes, base=base, start=start,
                                       compression=compression)
            if not positions:
                entries = ((name, data) for name, data, _offset in entries)  # type: ignore[misc]
            yield from group_members(entries, url, policy)
    except FileNotFoundError as exc:
        policy.skip("missing_shard", exc)
    except PermissionError:  # a bad token is not bad data: no handler may hide it
        raise
    except (DataFormatError, OSError) as exc:
        policy.skip("unreadable_shard", exc)


# magic numbers of the compressions tarfile's stream mode detects (gzip, bzip2, xz, lzma, zstd)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00", b"\x28\xb5\x2f\xfd")


def is_compressed(url: str, f: IO[bytes]) -> bool:
    """Whether a shard is compressed: by its name when it ends in ``.tar`` (no read), else by its first bytes."""
    if url.split("?", 1)[0].endswith(".tar"):
        return False
    head = f.read(6)
    f.seek(0)
    return head.startswith(_COMPRESSED_MAGIC)


def iter_samples(
    urls: Union[str, Iterable[str]],
    handler: Optional[Handler] = None,
    counters: Optional[SharedCounters] = None,
    cache_dir: Optional[str] = None,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Dict[str, Any]]:
    """Yield the raw samples (bytes per extension) of every shard in order; no decoding, no splitting.

    ``max_member_bytes``: the largest member read (see the module docstring); None for no limit.

    Example::

        keys = [s["__key__"] for s in iter_samples("shards/{0000..0003}.tar")]
    """
    policy = ErrorPolicy(handler, counters)
    for url in expand_urls(urls):
        yield from iter_shard_samples(url, policy, cache_dir, max_member_bytes)
        if policy.stopped:
            return


def make_synthetic_shards(*args: Any, **kwargs: Any) -> Any:
    """Write synthetic webdataset shards (see :func:`streamloader.data.shardgen.make_synthetic_shards`)."""
    from streamloader.data.shardgen import make_synthetic_shards as _make

    return _make(*args, **kwargs)
