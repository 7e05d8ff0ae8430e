"""Typed exceptions raised by streamloader.

Every error a user can act on has its own class, so callers can catch precisely what they handle::

    try:
        fs.cat_file("dagshub://owner/repo/data/labels.tsv")
    except streamloader.AuthenticationError:
        ...
"""
from __future__ import annotations

import errno
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "StreamloaderError",
    "AuthenticationError",
    "InvalidTokenError",
    "RemoteError",
    "HostUnreachableError",
    "RemoteFileNotFoundError",
    "RevisionNotFoundError",
    "RepositoryNotFoundError",
    "PagingError",
    "IntegrityError",
    "CacheError",
    "DataFormatError",
    "MountError",
]

TOKEN_HINT = (
    "Set the DAGSHUB_TOKEN environment variable to a DagsHub access token "
    "(https://dagshub.com/user/settings/tokens), call streamloader.login(token=...), "
    "or run `streamloader login --token ...`."
)


class StreamloaderError(Exception):
    """Base class of every error raised by streamloader."""


class AuthenticationError(StreamloaderError, PermissionError):
    """No usable token, or the server rejected it (HTTP 401/403)."""

    def __init__(self, message: str, *, hint: bool = True):
        super().__init__(f"{message}. {TOKEN_HINT}" if hint else message)


class InvalidTokenError(StreamloaderError, ValueError):
    """A token that cannot be sent (a line break, a space, a control character); raised before any request.

    The message names where the token came from (``DAGSHUB_TOKEN``, "argument", ...), never its value.
    """


def _without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (a last line of defence: URLs are built from clean hosts already)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.rpartition("@")[2] if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class RemoteError(StreamloaderError, OSError):
    """The remote answered with an error we cannot recover from (after retries).

    ``status`` is the HTTP status (None for connection-level failures) and ``url`` never contains credentials.
    """

    def __init__(self, message: str, *, status: Optional[int] = None, url: Optional[str] = None):
        self.status = status
        self.url = url = _without_userinfo(url) if url else url
        details = []
        if status is not None:
            details.append(f"HTTP {status}")
        if url:
            details.append(url)
        text = f"{message} ({', '.join(details)})" if details else message
        # OSError(errno, strerror) would reformat the text; keep the message readable.
        Exception.__init__(self, text)

    def __str__(self) -> str:  # OSError.__str__ would prefix "[Errno ...]"
        return str(self.args[0]) if self.args else ""


class HostUnreachableError(RemoteError):
    """A host failed several requests in a row at the connection level (refused, reset, timed out): requests to it
    fail fast, without retries, until a probe request gets through again. ``host`` is its ``scheme://host:port``."""

    def __init__(self, message: str, *, host: Optional[str] = None):
        super().__init__(message)
        self.host = host

    def __reduce__(self):  # survives pickling (prefetch worker processes send it to their parent)
        return (_rebuild_unreachable, (str(self), self.host))


def _rebuild_unreachable(message: str, host: Optional[str]) -> "HostUnreachableError":
    return HostUnreachableError(message, host=host)


class RemoteFileNotFoundError(StreamloaderError, FileNotFoundError):
    """A repo path does not exist (HTTP 404). Behaves like a local missing file (errno ENOENT)."""

    def __init__(self, path: str):
        FileNotFoundError.__init__(self, errno.ENOENT, "No such file or directory in the remote repository", path)


class PagingError(RemoteError):
    """A paged listing that would never end: its ``next_token`` repeats, or it runs past the page bound."""


class RevisionNotFoundError(StreamloaderError, LookupError):
    """The branch or commit does not exist in the repository."""


class RepositoryNotFoundError(RevisionNotFoundError):
    """The repository itself does not exist (or is not visible with this token): wrong owner, name or host.

    A subclass of RevisionNotFoundError, which is what a missing repository raised before it had its own class.
    """


class IntegrityError(StreamloaderError, OSError):
    """Downloaded bytes do not match the size or hash the server announced."""


class CacheError(StreamloaderError, OSError):
    """The local cache itself failed (its directory vanished for good, or is unsafe to use).

    Never a FileNotFoundError: a skip policy that treats missing files as bad data must not mistake it for one.
    """


class DataFormatError(StreamloaderError, ValueError):
    """Input data (a TSV row, a tar member, an embedding file) is malformed."""


class MountError(StreamloaderError, OSError):
    """A FUSE mount could not be made or removed: no FUSE on this machine, a busy or non-empty mount point, ..."""
