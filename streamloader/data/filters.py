"""Select labels.tsv rows by caption keywords, regex and score — the guide's squirrel loop, done right and fast.

    result = filter_labels("data/labels.tsv", "squirrel")        # 'squirrel' in caption.lower(), like the guide
    result.matched, result.scanned, result.skipped              # 115, 540000, 0
    [row.file for row in result.rows]

Given a path or URL, keyword filters first look for the keyword in whole lower-cased blocks of the file and only
parse the lines that contain it (:func:`keyword_line_starts`); every row is still validated and
counted. The same :class:`LabelFilter` also works on any iterable of LabelRow.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import (
    Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Pattern, Sequence, Tuple, Union)

from streamloader.data.labels import LabelReader, LabelRow, Source

__all__ = ["LabelFilter", "as_label_filter", "FilterResult", "filter_labels", "filter_rows", "keyword_line_starts", "sample_keeps"]

MATCH_MODES = ("any", "all")
Keywords = Union[str, Sequence[str], None]


def _keyword_list(value: Keywords, what: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what} must be non-empty strings; got {item!r}")
        if "\n" in item:
            raise ValueError(f"{what} cannot contain a newline (a caption never does); got {item!r}")
    return tuple(item.lower() for item in items)


def _optional_score(value: Optional[float], what: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{what} must be a number; got {value!r}")
    return float(value)


_NO_PATTERNS: Tuple[Pattern[str], ...] = ()


@dataclass(frozen=True)
class LabelFilter:
    """Which labels.tsv rows to keep: caption keywords, exclusions, regex, an inclusive score range (all ANDed),
    then a seeded ``sample`` of the matches and a ``limit`` on the rows kept. One immutable, validated value that
    :func:`filter_labels`, :class:`~streamloader.data.laion.LaionAestheticsDataset` and ``streamloader filter`` all
    take; their keyword arguments of the same names build one.

    Keywords match like the guide's ``'squirrel' in caption.lower()`` (case-insensitive substring, so "squirrel"
    matches "Squirrels"); ``whole_word=True`` requires word boundaries (then it does not), for keywords and
    exclusions alike. ``match="all"`` requires every keyword instead of any. ``regex`` is searched in the caption,
    case-insensitively unless passed pre-compiled. ``sample`` (0 < sample <= 1) keeps a deterministic fraction of
    the matches (see :func:`sample_keeps`, seeded by ``seed``); ``limit`` stops after that many kept rows.

    After construction ``keywords``/``exclude`` are tuples of lower-cased strings, ``regex`` a compiled pattern (or
    None) and the scores floats; invalid values raise ValueError. Calling the filter tests one row against the
    caption and score conditions (``sample`` and ``limit`` apply to a whole pass, in :func:`filter_labels`):

    >>> keep = LabelFilter(["squirrel", "cat"], match="all", exclude="cartoon", min_score=7)
    >>> keep(LabelRow("a.jpg", "A Squirrel and a cat", 7.5, "http://x"))
    True
    >>> filter_labels("data/labels.tsv", label_filter=keep)    # doctest: +SKIP
    """

    keywords: Keywords = None
    _: KW_ONLY
    match: str = "any"
    exclude: Keywords = None
    whole_word: bool = False
    regex: Union[str, Pattern[str], None] = None
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    limit: Optional[int] = None
    sample: Optional[float] = None
    seed: int = 0
    # whole words: one compiled pattern per keyword, searched in the lower-cased caption
    _word_res: Tuple[Pattern[str], ...] = field(default=_NO_PATTERNS, init=False, repr=False, compare=False)
    _exclude_res: Tuple[Pattern[str], ...] = field(default=_NO_PATTERNS, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be 'any' or 'all'; got {self.match!r}")
        keywords = _keyword_list(self.keywords, "keywords")
        exclude = _keyword_list(self.exclude, "exclude keywords")
        min_score = _optional_score(self.min_score, "min_score")
        max_score = _optional_score(self.max_score, "max_score")
        if min_score is not None and max_score is not None and min_score > max_score:
            raise ValueError(f"min_score ({min_score}) is greater than max_score ({max_score})")
        regex = self.regex
        if isinstance(regex, str):
            try:
                regex = re.compile(regex, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"invalid regex {regex!r}: {exc}") from None
        elif regex is not None and not isinstance(regex, re.Pattern):
            raise ValueError(f"regex must be a string or a compiled pattern; got {regex!r}")
        _check_limit_sample(self.limit, self.sample, self.seed)
        normalized = {
            "keywords": keywords, "exclude": exclude, "whole_word": bool(self.whole_word), "regex": regex,
            "min_score": min_score, "max_score": max_score,
            "_word_res": tuple(map(_word_re, keywords)) if self.whole_word else _NO_PATTERNS,
            "_exclude_res": tuple(map(_word_re, exclude)) if self.whole_word else _NO_PATTERNS,
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)  # frozen: the normalized values are set once, here

    def _has(self, low: str, keyword: str, index: int, exclusion: bool) -> bool:
        if not self.whole_word:
            return keyword in low
        return (self._exclude_res if exclusion else self._word_res)[index].search(low) is not None

    def __call__(self, row: LabelRow) -> bool:
        """Whether ``row`` passes the caption and score conditions."""
        score = row.score
        if self.min_score is not None and score < self.min_score:
            return False
        if self.max_score is not None and score > self.max_score:
            return False
        if self.keywords or self.exclude:
            low = row.caption.lower()
            if self.keywords:
                hits = (self._has(low, k, i, False) for i, k in enumerate(self.keywords))
                if not (all(hits) if self.match == "all" else any(hits)):
                    return False
            if any(self._has(low, k, i, True) for i, k in enumerate(self.exclude)):  # type: ignore[arg-type]
                return False
        if self.regex is not None and self.regex.search(row.caption) is None:  # type: ignore[union-attr]
            return False
        return True

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.repr and getattr(self, f.name) != _DEFAULTS[f.name]]
        return f"LabelFilter({', '.join(parts)})"


_DEFAULTS: Dict[str, Any] = {f.name: f.default for f in fields(LabelFilter) if f.init}
_DEFAULTS.update(keywords=(), exclude=())  # None and () mean the same: no condition


def as_label_filter(label_filter: Optional[LabelFilter] = None, **options: Any) -> LabelFilter:
    """``label_filter`` itself, or a :class:`LabelFilter` built from ``options`` (its field names): the one place
    where the loaders' filter keyword arguments become a filter. Passing a filter and non-default options raises
    ValueError, since it is not clear which should win."""
    if label_filter is None:
        return LabelFilter(**options)
    if not isinstance(label_filter, LabelFilter):
        raise TypeError(f"label_filter must be a LabelFilter; got {type(label_filter).__name__}")
    given = sorted(name for name, value in options.items() if value is not None and value != _DEFAULTS[name])
    if given:
        raise ValueError(f"pass label_filter or the filter options ({', '.join(given)}), not both")
    return label_filter


def _word_re(keyword: str) -> Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(keyword) + r"(?!\w)")


def sample_keeps(file: str, fraction: float, seed: int = 0) -> bool:
    """Whether a seeded sample of ``fraction`` keeps the row for ``file``: a keyed hash of the name, so the choice
    is the same for a given (seed, file) whatever else is in the file, and about ``fraction`` of names are kept."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(file.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


@dataclass
class FilterResult:
    """Rows kept, plus the counts behind them: scanned = valid + malformed rows read (blank lines excluded),
    matched = rows passing the filter (before ``sample``/``limit``), skipped = malformed rows, reasons = why."""

    rows: List[LabelRow]
    scanned: int
    matched: int
    skipped: int
    reasons: Counter = field(default_factory=Counter)
    stopped_early: bool = False  # ``limit`` was reached before the end of the source

    @property
    def files(self) -> List[str]:
        """File names of the kept rows."""
        return [row.file for row in self.rows]

    def summary(self) -> str:
        """One human line, e.g. ``115 of 540,000 rows matched (0 malformed skipped)``."""
        return f"{self.matched:,} of {self.scanned:,} rows matched ({self.skipped:,} malformed skipped)"


# The only non-ASCII characters whose str.lower() contains ASCII (U+0130 -> "i\u0307", KELVIN SIGN -> "k"): where
# they occur, bytes.lower() could miss a keyword that caption.lower() contains. An ASCII needle can only be hit
# through them if it holds a "k", or ends with the "i" (in the lowered text, U+0307 follows that "i").
_LOWERS_TO_ASCII = {"\u0130".encode(): lambda needle: needle.endswith("i"), "\u212a".encode(): lambda n: "k" in n}


def keyword_line_starts(needles: Sequence[str], require_all: bool = False) -> Callable[[bytes], List[int]]:
    """A ``LabelReader.iter_selected`` pre-filter: starts of the lines whose lower-cased text contains any (with
    ``require_all``: every) of the lower-cased ``needles``. A superset of caption matches (the file name or URL may
    hold the keyword too), so the caption must still be tested."""
    needles = [needle.lower() for needle in needles]
    if not needles or any(not needle or "\n" in needle for needle in needles):
        raise ValueError("needles must be non-empty strings without newlines")
    test = all if require_all else any
    ascii_needles = all(needle.isascii() for needle in needles)
    # the characters to look for before trusting bytes.lower() (scanning a block for each costs more than lower())
    hazards = [seq for seq, affects in _LOWERS_TO_ASCII.items() if any(affects(needle) for needle in needles)]
    # For require_all every needle must appear: the lines holding the longest one are enough candidates.
    search = [max(needles, key=len).encode()] if require_all else [needle.encode() for needle in needles]

    def select(block: bytes) -> List[int]:
        if not ascii_needles or any(seq in block for seq in hazards):
            starts, pos = [], 0  # exact Unicode lower-casing, line by line (slower, rarely needed)
            for raw in block.split(b"\n")[:-1]:
                low = raw.decode("utf-8").lower()
                if test(needle in low for needle in needles):
                    starts.append(pos)
                pos += len(raw) + 1
            return starts
        # ASCII needles: bytes.lower() of UTF-8 agrees with str.lower() here and runs at memory speed.
        lowered = block.lower()
        found = set()
        for needle in search:
            hit = lowered.find(needle)
            while hit >= 0:
                found.add(lowered.rfind(b"\n", 0, hit) + 1)
                hit = lowered.find(needle, lowered.index(b"\n", hit) + 1)
        return sorted(found)

    return select


def _check_limit_sample(limit: Optional[int], sample: Optional[float], seed: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer; got {limit!r}")
    if sample is not None and (
        isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1
    ):
        raise ValueError(f"sample must be a fraction with 0 < sample <= 1; got {sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")


def filter_rows(rows: Iterable[LabelRow], keep: LabelFilter) -> Iterator[LabelRow]:
    """Lazily yield the rows ``keep`` accepts (for any iterable of LabelRow, e.g. a LabelReader)."""
    return (row for row in rows if keep(row))


def filter_labels(
    source: Union[Source, LabelReader, Iterable[LabelRow]],
    keywords: Keywords = None,
    *,
    label_filter: Optional[LabelFilter] = None,
    match: str = "any",
    exclude: Keywords = None,
    whole_word: bool = False,
    regex: Union[str, Pattern[str], None] = None,
    min_score: Optional[float] = None,
    max_score: Optional[float] = None,
    limit: Optional[int] = None,
    sample: Optional[float] = None,
    seed: int = 0,
    on_error: str = "raise",
    storage_options: Optional[Mapping[str, Any]] = None,
    encoding: str = "utf-8",
) -> FilterResult:
    """Rows of a labels.tsv (path, URL, LabelReader or iterable of LabelRow) that pass the filter.

    The filter is ``label_filter``, or the :class:`LabelFilter` that ``keywords`` and the other filter keywords
    (match, exclude, whole_word, regex, min_score, max_score, limit, sample, seed) make. ``sample`` keeps a seeded,
    deterministic fraction of the matches (see :func:`sample_keeps`); ``limit`` stops after that many kept rows
    (the counts then cover the rows read up to there). ``on_error`` applies when ``source`` is a path or URL.

    Usage::

        result = filter_labels("data/labels.tsv", "squirrel")
        print(result.summary())            # 115 of 540,000 rows matched (0 malformed skipped)
        red = filter_labels(result.rows, ["red", "grey"], whole_word=True, min_score=7)   # refine in memory
    """
    keep = as_label_filter(
        label_filter, keywords=keywords, match=match, exclude=exclude, whole_word=whole_word, regex=regex,
        min_score=min_score, max_score=max_score, limit=limit, sample=sample, seed=seed,
    )
    limit, sample, seed = keep.limit, keep.sample, keep.seed
    reader: Optional[LabelReader] = None
    if isinstance(source, LabelReader):
        reader = source
    elif isinstance(source, (str, bytes, os.PathLike)) or hasattr(source, "read"):
        reader = LabelReader(source, on_error, storage_options=storage_options, encoding=encoding)  # type: ignore
    if limit == 0:
        return FilterResult([], 0, 0, 0, Counter(), stopped_early=True)

    if reader is not None:
        candidates: Iterator[LabelRow] = (
            reader.iter_selected(keyword_line_starts(keep.keywords, require_all=keep.match == "all"))
            if keep.keywords
            else iter(reader)
        )
    else:
        candidates = iter(source)  # type: ignore[arg-type]

    kept: List[LabelRow] = []
    matched = seen = 0
    stopped = False
    try:
        for row in candidates:
            seen += 1
            if not keep(row):
                continue
            matched += 1
            if sample is not None and not sample_keeps(row.file, sample, seed):
                continue
            kept.append(row)
            if limit is not None and len(kept) >= limit:
                stopped = True
                break
    finally:
        close = getattr(candidates, "close", None)
        if close is not None:
            close()  # finish the reader's accounting and release the file now, not at garbage collection

    if reader is None:
        return FilterResult(kept, seen, matched, 0, Counter(), stopped_early=stopped)
    stats = reader.stats
    return FilterResult(
        kept, stats["rows"] + stats["skipped"], matched, stats["skipped"], stats["reasons"], stopped_early=stopped
    )
