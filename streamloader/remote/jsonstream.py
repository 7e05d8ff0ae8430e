"""Parse a JSON answer as it streams in: the items of a top-level array one by one, with bounded memory.

dagshub.com answers a folder listing as ONE JSON array however large the folder (~250 MB for 540k entries).
``json.loads`` of that costs ~1 GB of memory; :func:`iter_json` yields each item as soon as its bytes arrived,
holding only the current piece of text. Items are decoded by the standard library's C decoder
(``JSONDecoder.raw_decode``), so no new dependency is needed for a few microseconds per item.

Usage::

    first, items = iter_json(body.chunks(1 << 18))
    if first == "[":
        for item in items: ...
    else:
        obj = next(items)               # a single object (a file path, or a paged listing)
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Any, Iterable, Iterator, Tuple

__all__ = ["iter_json", "JSONStreamError", "JSONTooLarge"]

_WS = " \t\r\n"
_skip_ws = re.compile(r"[ \t\r\n]*").match
_number_tail = re.compile(r"[0-9.eE+\-]*").match


class JSONStreamError(ValueError):
    """The streamed answer is not the JSON it should be (invalid or cut short)."""


class JSONTooLarge(JSONStreamError):
    """One value of the answer, or the whole answer, is larger than allowed."""


def iter_json(chunks: Iterable[bytes], max_value: int = 1 << 20, max_single: int = 64 << 20,
              max_total: int = 16 << 30) -> Tuple[str, Iterator[Any]]:
    """``("[", items)`` for a top-level array (items decoded one at a time), else ``(first character, iterator
    of the one value)``. ``max_value`` bounds the text of one array item, ``max_single`` a non-array answer,
    ``max_total`` the whole decoded answer; past any a :class:`JSONTooLarge` is raised, so a hostile server
    (or a small gzip bomb) cannot exhaust memory."""
    source = iter(chunks)
    decode = codecs.getincrementaldecoder("utf-8")().decode
    state = {"total": 0}

    def more() -> str:
        for chunk in source:
            state["total"] += len(chunk)
            if state["total"] > max_total:
                raise JSONTooLarge(f"answer larger than {max_total} bytes")
            try:
                text = decode(chunk)
            except UnicodeDecodeError as exc:  # (a ValueError: fs.exists would take it for "missing")
                raise JSONStreamError(f"the answer is not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if text:
                return text
        try:
            return decode(b"", True)
        except UnicodeDecodeError as exc:
            raise JSONStreamError(f"the answer is not UTF-8 ({exc.reason})") from None

    buf = ""
    while True:
        buf = buf.lstrip(_WS)
        if buf:
            break
        text = more()
        if not text:
            raise JSONStreamError("empty answer")
        buf += text
    if buf[0] == "\ufeff":
        buf = buf[1:]
    if buf[:1] == "[":
        return "[", _array_items(buf, more, max_value)
    return buf[:1], _single_value(buf, more, max_single)


def _single_value(buf: str, more: Any, max_value: int) -> Iterator[Any]:
    parts = [buf]
    size = len(buf)
    while True:
        text = more()
        if not text:
            break
        size += len(text)
        if size > max_value:
            raise JSONTooLarge(f"JSON value larger than {max_value} bytes")
        parts.append(text)
    try:
        yield json.loads("".join(parts))
    except ValueError as exc:
        raise JSONStreamError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise JSONStreamError("JSON nested too deeply") from None


def _array_items(buf: str, more: Any, max_value: int) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    raw_decode = decoder.raw_decode
    pos = 1  # past "["
    expect_value = True  # right after "[" or ",": a value (or, after "[", the closing "]")
    first = True
    eof = False
    while True:
        # skip white space, refilling as needed
        n = len(buf)
        pos = _skip_ws(buf, pos).end()
        if pos >= n:
            if eof:
                raise JSONStreamError("the JSON array ends before its closing bracket")
            text = more()
            buf, pos = buf[pos:] + text, 0
            eof = not text
            continue
        ch = buf[pos]
        if not expect_value:
            if ch == ",":
                pos += 1
                expect_value = True
                continue
            if ch == "]":
                _expect_end(buf[pos + 1:], more)
                return
            raise JSONStreamError(f"expected ',' or ']' in the JSON array, got {ch!r}")
        if ch == "]" and first:
            _expect_end(buf[pos + 1:], more)
            return
        try:
            value, end = raw_decode(buf, pos)
        except RecursionError:
            raise JSONStreamError("JSON nested too deeply in the array") from None
        except ValueError:
            # incomplete value (or invalid): read more unless the value is already too big or the answer ended
            if eof:
                raise JSONStreamError("invalid or truncated JSON value in the array") from None
            if len(buf) - pos > max_value:
                raise JSONTooLarge(f"JSON value larger than {max_value} bytes") from None
            text = more()
            buf, pos = buf[pos:] + text, 0
            eof = not text
            continue
        if not eof and isinstance(value, (int, float)) and _number_tail(buf, end).end() == len(buf):
            # a number may continue in the next chunk ("12" + "34", "-1." + "5"): read on before trusting it
            text = more()
            buf, pos = buf[pos:] + text, 0
            eof = not text
            continue
        pos = end
        expect_value = first = False
        yield value


def _expect_end(rest: str, more: Any) -> None:
    while True:
        if rest.strip(_WS):
            raise JSONStreamError("unexpected data after the JSON array")
        rest = more()
        if not rest:
            return
