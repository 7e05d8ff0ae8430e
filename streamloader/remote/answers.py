"""The REST API's JSON answers, read as they stream in: bounded (:data:`MAX_LISTING_ITEM` bytes a value), a broken
stream a retryable :class:`~streamloader.remote.retry.Transient` failure, an oversized one a
:class:`~streamloader.errors.RemoteError`; paged listings followed to their end (:func:`follow_pages`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional

import requests

from streamloader.errors import PagingError, RemoteError
from streamloader.remote.download import CHUNK
from streamloader.remote.jsonstream import JSONStreamError, JSONTooLarge, iter_json
from streamloader.remote.retry import Transient
from streamloader.remote.transport import TransportError

__all__ = ["MAX_LISTING_ITEM", "MAX_PAGES", "follow_pages", "json_values", "response_chunks", "stream_json"]

MAX_LISTING_ITEM = 1 << 20  # bytes of JSON for one listing entry (real ones are ~300)
MAX_PAGES = 100_000  # pages of one paged listing (100 entries each by default: 10M entries)


def response_chunks(resp: requests.Response) -> Iterator[bytes]:
    """A streamed response's (decoded) body; a dropped connection is retryable."""
    try:
        yield from resp.iter_content(CHUNK)
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError, requests.Timeout) as exc:
        raise Transient(f"connection dropped: {type(exc).__name__}") from None
    except TransportError as exc:  # dropped or too slow (the deadline, see DagsHubClient._get)
        raise Transient(str(exc), outcome=exc.outcome) from None


def stream_json(resp: requests.Response) -> Any:
    """``iter_json`` over a streamed response, with its errors made ours."""
    try:
        return iter_json(response_chunks(resp), max_value=MAX_LISTING_ITEM)
    except JSONTooLarge as exc:
        raise RemoteError(f"answer refused: {exc}") from None
    except JSONStreamError as exc:
        raise Transient(f"invalid JSON answer: {exc}") from None


def json_values(values: Iterator[Any]) -> Iterator[Any]:
    """Values of a streamed JSON answer; a broken stream is retryable, an oversized one is not."""
    try:
        yield from values
    except JSONTooLarge as exc:
        raise RemoteError(f"answer refused: {exc}") from None
    except JSONStreamError as exc:
        raise Transient(f"invalid JSON answer: {exc}") from None


def follow_pages(get_json: Callable[..., Any], url: str, path: str, first: Dict[str, Any],
                 params: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
    """Items of a paged listing, following ``next_token`` (an empty or missing token ends it; a repeated
    token or more than MAX_PAGES pages is a PagingError, not an endless loop). ``params``: what every page
    request sends besides ``from_token`` (default ``paging=true``)."""
    seen: set = set()
    page = first
    for _ in range(MAX_PAGES):
        items = page.get("entries")
        if not isinstance(items, list):
            raise RemoteError("unexpected listing page format", url=url)
        yield from items
        token = page.get("next_token")
        if token is None or token == "":
            return
        token = str(token)
        if token in seen:
            raise PagingError(f"the listing of {path or '/'!r} repeats its paging token {token[:40]!r}",
                              url=url)
        seen.add(token)
        page = get_json(url, "directory listing page", path=path,
                        params={**(params or {"paging": "true"}), "from_token": token})
        if not isinstance(page, dict):
            raise RemoteError("unexpected listing page format", url=url)
    raise PagingError(f"the listing of {path or '/'!r} has more than {MAX_PAGES} pages", url=url)
