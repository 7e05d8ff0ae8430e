"""Repository references: parse ``https://host/owner/repo`` and ``dagshub://owner/repo/path`` forms."""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import SplitResult, quote, unquote, urlsplit

__all__ = ["DEFAULT_HOST", "HOST_ENV", "REPO_URL_FORMS", "RepoLocation", "RepoRef", "default_host", "normalize_host", "parse_repo_location", "safe_repo_path",
           "split_credentials", "split_repo_path"]

#: how a place in a repository may be written (for error messages)
REPO_URL_FORMS = "dagshub://OWNER/REPO[/PATH] or https://HOST/OWNER/REPO[/PATH]"
_WEB_VIEWS = ("src", "raw")  # https://HOST/OWNER/REPO/src/BRANCH/PATH: DagsHub's file browser and raw addresses
DEFAULT_HOST = "https://dagshub.com"
HOST_ENV = "DAGSHUB_CLIENT_HOST"


def split_credentials(url: str) -> Tuple[str, Optional[str]]:
    """``"https://user:TOKEN@host/x"`` → (``"https://host/x"``, ``"TOKEN"``): the URL without its userinfo, and the
    password part (percent-decoded; None without one). A user name alone is dropped, it is no credential."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url, None
    userinfo, _, hostport = authority.rpartition("@")
    _user, colon, password = userinfo.partition(":")
    clean = f"{scheme}{sep}{hostport}{slash}{tail}"
    return clean, (unquote(password) or None) if colon else None


def normalize_host(host: str) -> str:
    """``"dagshub.com/"`` → ``"https://dagshub.com"``; keeps an explicit scheme and port, drops ``user:password@``
    (credentials never become part of a host, so no URL, ``repr`` or message built from one can show them)."""
    host = split_credentials(host.strip())[0]
    if "://" not in host:
        host = "https://" + host
    return host.rstrip("/")


def default_host() -> str:
    """``$DAGSHUB_CLIENT_HOST`` (as the official client reads it) else ``https://dagshub.com``, no trailing slash."""
    return normalize_host(os.environ.get(HOST_ENV) or DEFAULT_HOST)


def safe_repo_path(path: str) -> str:
    """Normalize a repo-relative path and refuse anything that could escape the repo.

    ``"data//a.jpg"`` → ``"data/a.jpg"``; ``"../x"``, ``"/etc/passwd"``, ``"a/../../b"``, NUL or backslashes raise
    ``ValueError``. The empty string is the repo root.
    """
    if (".." not in path and "//" not in path and "\x00" not in path and "\\" not in path and path[:1] != "/"
            and path[-1:] != "/" and "/./" not in path and path[:2] != "./" and path[-2:] != "/." and path != "."):
        return path  # already normal (the common case, asked several times per file by a prefetch)
    if "\x00" in path or "\\" in path:
        raise ValueError(f"invalid repo path {path!r}: NUL and backslash are not allowed")
    if path.startswith("/"):
        raise ValueError(f"invalid repo path {path!r}: absolute paths are not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"invalid repo path {path!r}: '..' segments are not allowed")
    return "/".join(parts)


def split_repo_path(path: str) -> Tuple[str, str, str]:
    """``"owner/repo/data/x.jpg"`` → ``("owner", "repo", "data/x.jpg")`` (protocol already stripped)."""
    parts = path.strip("/").split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"expected 'owner/repo[/path]', got {path!r}")
    owner, repo = parts[0], parts[1]
    return owner, repo, safe_repo_path(parts[2] if len(parts) > 2 else "")


@dataclass(frozen=True)
class RepoRef:
    """One repository on one host: ``RepoRef.parse("https://dagshub.com/owner/repo")``."""

    host: str
    owner: str
    repo: str

    def __post_init__(self) -> None:
        if "@" in self.host.partition("://")[2].partition("/")[0]:
            object.__setattr__(self, "host", normalize_host(self.host))  # never keep credentials in a host

    @classmethod
    def parse(cls, repo_url: str, host: Optional[str] = None) -> "RepoRef":
        """Parse a repo URL (``https://host/owner/repo[.git][/...]``) or ``owner/repo`` with ``host``."""
        if "://" in repo_url and not repo_url.startswith("dagshub://"):
            parts = urlsplit(repo_url)
            if not parts.netloc:
                raise ValueError(f"invalid repo URL {repo_url!r}")
            base = f"{parts.scheme}://{parts.netloc}"
            segments = [s for s in parts.path.split("/") if s]
        else:
            if host is None:
                host = default_host()
            base = host
            segments = [s for s in repo_url.replace("dagshub://", "", 1).split("/") if s]
        if len(segments) < 2:
            raise ValueError(f"invalid repo URL {repo_url!r}: expected .../<owner>/<repo>")
        repo = segments[1][:-4] if segments[1].endswith(".git") else segments[1]
        return cls(normalize_host(base), segments[0], repo)

    @property
    def url(self) -> str:
        return f"{self.host}/{self.owner}/{self.repo}"

    @property
    def api_base(self) -> str:
        return f"{self.host}/api/v1/repos/{quote(self.owner)}/{quote(self.repo)}"

    def api_url(self, *segments: str) -> str:
        """``api_url("raw", sha, "data/a b.jpg")`` → a properly quoted endpoint URL."""
        tail = "/".join(quote(s, safe="/") for s in segments)
        return f"{self.api_base}/{tail}"

    def __str__(self) -> str:
        return f"{self.owner}/{self.repo}@{self.host}"


@dataclass(frozen=True)
class RepoLocation:
    """A place in a repository named by a URL: the repository, a repo-relative ``path`` and, when the URL named
    one (a web-UI address), a ``revision`` (branch name or commit)."""

    ref: RepoRef
    path: str = ""
    revision: Optional[str] = None

    @property
    def dagshub_url(self) -> str:
        """``dagshub://OWNER/REPO[/PATH]`` (the host is not part of a dagshub:// URL)."""
        return f"dagshub://{self.ref.owner}/{self.ref.repo}" + (f"/{self.path}" if self.path else "")


def parse_repo_location(url: str, host: Optional[str] = None) -> RepoLocation:
    """Read a place in a repository from any form a user pastes; ``ValueError`` (naming the forms) otherwise.

    ``https://HOST/OWNER/REPO[.git][/PATH]`` takes its host from the URL (credentials, query and fragment are
    dropped); a DagsHub web-UI address ``https://HOST/OWNER/REPO/src/BRANCH/PATH`` (or ``/raw/``) also gives the
    revision BRANCH. ``dagshub://OWNER/REPO[/PATH]`` uses ``host`` (default ``$DAGSHUB_CLIENT_HOST`` or
    https://dagshub.com)::

        parse_repo_location("https://dagshub.com/o/r/data").dagshub_url     # "dagshub://o/r/data"
    """
    text = url.strip()
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        if not parts.hostname:
            raise ValueError(f"invalid repository URL {_shown(parts)!r}: no host; use {REPO_URL_FORMS}")
        hostname = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        base = f"{parts.scheme}://{hostname}" + (f":{parts.port}" if parts.port else "")
        segments = [s for s in parts.path.split("/") if s]
    elif text.startswith("dagshub://"):
        if host is None:
            host = default_host()
        base, segments = host, [s for s in text[len("dagshub://"):].split("/") if s]
    else:
        raise ValueError(f"not a repository URL: {text!r}; use {REPO_URL_FORMS}")
    if len(segments) < 2:
        raise ValueError(f"{_shown(urlsplit(text))!r} names no repository: use {REPO_URL_FORMS}")
    owner, repo = segments[0], segments[1][:-4] if segments[1].endswith(".git") else segments[1]
    rest, revision = segments[2:], None
    if text.startswith("http") and len(rest) >= 2 and rest[0] in _WEB_VIEWS:
        revision, rest = rest[1], rest[2:]
    return RepoLocation(RepoRef(normalize_host(base), owner, repo), safe_repo_path("/".join(rest)), revision)


def _shown(parts: "SplitResult") -> str:
    """A URL without its credentials, query and fragment (safe to print)."""
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


def parent_dir(path: str) -> str:
    """Parent of a repo path ('' for top-level entries)."""
    return posixpath.dirname(path)
