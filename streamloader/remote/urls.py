"""Repository references: parse ``https://host/owner/repo`` and ``dagshub://owner/repo/path`` forms."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import quote, unquote, urlsplit

__all__ = ["RepoRef", "normalize_host", "safe_repo_path", "split_credentials", "split_repo_path"]


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


def safe_repo_path(path: str) -> str:
    """Normalize a repo-relative path and refuse anything that could escape the repo.

    ``"data//a.jpg"`` → ``"data/a.jpg"``; ``"../x"``, ``"/etc/passwd"``, ``"a/../../b"``, NUL or backslashes raise
    ``ValueError``. The empty string is the repo root.
    """
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
                from streamloader.auth import default_host

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


def parent_dir(path: str) -> str:
    """Parent of a repo path ('' for top-level entries)."""
    return posixpath.dirname(path)
