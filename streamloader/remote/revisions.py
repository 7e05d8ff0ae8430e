"""Revision resolution: a commit id, branch, tag or abbreviated commit id to the full commit id it names, asked of
the REST API through the client's ``get_json`` (a function ``(url, what) -> decoded JSON`` that raises
:class:`~streamloader.errors.RemoteFileNotFoundError` on a 404), and the pinned commit's timestamp.

:class:`~streamloader.remote.client.DagsHubClient` resolves once (``resolve_revision``) and pins the answer; a
commit id a server returns is checked (:func:`checked_commit_id`) before it becomes part of any URL or cache path.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from streamloader.errors import RemoteError, RemoteFileNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from streamloader.remote.urls import RepoRef

__all__ = ["checked_commit_id", "commit_time", "repo_missing", "resolve_name"]

GetJSON = Callable[[str, str], Any]


def commit_time(ref: RepoRef, get_json: GetJSON, sha: str, branch: Optional[str]) -> Optional[float]:
    """The timestamp (POSIX seconds) of the commit ``sha``, or None when the server gives none.

    Asks the commit record, then (servers that leave it empty there) the record of ``branch`` when its head is
    still that commit: at most two requests.
    """
    import datetime

    lookups = [("commits", sha)] + ([("branches", branch)] if branch else [])
    for kind, name in lookups:
        data = get_json(ref.api_url(kind, name), f"{kind[:-1]} lookup")
        commit = data.get("commit", data) if isinstance(data, dict) else {}
        if not isinstance(commit, dict) or commit.get("id", sha) != sha:
            continue
        try:
            stamp = datetime.datetime.fromisoformat(str(commit.get("timestamp") or "").replace("Z", "+00:00"))
        except ValueError:
            continue
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.timezone.utc)
        if stamp.timestamp() > 0:
            return stamp.timestamp()
    return None


def checked_commit_id(ref: RepoRef, sha: str) -> str:
    # The sha becomes part of request URLs and of cache paths: a server must not be able to steer either.
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
        raise RemoteError(f"{ref} returned an invalid commit id {sha[:80]!r}", url=ref.api_base)
    return sha


def resolve_name(ref: RepoRef, get_json: GetJSON, name: str) -> str:
    """A full commit id is looked up as a commit; any other name as a branch, then a tag, then (when it looks
    like one) an abbreviated commit id. Only 404s move on to the next kind: a server error is retried and then
    reported as what it is, never as "not found"."""
    if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name):
        lookups = [("commits", "commit", _commit_id)]
    else:
        lookups = [("branches", "branch", _branch_commit), ("tags", "tag", _tag_commit)]
        if re.fullmatch(r"[0-9a-f]{7,39}", name):
            lookups.append(("commits", "commit", _commit_id))
    for endpoint, kind, parse in lookups:
        url = ref.api_url(endpoint, name)
        try:
            data = get_json(url, f"{kind} lookup")
        except RemoteFileNotFoundError:
            continue
        sha = parse(data)
        if sha is None:
            raise RemoteError(f"unexpected {kind} record for {name!r}", url=url)
        return sha
    kinds = " or ".join(kind for _endpoint, kind, _parse in lookups)
    if repo_missing(ref, get_json):
        raise RepositoryNotFoundError(f"repository {ref.url} not found (check the owner and the name)")
    raise RevisionNotFoundError(f"no {kinds} named {name!r} in {ref.url}")


def repo_missing(ref: RepoRef, get_json: GetJSON) -> bool:
    """Whether the repository itself is missing (asked only after a revision was not found)."""
    try:
        get_json(ref.api_base, "repository lookup")
    except RemoteFileNotFoundError:
        return True
    except RemoteError:
        return False
    return False


def _commit_id(data: Any) -> Optional[str]:
    commit = data.get("commit", data) if isinstance(data, dict) else None
    if not isinstance(commit, dict):
        return None
    sha = commit.get("id") or commit.get("sha")
    return str(sha) if sha else None


def _branch_commit(data: Any) -> Optional[str]:
    commit = data.get("commit") if isinstance(data, dict) else None
    sha = commit.get("id") or commit.get("sha") if isinstance(commit, dict) else None
    return str(sha) if sha else None


def _tag_commit(data: Any) -> Optional[str]:
    # Gitea's tag record: {"name", "id" (the tag object), "commit": {"sha", "url"}}
    commit = data.get("commit") if isinstance(data, dict) else None
    sha = (commit.get("sha") or commit.get("id")) if isinstance(commit, dict) else None
    return str(sha) if sha else None
