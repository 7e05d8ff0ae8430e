"""Request-path routing, Range parsing and the HTTP error of the local server (pure code, no I/O)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["Route", "parse_route", "parse_range", "Unsatisfiable", "HTTPError"]


class HTTPError(Exception):
    """Answer ``status`` with a JSON ``{"message": ...}`` body."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


DEFAULT_PAGE = 100  # entries per page of a paged listing, as DagsHub's


def page_bounds(query: Dict[str, List[str]]) -> Tuple[int, int]:
    """``(start, limit)`` of a paged listing request (``from_token`` is an offset here); HTTPError 400 if bad."""
    try:
        limit = int(query.get("limit", [str(DEFAULT_PAGE)])[-1])
        start = int(query.get("from_token", ["0"])[-1] or 0)
    except ValueError:
        raise HTTPError(400, "limit and from_token must be integers") from None
    if limit <= 0 or start < 0:
        raise HTTPError(400, "limit must be > 0 and from_token >= 0")
    return start, limit


class Unsatisfiable(Exception):
    """A Range header that selects no byte of the file (answer 416)."""


def parse_range(header: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """Inclusive (start, end) of a single ``bytes=`` range, None to send the whole file; raises Unsatisfiable.

    Malformed or multi-range headers are ignored (RFC 9110 allows answering them with the whole file).
    Example: ``parse_range("bytes=-2", 10) == (8, 9)``.
    """
    if not header or not header.strip().lower().startswith("bytes="):
        return None
    spec = header.strip()[6:].strip()
    first, sep, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if "," in spec or not sep or not (first.isdigit() or (not first and last.isdigit())):
        return None
    if last and not last.isdigit():
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)


@dataclass
class Route:
    """What a request path asks for; ``key`` is what the counters file it under (repo path, branch, sha, "")."""

    kind: str
    action: str = ""
    owner: str = ""
    repo: str = ""
    rev: str = ""
    key: str = ""


def parse_route(path: str) -> Route:
    """Classify a URL-decoded request path (no query string)."""
    parts = path.split("/")[1:]
    if parts[:3] == ["api", "v1", "user"] and len(parts) == 3:
        return Route("user", "self")
    if parts[:3] == ["api", "v1", "users"] and len(parts) == 4:
        return Route("user", "named", key=parts[3])
    if len(parts) == 3 and parts[:2] == ["login", "oauth"]:
        return Route("oauth", parts[2])
    if parts[:3] != ["api", "v1", "repos"] or len(parts) < 5:
        return Route("other")
    owner, repo, rest = parts[3], parts[4], parts[5:]
    if not rest or rest == [""]:
        return Route("repo", "record", owner, repo)
    action, args = rest[0], rest[1:]
    if action in ("content", "raw"):
        rev = args[0] if args else ""
        key = "/".join(args[1:])
        # "content/main/data/" and "content/main/data" are one directory: count them under one key
        return Route(action, action, owner, repo, rev, key[:-1] if key.endswith("/") else key)
    if action == "branches":
        return Route("branches", "branch" if args and args != [""] else "list", owner, repo, key="/".join(args))
    if action == "commits" and args:
        return Route("commits", "commit", owner, repo, key="/".join(args))
    if action == "storage":
        if not args or args == [""]:
            return Route("storage", "list", owner, repo)
        key = "/".join(args)
        # "content/s3/b/dir/" and "content/s3/b/dir" are one folder: one key (what the counters file it under)
        return Route("storage", args[0] if args[0] in ("content", "raw") else "sub", owner, repo,
                     key=key[:-1] if key.endswith("/") else key)
    return Route("other", "", owner, repo)
