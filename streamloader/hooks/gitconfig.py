"""The DagsHub repository a local git checkout belongs to: its ``origin`` remote URL and checked-out branch.

Read straight from ``.git/config`` and ``.git/HEAD`` (no git binary needed)::

    find_git_root("/work/proj/src")            # "/work/proj" (the nearest ancestor holding .git), or None
    remote_from_git("/work/proj")              # ("https://dagshub.com/owner/repo", "main", None)
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

__all__ = ["find_git_root", "git_dir", "remote_from_git", "clean_repo_url", "normalize_repo_url"]

#: the forms install_hooks(repo_url=...) accepts (for error messages)
REPO_URL_ARGUMENT_FORMS = "https://HOST/OWNER/REPO, OWNER/REPO or dagshub://OWNER/REPO"

_SECTION = re.compile(r'^\s*\[\s*remote\s+"(?P<name>[^"]+)"\s*\]')
_ANY_SECTION = re.compile(r"^\s*\[")
_URL = re.compile(r"^\s*url\s*=\s*(?P<url>\S+)\s*$", re.IGNORECASE)
_OWNER_REPO = re.compile(r"\w[\w.-]*/\w[\w.-]*/?")  # DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus
_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>[^/].*)$")  # git@dagshub.com:owner/repo.git


def find_git_root(start: str) -> Optional[str]:
    """The nearest directory at or above ``start`` that holds a ``.git`` entry, or None."""
    current = os.path.abspath(start)
    while True:
        if os.path.exists(os.path.join(current, ".git")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def git_dir(root: str) -> Optional[str]:
    """The git directory of a checkout: ``root/.git``, or where a ``.git`` file (worktree, submodule) points."""
    dot_git = os.path.join(root, ".git")
    if os.path.isdir(dot_git):
        return dot_git
    try:
        with open(dot_git, encoding="utf-8") as f:
            line = f.readline().strip()
    except OSError:
        return None
    if not line.startswith("gitdir:"):
        return None
    target = line[len("gitdir:"):].strip()
    return os.path.normpath(os.path.join(root, target))


def _config_paths(gdir: str) -> List[str]:
    paths = [os.path.join(gdir, "config")]
    try:  # a worktree keeps its config in the main repository's git dir
        with open(os.path.join(gdir, "commondir"), encoding="utf-8") as f:
            paths.append(os.path.join(os.path.normpath(os.path.join(gdir, f.read().strip())), "config"))
    except OSError:
        pass
    return paths


def _remotes(config_text: str) -> List[Tuple[str, str]]:
    remotes, current = [], None
    for line in config_text.splitlines():
        section = _SECTION.match(line)
        if section:
            current = section.group("name")
            continue
        if _ANY_SECTION.match(line):
            current = None
            continue
        url = _URL.match(line)
        if current is not None and url:
            remotes.append((current, url.group("url")))
    return remotes


def clean_repo_url(url: str) -> Tuple[str, Optional[str]]:
    """``https://user:pw@host/owner/repo.git`` → (``https://host/owner/repo``, ``"pw"``); ssh forms → https."""
    url = url.strip()
    if "://" not in url:
        scp = _SCP_LIKE.match(url)
        if scp:
            url = f"https://{scp.group('host')}/{scp.group('path')}"
    parts = urlsplit(url)
    web = parts.scheme in ("http", "https")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port and web:  # an ssh port means nothing to the web API
        host = f"{host}:{parts.port}"
    path = parts.path.rstrip("/")
    if path.endswith(".git"):
        path = path[:-4]
    return urlunsplit((parts.scheme if web else "https", host, path, "", "")), parts.password


def normalize_repo_url(url: str) -> Tuple[str, Optional[str]]:
    """``install_hooks(repo_url=...)`` → (``https://host/owner/repo``, password from the URL or None).

    Accepts a repo URL (credentials and ``.git`` stripped), an ssh remote (``git@host:owner/repo.git``),
    ``dagshub://OWNER/REPO`` and ``OWNER/REPO``; the last two take ``$DAGSHUB_CLIENT_HOST`` or https://dagshub.com
    as host. Anything else raises ``ValueError`` naming the accepted forms (never echoing a password).
    """
    from streamloader.remote.urls import RepoRef

    text = url.strip()
    if text.startswith("dagshub://") or _OWNER_REPO.fullmatch(text):
        segments = [s for s in text[len("dagshub://"):].split("/") if s] if text.startswith("dagshub://") else []
        if text.startswith("dagshub://") and len(segments) != 2:
            raise ValueError(f"invalid repo_url {text!r}: use {REPO_URL_ARGUMENT_FORMS}")
        return RepoRef.parse(text).url, None
    clean, password = clean_repo_url(text)
    parts = urlsplit(clean)
    if not parts.hostname or len([s for s in parts.path.split("/") if s]) < 2:
        shown = clean if "@" in text else text  # never echo credentials
        raise ValueError(f"invalid repo_url {shown!r}: use {REPO_URL_ARGUMENT_FORMS}")
    return clean, password


def remote_from_git(root: str) -> Tuple[str, Optional[str], Optional[str]]:
    """(repo URL, checked-out branch or None, password from the URL or None) of ``root``'s ``origin`` remote.

    Falls back to the first remote when there is no ``origin``; ``ValueError`` when ``root`` is no git checkout or
    has no remote.
    """
    gdir = git_dir(root)
    if gdir is None:
        raise ValueError(f"{root} is not a git checkout: pass repo_url=... to install_hooks")
    remotes: List[Tuple[str, str]] = []
    for path in _config_paths(gdir):
        try:
            with open(path, encoding="utf-8") as f:
                remotes += _remotes(f.read())
        except OSError:
            continue
    if not remotes:
        raise ValueError(f"the git checkout {root} has no remote: pass repo_url=... to install_hooks")
    url = dict(remotes).get("origin", remotes[0][1])
    clean, password = clean_repo_url(url)
    branch = None
    try:
        with open(os.path.join(gdir, "HEAD"), encoding="utf-8") as f:
            head = f.read().strip()
        if head.startswith("ref: refs/heads/"):
            branch = head[len("ref: refs/heads/"):]
    except OSError:
        pass
    return clean, branch, password
