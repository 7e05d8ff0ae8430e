"""Read and write LAION-Aesthetics style ``labels.tsv`` files, fast and strictly.

Format: no header; ``file <TAB> caption <TAB> score <TAB> url``, where the caption may itself
contain tabs. The file name is the first field, score and url are the LAST two fields, the caption is everything
in between (so ``row.split('\\t')[:2]``, as in the DagsHub guide, is wrong for such rows)::

    reader = read_labels("data/labels.tsv", on_error="warn")
    for row in reader:                 # LabelRow(file, caption, score, url)
        ...
    reader.stats                       # {'rows': 540000, 'skipped': 0, 'blank': 0, 'reasons': Counter()}

Malformed rows (too few fields, an empty or unsafe file name, a non-numeric / ``nan`` / infinite score, bytes that
do not decode) follow ``on_error``: ``raise`` a DataFormatError naming the 1-based line, ``skip`` and count, or
``warn`` (count and log the first few). Blank lines are not rows and not errors; a line over 16 MiB always
raises. Line ends are Python's universal newlines: ``\\r\\n``, a lone ``\\r`` and ``\\n`` each end a line (other
Unicode line breaks may appear in captions); a missing final newline is accepted. A UTF-8 BOM is stripped at the
start of the file only: a BOM starting a later line (two files concatenated) is a malformed row.

Speed: the file is read in blocks of whole lines; each block is checked for UTF-8 and line structure by a few
vectorised numpy passes (:mod:`streamloader.data.labelscan`), and only the lines those checks cannot vouch for go
through the per-line parser that names the reason (:mod:`streamloader.data.labelrows`, with :class:`LabelRow`).
The vectorised rules accept a strict subset of what the per-line parser accepts, so a line they accept needs no
per-line check; a keyword filter then parses only candidate lines.
"""
from __future__ import annotations

import builtins
import codecs
import contextlib
import logging
import os
import re
from collections import Counter
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

from streamloader.data.labelrows import (LabelRow, fast_rows, file_name_problem, parse_checked, parse_label_line,
                                          preview, row_problem)
from streamloader.data.labelscan import scan_block
from streamloader.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "LabelRow",
    "LabelReader",
    "read_labels",
    "write_labels",
    "parse_label_line",
    "file_name_problem",
    "ON_ERROR_POLICIES",
]

ON_ERROR_POLICIES = ("raise", "skip", "warn")
WARN_LIMIT = 10  # warn: log this many malformed rows one by one, then only a summary at the end
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: the scan's temporary arrays stay in cache (4 MiB blocks ran ~1.7x slower)
MAX_LINE_BYTES = 16 << 20  # a longer "line" means this is not a labels file; raised whatever on_error says

Source = Union[str, "os.PathLike[str]", IO[bytes]]

_USERINFO_RE = re.compile(r"(://)[^/@]*@")


# A line the vectorised checks did not vouch for: (start, end incl. "\n", 1-based line number, row, reason, text).
# row set: valid after all; reason set: malformed; neither: a blank line.
_Special = Tuple[int, int, int, Optional[LabelRow], Optional[str], str]


class _Block(NamedTuple):
    data: bytes  # UTF-8, "\n" line ends, ends with "\n"
    ends: Any  # numpy array: the offset of every "\n"
    specials: List[_Special]


# What the block reader hands on: the UTF-8 block, its undecodable lines, and scan_block's (ends, suspects).
_Prepared = Tuple[bytes, Dict[int, bytes], Tuple[Any, Any]]


def _classify(prepared: _Prepared, line_base: int, encoding: str) -> _Block:
    """Classify every line of a block that the vectorised checks do not prove valid."""
    data, undecodable, (ends, suspects) = prepared
    specials: List[_Special] = []
    for index in suspects.tolist():
        start = int(ends[index - 1]) + 1 if index else 0
        line_end = int(ends[index]) + 1
        lineno = line_base + index + 1
        if start in undecodable:
            raw = undecodable[start].decode(encoding, "replace")
            specials.append((start, line_end, lineno, None, f"undecodable bytes ({encoding})", raw))
            continue
        line = data[start : line_end - 1].decode("utf-8")
        result = parse_checked(line) if line.strip() else None
        if isinstance(result, str):
            specials.append((start, line_end, lineno, None, result, line))
        else:
            specials.append((start, line_end, lineno, result, None, line))
    return _Block(data, ends, specials)


@contextlib.contextmanager
def _open_source(source: Source, storage_options: Optional[Mapping[str, Any]]) -> Iterator[IO[bytes]]:
    """Open a path with builtins.open (so installed hooks see it), a URL with fsspec; pass file objects through."""
    if hasattr(source, "read"):
        yield source  # type: ignore[misc]  # caller owns it
        return
    path = os.fsdecode(os.fspath(source))  # type: ignore[arg-type]
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb", **dict(storage_options or {})) as handle:
            yield handle
    else:
        if storage_options:
            log.debug("storage_options ignored for local path %s", path)
        # Looked up on the builtins module at call time on purpose: streamloader's hooks patch builtins.open.
        with builtins.open(path, "rb") as handle:
            yield handle


def _check_encoding(encoding: str) -> str:
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    if name in ("utf-8", "utf-8-sig"):
        return "utf-8"  # the BOM is stripped once at the start of the file, never mid-file
    if "\r\n\t".encode(name) != b"\r\n\t":
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible; labels files must be")
    return name


class LabelReader:
    """Iterable over the rows of a labels.tsv (path, fsspec URL or binary file object), with malformed-row stats.

    Every iteration re-opens the source and resets ``stats`` (a file object is read from where it is, once)::

        reader = LabelReader("dagshub://owner/repo/data/labels.tsv", on_error="skip")
        rows = list(reader)
        reader.stats["skipped"], reader.stats["reasons"]
    """

    def __init__(
        self,
        source: Source,
        on_error: str = "raise",
        *,
        storage_options: Optional[Mapping[str, Any]] = None,
        encoding: str = "utf-8",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_POLICIES)}; got {on_error!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
        self.source = source
        self.on_error = on_error
        self.storage_options = dict(storage_options or {})
        self.encoding = _check_encoding(encoding)
        self.chunk_size = chunk_size
        self._reset_stats()

    @property
    def name(self) -> str:
        """A printable name of the source (for messages)."""
        if hasattr(self.source, "read"):
            return str(getattr(self.source, "name", "<stream>"))
        # never echo credentials embedded in a URL (https://user:token@host/...)
        return _USERINFO_RE.sub(r"\1", os.fsdecode(os.fspath(self.source)))  # type: ignore[arg-type]

    @property
    def stats(self) -> Dict[str, Any]:
        """Counts for the rows read so far: rows (valid), skipped (malformed), blank lines, reasons (Counter)."""
        return {"rows": self._rows, "skipped": self._skipped, "blank": self._blank, "reasons": Counter(self._reasons)}

    def __repr__(self) -> str:
        return f"LabelReader({self.name!r}, on_error={self.on_error!r})"

    def __iter__(self) -> Iterator[LabelRow]:
        return self._iterate(None)

    def iter_selected(self, select_lines: Callable[[bytes], Iterable[int]]) -> Iterator[LabelRow]:
        """Yield only the rows on lines that ``select_lines`` picks; every row is still validated and counted.

        ``select_lines(block)`` gets each block of whole lines as UTF-8 bytes (LF line ends, ending with b"\\n")
        and returns the start offsets of the lines to parse, ascending — a fast pre-filter hook (see
        :func:`streamloader.data.filters.keyword_line_starts`).
        """
        return self._iterate(select_lines)

    # -- internals -------------------------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._rows = self._skipped = self._blank = 0
        self._reasons: Counter = Counter()
        self._lines = 0  # lines in the blocks handed out so far (line numbers of the next block start after them)

    def _iterate(self, select_lines: Optional[Callable[[bytes], Iterable[int]]]) -> Iterator[LabelRow]:
        self._reset_stats()
        try:
            with _open_source(self.source, self.storage_options) as handle:
                for prepared in self._blocks(handle):
                    block = _classify(prepared, self._lines, self.encoding)
                    self._lines += len(block.ends)
                    if select_lines is None:
                        yield from self._all_rows(block.data, block.specials)
                    else:
                        yield from self._selected_rows(block, select_lines(block.data))
        finally:
            if self.on_error == "warn" and self._skipped > WARN_LIMIT:
                log.warning(
                    "%s: %d malformed rows skipped in all (%d not logged one by one): %s",
                    self.name, self._skipped, self._skipped - WARN_LIMIT, dict(self._reasons),
                )

    def _blocks(self, handle: IO[bytes]) -> Iterator[_Prepared]:
        """Yield (UTF-8 LF-only bytes ending in "\\n", undecodable lines, scan) for runs of whole lines."""
        carry, first = b"", True
        while True:
            chunk = handle.read(self.chunk_size)
            if not chunk:
                break
            # Cut after the last line end of carry + chunk (carry holds none, but for maybe a final "\r"); a final
            # "\r" may be the first half of a "\r\n": it waits for more. Found in chunk alone: one copy per block.
            end = len(chunk) - 1 if chunk.endswith(b"\r") else len(chunk)
            cut = max(chunk.rfind(b"\n", 0, end), chunk.rfind(b"\r", 0, end)) + 1
            if cut:
                block = b"".join((carry, memoryview(chunk)[:cut])) if carry or cut < len(chunk) else chunk
                carry = chunk[cut:]
            elif carry.endswith(b"\r"):  # not followed by "\n" (that would be a cut in chunk): a line end
                block, carry = carry, chunk
            else:
                carry += chunk
                if len(carry) > MAX_LINE_BYTES:  # not a labels file (or a corrupt one): don't buffer it all
                    raise DataFormatError(
                        f"{self.name}: line {self._lines + 1}: longer than {MAX_LINE_BYTES:,} bytes; not a labels.tsv?"
                    )
                continue
            prepared = self._prepare(block, first)
            first = False
            yield prepared
        if carry:  # the last line has no line end (or a lone "\r")
            yield self._prepare(carry + b"\n", first)

    def _prepare(self, block: bytes, first: bool) -> _Prepared:
        """Validate (and for other encodings, transcode) a block; undecodable lines are blanked with NULs so the
        vectorised checks reject them, and returned by start offset with their raw bytes."""
        if first and self.encoding == "utf-8" and block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8) :]
        if b"\r" in block:  # universal newlines: "\r\n" and a lone "\r" end a line like "\n" does
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self.encoding == "utf-8":
            scanned = scan_block(block)  # checks UTF-8 too, several times faster than decoding the block
            if scanned is not None:
                return block, {}, scanned
        try:
            text = block.decode(self.encoding)  # C-speed validation; the text itself is only kept to transcode
        except UnicodeDecodeError:
            data, undecodable = self._prepare_lines(block)
        else:
            data, undecodable = (block if self.encoding == "utf-8" else text.encode("utf-8")), {}
        return data, undecodable, scan_block(data, check_utf8=False)  # type: ignore[return-value]

    def _prepare_lines(self, block: bytes) -> Tuple[bytes, Dict[int, bytes]]:
        lines, undecodable, pos = [], {}, 0
        for raw in block.split(b"\n")[:-1]:
            try:
                text = raw.decode(self.encoding)
                line = raw if self.encoding == "utf-8" else text.encode("utf-8")
            except UnicodeDecodeError:
                undecodable[pos] = raw
                line = b"\x00" * len(raw)
            lines.append(line)
            pos += len(line) + 1
        lines.append(b"")
        return b"\n".join(lines), undecodable

    def _malformed(self, lineno: int, reason: str, line: str) -> None:
        if self.on_error == "raise":
            raise DataFormatError(f"{self.name}: line {lineno}: {reason}: {preview(line)}")
        self._skipped += 1
        self._reasons[reason] += 1
        if self.on_error == "warn" and self._skipped <= WARN_LIMIT:
            log.warning("%s: line %d: %s (row skipped): %s", self.name, lineno, reason, preview(line))

    def _special(self, special: _Special) -> Optional[LabelRow]:
        """Account for one rejected line; return its row when the per-line parser found it valid after all."""
        _, _, lineno, row, reason, line = special
        if row is not None:
            self._rows += 1
        elif reason is None:
            self._blank += 1
        else:
            self._malformed(lineno, reason, line)
        return row

    def _all_rows(self, data: bytes, specials: List[_Special]) -> Iterator[LabelRow]:
        pos = 0
        for special in specials + [(len(data), len(data), 0, None, None, "")]:
            start = special[0]
            if start > pos:
                for row in fast_rows(data, pos, start):
                    self._rows += 1  # per row, so stats stay exact when the consumer stops early
                    yield row
            if start == len(data):
                break
            row = self._special(special)
            if row is not None:
                yield row
            pos = special[1]

    def _selected_rows(self, block: _Block, starts: Iterable[int]) -> Iterator[LabelRow]:
        data, ends, specials = block
        starts = list(starts)
        indices = ends.searchsorted(starts).tolist() if starts else []  # the line of each start
        by_start = {special[0]: special for special in specials}
        counted_to = counted_lines = next_special = 0

        def count_up_to(pos: int, lines_before_pos: int) -> None:
            # Account for every line in data[counted_to:pos] before anything at or after pos is yielded.
            nonlocal counted_to, counted_lines, next_special
            lines = lines_before_pos - counted_lines
            while next_special < len(specials) and specials[next_special][0] < pos:
                lines -= 1
                self._special(specials[next_special])
                next_special += 1
            self._rows += lines
            counted_to, counted_lines = pos, lines_before_pos

        for start, index in zip(starts, indices):
            if start < counted_to or start >= len(data) or (start and data[start - 1] != 10):
                raise ValueError(f"select_lines returned {start}: not the start of a later line")
            end = int(ends[index]) + 1
            count_up_to(end, index + 1)
            special = by_start.get(start)
            if special is None:
                yield fast_rows(data, start, end)[0]
            elif special[3] is not None:
                yield special[3]
        count_up_to(len(data), len(ends))


def read_labels(
    path_or_url: Source,
    on_error: str = "raise",
    *,
    storage_options: Optional[Mapping[str, Any]] = None,
    encoding: str = "utf-8",
) -> LabelReader:
    """Stream the rows of a labels.tsv; the returned LabelReader is iterable and keeps ``stats``.

    Usage::

        reader = read_labels("data/labels.tsv", on_error="skip")   # or "memory://…", "dagshub://owner/repo/…"
        squirrels = [row.file for row in reader if "squirrel" in row.caption.lower()]
        reader.stats["skipped"], reader.stats["reasons"]
    """
    return LabelReader(path_or_url, on_error, storage_options=storage_options, encoding=encoding)


def write_labels(rows: Iterable[LabelRow], path_or_fileobj: Union[str, "os.PathLike[str]", IO[str]]) -> int:
    """Write rows as a 4-column labels.tsv (captions keep their tabs; reads back identically); return the count.

    A row that could not round-trip (unsafe file name, a line end in the caption, a tab or line end in the url,
    non-finite score) raises DataFormatError before anything is written for it. Paths with "://" are opened with fsspec.

    Usage: ``write_labels(filter_labels("data/labels.tsv", "squirrel").rows, "squirrels.tsv")`` → 115.
    """
    if hasattr(path_or_fileobj, "write"):
        return _write_rows(rows, path_or_fileobj)  # type: ignore[arg-type]
    path = os.fsdecode(os.fspath(path_or_fileobj))  # type: ignore[arg-type]
    if "://" in path:
        import fsspec

        with fsspec.open(path, "w", encoding="utf-8", newline="\n") as handle:
            return _write_rows(rows, handle)
    with builtins.open(path, "w", encoding="utf-8", newline="\n") as handle:
        return _write_rows(rows, handle)


def _write_rows(rows: Iterable[LabelRow], handle: IO[str]) -> int:
    count = 0
    for count, row in enumerate(rows, 1):
        problem = row_problem(row)
        if problem:
            raise DataFormatError(f"cannot write row {count} ({problem}): {row!r}")
        # repr() of a float reads back to the identical float
        handle.write(f"{row[0]}\t{row[1]}\t{float(row[2])!r}\t{row[3]}\n")
    return count
