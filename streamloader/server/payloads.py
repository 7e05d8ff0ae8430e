"""JSON bodies of the local server, shaped exactly like DagsHub's (the official client parses them with dacite
and needs every non-Optional key: see dagshub/common/api/responses.py)."""
from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Dict
from urllib.parse import quote

from streamloader.server.repo import RepoEntry

if TYPE_CHECKING:  # pragma: no cover
    from streamloader.server.app import DagsHubServer

__all__ = ["user", "repo", "branch", "commit", "content_entry"]

_EPOCH = "1970-01-01T00:00:00Z"


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def user(app: "DagsHubServer") -> Dict[str, Any]:
    """The user record (the token's owner is the repo owner)."""
    return {
        "id": 1,
        "login": app.owner,
        "username": app.owner,
        "full_name": app.owner,
        "email": f"{app.owner}@localhost",
        "avatar_url": "",
        "public_email": None,
        "website": None,
        "company": None,
        "description": None,
    }


def repo(app: "DagsHubServer") -> Dict[str, Any]:
    """The repository record."""
    full_name = f"{app.owner}/{app.repo}"
    return {
        "id": 1,
        "owner": user(app),
        "name": app.repo,
        "full_name": full_name,
        "description": f"local folder served by streamloader: {app.folder.root}",
        "private": app.token is not None and not app.anonymous_read,
        "fork": False,
        "parent": None,
        "empty": False,
        "mirror": False,
        "size": 0,
        "html_url": app.repo_url,
        "ssh_url": None,
        "clone_url": f"{app.repo_url}.git",
        "website": None,
        "stars_count": 0,
        "forks_count": 0,
        "watchers_count": 0,
        "open_issues_count": 0,
        "default_branch": app.branch,
        "created_at": _EPOCH,
        "updated_at": _EPOCH,
        "permissions": {"admin": True, "push": True, "pull": True},
    }


def commit(app: "DagsHubServer", sha: str, newest_ns: int = 0) -> Dict[str, Any]:
    """A commit object (this server keeps no history: message and author are fixed)."""
    person = {"name": app.owner, "email": f"{app.owner}@localhost", "username": app.owner}
    return {
        "id": sha,
        "message": "snapshot of the served folder",
        "url": f"{app.repo_url}/commit/{sha}",
        "author": person,
        "committer": person,
        "added": None,
        "removed": None,
        "modified": None,
        "timestamp": _iso(newest_ns) if newest_ns else _EPOCH,
    }


def branch(app: "DagsHubServer") -> Dict[str, Any]:
    """The branch record with its head commit (recomputed from the folder on every call)."""
    sha, newest_ns = app.folder.head()
    return {"name": app.branch, "commit": commit(app, sha, newest_ns)}


def content_entry(app: "DagsHubServer", base_url: str, rev: str, entry: RepoEntry) -> Dict[str, Any]:
    """One listing row; the URLs point back at this server (``base_url`` is how the client reached it)."""
    api = f"{base_url}/api/v1/repos/{quote(app.owner)}/{quote(app.repo)}"
    path = quote(entry.path, safe="/")
    return {
        "path": entry.path,
        "type": entry.type,
        "size": entry.size,
        "hash": entry.hash,
        "versioning": entry.versioning,
        "download_url": f"{api}/raw/{quote(rev, safe='')}/{path}",
        "content_url": f"{api}/content/{quote(rev, safe='')}/{path}",
    }
