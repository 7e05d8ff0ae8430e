"""Where a repository's listings live in the cache (``<cache>/listings/<repo digest>/``), and the branch heads this
machine resolved there (``heads/<name digest>``): what :meth:`~streamloader.remote.repo.RemoteRepo.revision` pins
a client to, without asking the server for a commit listed before, and only from the record in offline mode.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Optional

from streamloader._files import atomic_write
from streamloader.errors import RemoteError

if TYPE_CHECKING:
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.urls import RepoRef

log = logging.getLogger(__name__)

__all__ = ["pin_revision", "record_repo", "repo_dir", "safe_name"]


def repo_dir(cache: Optional[FileCache], ref: RepoRef) -> Optional[str]:
    """The folder of the repository ``ref`` names under the cache's listings (None without a cache)."""
    if cache is None:
        return None
    digest = hashlib.sha256(f"{ref.host}\x00{ref.owner}\x00{ref.repo}".encode()).hexdigest()[:32]
    return os.path.join(cache.root, "listings", digest)


def pin_revision(client: DagsHubClient, repo_dir: Optional[str], offline: bool) -> str:
    """Pin ``client`` to its commit sha and return it (see the module docstring); ``repo_dir``: :func:`repo_dir`."""
    if client.is_resolved:
        return client.revision
    wanted = client.requested_revision
    if repo_dir and wanted and re.fullmatch(r"[0-9a-f]{40}", wanted) and os.path.exists(
            os.path.join(repo_dir, wanted + ".sqlite")):
        client.pin(wanted)  # a commit we have listed before exists: no need to ask
    elif offline:
        head_file = os.path.join(repo_dir or "", "heads", safe_name(wanted or "<default>"))
        try:
            with open(head_file, encoding="utf-8") as f:
                client.pin(f.read().strip())
        except (OSError, ValueError):
            raise RemoteError(f"offline mode: {client.ref.url} at {wanted or 'the default branch'} was never "
                              "resolved on this machine; run once online first") from None
    else:
        sha = client.resolve_revision()
        if repo_dir:
            head_file = os.path.join(repo_dir, "heads", safe_name(wanted or "<default>"))
            try:
                with open(head_file, encoding="utf-8") as f:
                    recorded = f.read().strip()
            except (OSError, ValueError):
                recorded = None
            try:
                if recorded != sha:  # (unchanged: nothing to write, so a read-only or full cache still serves)
                    atomic_write(head_file, sha.encode())
                record_repo(repo_dir, client)
            except OSError as exc:  # a full disk, a read-only cache: only offline mode needs the record
                log.warning("cannot record %s's head in the cache (%s); offline mode will not know it",
                            client.ref.url, exc)
    return client.revision


def record_repo(repo_dir: str, client: DagsHubClient) -> None:
    """Name the repository in its listings folder, once (``streamloader cache info`` reports per repository)."""
    record = os.path.join(repo_dir, "repo.json")
    if not os.path.exists(record):
        ref = client.ref
        atomic_write(record, json.dumps({"host": ref.host, "owner": ref.owner, "repo": ref.repo}).encode())


def safe_name(name: str) -> str:
    """A file name for a branch/revision name (hashed: branch names may contain '/')."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]
