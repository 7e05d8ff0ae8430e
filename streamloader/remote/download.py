"""Reading a file download's body: each answer planned (bytes to skip and to keep, from its ``Content-Length`` and,
for a 206, its ``Content-Range`` checked against the range asked for; a 200 to a ranged request is sliced), copied,
and checked against the size expected (:func:`receive_body`, on :func:`plan_body` and :func:`copy_body`).

:meth:`~streamloader.remote.client.DagsHubClient.download` runs one attempt per answer under its retry policy:
every mismatch here is a :class:`~streamloader.remote.retry.Transient` failure, tried again from the start.
"""
from __future__ import annotations

import re
from typing import Any, BinaryIO, Callable, List, Optional

from streamloader.errors import RemoteError
from streamloader.remote.retry import Transient
from streamloader.remote.transport import TransportError

__all__ = ["CHUNK", "copy_body", "plan_body", "receive_body"]

CHUNK = 1 << 18


def plan_body(body: Any, path: str, start: int, end: Optional[int], ranged: bool):
    """(bytes to skip, bytes to keep or None if unknown, the file's total size or None) for an answer."""
    # a compressed body's Content-Length counts compressed bytes: then only the expected size applies
    encoded = body.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
    length = None
    if not encoded and body.headers.get("Content-Length") is not None:
        try:
            length = int(body.headers["Content-Length"])
            if length < 0:
                raise ValueError
        except ValueError:
            raise Transient(f"invalid Content-Length {str(body.headers['Content-Length'])[:40]!r}") from None
    if not ranged:
        return 0, length, length
    if body.status == 206:
        m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", body.headers.get("Content-Range", ""))
        if not m:
            raise Transient(f"206 without a valid Content-Range for {path!r}")
        first, last = int(m.group(1)), int(m.group(2))
        total = int(m.group(3)) if m.group(3) != "*" else None
        wanted_last = (end - 1) if end is not None else None
        if total is not None and wanted_last is not None:
            wanted_last = min(wanted_last, total - 1)
        if (first != start or last < first or (wanted_last is not None and last != wanted_last)
                or (total is not None and last >= total) or (wanted_last is None and total is not None
                                                              and last != total - 1)):
            raise Transient(f"206 for bytes {first}-{last} of {path!r}, asked for {start}-"
                            f"{'' if end is None else end - 1}")
        if length is not None and length != last - first + 1:
            raise Transient(f"206 Content-Length {length} does not match its Content-Range {first}-{last}")
        return 0, last - first + 1, total
    # 200: the server ignored Range (allowed): keep the asked slice of the whole body
    if length is not None:
        stop = length if end is None else min(end, length)
        return start, max(0, stop - start), length
    return start, (None if end is None else end - start), None


def copy_body(body: Any, fileobj: BinaryIO, skip: int, limit: Optional[int], slicing: bool, path: str,
              url: str) -> int:
    """Copy the body to ``fileobj``, dropping ``skip`` leading bytes and keeping at most ``limit``. Past the
    limit a slice of an ignored-Range answer simply ends; any other body that runs past it is refused at once
    (it cannot be the file asked for, and reading it to its end could mean gigabytes)."""
    written = 0
    try:
        for chunk in body.chunks(CHUNK):
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            if limit is not None and written + len(chunk) > limit:
                if not slicing:
                    raise RemoteError(f"the server sent more than the {limit} bytes expected for {path!r}",
                                      url=url)
                fileobj.write(chunk[:limit - written])
                return limit
            fileobj.write(chunk)
            written += len(chunk)
            if slicing and written == limit:
                return written
    except TransportError as exc:
        raise Transient(str(exc), outcome=exc.outcome) from None
    return written


def receive_body(body: Any, fileobj: BinaryIO, path: str, url: str, start: int, end: Optional[int], ranged: bool,
                 expected_size: Optional[int], on_size: Optional[Callable[[int], None]], mismatches: List[int]) -> int:
    """One download attempt's answer (its status already checked) copied into ``fileobj``, checked on the way
    (see :meth:`~streamloader.remote.client.DagsHubClient.download`); returns the byte count. ``mismatches``: the
    sizes the server stated that differ from ``expected_size``, over the attempts so far (a second one is final)."""
    skip, want, total = plan_body(body, path, start, end, ranged)
    if total is not None and on_size is not None:
        on_size(total)
    limit = want if want is not None else expected_size if not ranged else None
    if expected_size is not None and not ranged and want is not None and want != expected_size:
        mismatches.append(want)
        message = f"{path!r} is {want} bytes on the server, {expected_size} expected"
        if len(mismatches) > 1:  # said twice: not a passing glitch
            raise RemoteError(message, url=url)
        raise Transient(message)
    written = copy_body(body, fileobj, skip, limit, ranged and body.status == 200, path, url)
    if want is not None and written != want:
        raise Transient(f"short body: {written} of {want} bytes")
    if expected_size is not None and not ranged and written != expected_size:
        raise Transient(f"size mismatch: got {written} bytes, expected {expected_size}")
    return written
