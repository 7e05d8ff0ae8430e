"""One ``labels.tsv`` row: :class:`LabelRow`, and the per-line parser that is the authority on what is valid and
why not (:func:`parse_checked`; the vectorised checks of :mod:`streamloader.data.labelscan` accept a strict subset,
whose lines :func:`fast_rows` splits without checking), and the check a row passes before it is written
(:func:`row_problem`). Read and write files with :mod:`streamloader.data.labels`, where the public names are.
"""
from __future__ import annotations

import math
import re
from typing import List, NamedTuple, Optional, Union

from streamloader.errors import DataFormatError

__all__ = ["LabelRow", "fast_rows", "file_name_problem", "parse_checked", "parse_label_line", "preview",
           "row_problem"]


class LabelRow(NamedTuple):
    """One labels.tsv row: image file name (relative to ``data/``), caption, aesthetic score, source URL."""

    file: str
    caption: str
    score: float
    url: str


# tuple.__new__ is a C call; LabelRow(...) goes through a Python-level __new__ and is ~3x slower in the hot loop.
_new_tuple = tuple.__new__

# --- per-line parsing: the authority on what is valid and why not --------------------------------------------------
_SCORE_RE = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_NAN_RE = re.compile(r"\s*[+-]?nan\s*", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SEPARATOR_RE = re.compile(r"[/\\]")


def file_name_problem(name: str) -> Optional[str]:
    """Why ``name`` is not a safe relative file name, or None when it is (absolute, ``..``, control chars or a
    leading BOM are not)."""
    if not name.strip():
        return "empty file name"
    if name[0] == "\ufeff":  # a BOM left at the start of a later line, e.g. by concatenating two labels files
        return "BOM at start of file name"
    if _CONTROL_RE.search(name):
        return "control character in file name"
    if name[0] in "/\\" or (len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha()):
        return "absolute file name"
    if ".." in _SEPARATOR_RE.split(name):
        return "'..' in file name"
    return None


def parse_checked(line: str) -> Union[LabelRow, str]:
    """The row for one line (no line end), or the reason it is malformed."""
    parts = line.rsplit("\t", 2)
    if len(parts) < 3 or "\t" not in parts[0]:
        return "too few fields"
    head, score_text, url = parts
    file, _, caption = head.partition("\t")
    problem = file_name_problem(file)
    if problem:
        return problem
    if not _SCORE_RE.fullmatch(score_text):
        return "nan score" if _NAN_RE.fullmatch(score_text) else "non-numeric score"
    score = float(score_text)
    if not math.isfinite(score):
        return "non-finite score"
    return _new_tuple(LabelRow, (file, caption, score, url))


def parse_label_line(line: str) -> LabelRow:
    """Parse one labels.tsv line (a trailing ``\\n``, ``\\r\\n`` or ``\\r`` is ignored); raise DataFormatError if
    malformed, or if the text holds a line end before that (it is more than one line).

    >>> parse_label_line("a.jpg\\tA cat\\twith tabs\\t7.5\\thttp://x/a.jpg")
    LabelRow(file='a.jpg', caption='A cat\\twith tabs', score=7.5, url='http://x/a.jpg')
    """
    text = line.removesuffix("\n").removesuffix("\r")
    result = "line end inside the line" if "\r" in text or "\n" in text else parse_checked(text)
    if isinstance(result, str):
        raise DataFormatError(f"{result}: {preview(line)}")
    return result


def preview(line: str, width: int = 80) -> str:
    return repr(line if len(line) <= width else line[:width] + "...")


def fast_rows(data: bytes, start: int, end: int) -> List[LabelRow]:
    """Rows of the lines data[start:end] (end just past a "\\n") that the vectorised checks vouched for."""
    rows = []
    append = rows.append
    for line in data[start : end - 1].decode("utf-8").split("\n"):
        head, score, url = line.rsplit("\t", 2)
        file, _, caption = head.partition("\t")
        append(_new_tuple(LabelRow, (file, caption, float(score), url)))
    return rows


def row_problem(row: LabelRow) -> Optional[str]:
    """Why ``row`` cannot be written so that it reads back identically (None when it can)."""
    file, caption, score, url = row
    problem = file_name_problem(file)
    if problem:
        return problem
    if "\n" in caption or "\r" in caption:
        return "line end (LF or CR) in caption"
    if "\t" in url or "\n" in url or "\r" in url:
        return "tab or line end (LF or CR) in url"
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"score must be a finite number, got {score!r}"
    return None
