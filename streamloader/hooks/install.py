"""The hooks' install lifecycle: :func:`install_hooks` builds a root's remote side and registers it, the first root
patches the file functions (:mod:`.targets`), :func:`uninstall_hooks` takes them back off with the last one.
Spawned children :func:`adopt` the parent's hooks, and ``activate_from_env`` installs them from their configuration
(:mod:`.spawn`). The package docstring (:mod:`streamloader.hooks`) describes what the hooks do.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Union

from streamloader.hooks import router, spawn, targets
from streamloader.hooks.router import HookConfig, HookedRoot

log = logging.getLogger(__name__)

__all__ = ["install_hooks", "uninstall_hooks", "hooked_roots", "install_config", "uninstall_one", "adopt"]

PathArg = Union[str, "os.PathLike[str]"]


def install_hooks(
    project_root: Optional[PathArg] = None,
    repo_url: Optional[str] = None,
    branch: Optional[str] = None,
    username: Optional[str] = None,
    password: Optional[str] = None,
    token: Optional[str] = None,
    timeout: Optional[float] = None,
    exclude_globs: Union[str, Sequence[str], None] = None,
    frameworks: Optional[List[str]] = None,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    max_concurrency: int = 32,
) -> HookedRoot:
    """Make ``project_root`` show the files of ``repo_url`` (at ``branch``'s current commit) to unchanged code.

    ``project_root`` defaults to the nearest git checkout above the cwd, else the cwd; ``repo_url`` defaults to that
    checkout's ``origin`` remote (credentials and ``.git`` stripped; then ``branch`` defaults to the checked-out
    branch, otherwise to the repository's default branch). ``repo_url`` may also be ``OWNER/REPO`` or
    ``dagshub://OWNER/REPO`` (host: ``$DAGSHUB_CLIENT_HOST``, else https://dagshub.com). The token comes from
    ``token=``, else ``DAGSHUB_TOKEN`` or the dagshub token cache (``dagshub.auth.add_app_token``); a public
    repository needs none (without one, a private repository fails with AuthenticationError, or starts OAuth when
    interactive). ``revision`` pins a commit. ``timeout`` bounds each
    HTTP request. Hooking a root that overlaps an already hooked one raises ``ValueError``.

    The commit is resolved at once, so a bad token, repository or branch fails here (AuthenticationError,
    RepositoryNotFoundError, RevisionNotFoundError). Returns a handle, also a context manager::

        with install_hooks(project_root=".", repo_url=url, branch="main"):
            image = PIL.Image.open("data/0001.jpg")
    """
    if username is not None or password is not None:
        raise ValueError("username/password authentication is not supported: pass token=... or set DAGSHUB_TOKEN")
    if frameworks:
        raise ValueError(f"frameworks={frameworks!r} is not supported: the hooks already cover libraries that open "
                         "files with Python's open()")
    from streamloader.hooks.gitconfig import find_git_root, normalize_repo_url, remote_from_git

    if project_root is None:
        cwd = os.getcwd()
        root = find_git_root(cwd) or cwd
    else:
        root = os.path.abspath(os.fspath(project_root))
    if repo_url:
        repo_url, url_password = normalize_repo_url(repo_url)
    else:
        repo_url, git_branch, url_password = remote_from_git(root)
        branch = branch or git_branch
    if token is None and url_password:
        from streamloader.auth import URL_SOURCE, Token

        token = Token(url_password, URL_SOURCE)  # https://user:TOKEN@host/owner/repo: how a token sits in a remote
    globs = (exclude_globs,) if isinstance(exclude_globs, str) else tuple(exclude_globs or ())
    config = HookConfig(root, repo_url, branch, revision, os.path.abspath(cache_dir) if cache_dir else None, globs,
                        max_concurrency, timeout)
    return install_config(config, token=token)


def _overlapping(root: str, repo_url: str) -> Optional[HookedRoot]:
    """The hooked root that ``root`` may reuse (an inherited hook of the same repo); raise on any other overlap."""
    spellings = {root, os.path.realpath(root)}
    for hook in router.hooked():
        for alias in hook.aliases:
            for candidate in spellings:
                if not (alias == candidate or _contains(alias, candidate) or _contains(candidate, alias)):
                    continue
                if hook.inherited and alias == candidate and _same_repo(hook.config.repo_url, repo_url):
                    return hook  # a spawned child re-running the parent's top-level install_hooks(...)
                raise ValueError(f"cannot hook {root}: it overlaps the hooked project root {hook.root} "
                                 f"({hook.config.repo_url}); call uninstall_hooks({hook.root!r}) first")
    return None


def _contains(outer: str, inner: str) -> bool:
    return inner.startswith(outer.rstrip("/") + "/")


def _same_repo(a: str, b: str) -> bool:
    from streamloader.remote.urls import RepoRef

    return RepoRef.parse(a) == RepoRef.parse(b)


def install_config(config: HookConfig, token: Any = None, inherited: bool = False) -> HookedRoot:
    """Build the remote side of ``config``, resolve its commit, then register it and patch (first root only)."""
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.repo import RemoteRepo
    from streamloader.remote.retry import RetryPolicy

    with router.lock():
        existing = _overlapping(config.project_root, config.repo_url)
    if existing is not None:
        return existing
    retry = RetryPolicy(connect_timeout=config.timeout, read_timeout=config.timeout) if config.timeout else None
    client = DagsHubClient(config.repo_url, token=token, branch=config.branch, revision=config.revision,
                           max_concurrency=config.max_concurrency, retry=retry)
    repo = RemoteRepo(client, FileCache(config.cache_dir))
    registered = False
    try:
        sha = repo.revision()  # network, outside the lock: fail fast on a bad token, repo or branch
        hook = HookedRoot(replace(config, revision=sha), repo, inherited=inherited)
        with router.lock():
            existing = _overlapping(config.project_root, config.repo_url)  # a concurrent install may have won
            if existing is not None:
                return existing
            _register(hook)
            registered = True
    finally:
        if not registered:
            client.close()
    log.info("%s is hooked to %s at commit %s", hook.root, config.repo_url, sha)
    return hook


def _register(hook: HookedRoot) -> None:
    router.add(hook)
    targets.apply()
    spawn.export_env(router.hooked())


def adopt(hook: HookedRoot) -> None:
    """Register a hook received from the parent process (spawn); a root hooked here already wins."""
    with router.lock():
        for existing in router.hooked():
            if set(existing.aliases) & set(hook.aliases):
                log.debug("not adopting the parent's hook of %s: already hooked", hook.root)
                return
        _register(hook)
    log.debug("adopted the parent's hook of %s (%s)", hook.root, hook.config.repo_url)


def uninstall_one(hook: HookedRoot) -> None:
    with router.lock():
        if not router.remove(hook):
            return
        if not router.hooked():
            targets.restore()
        spawn.export_env(router.hooked())
    hook.repo.client.close()
    log.info("unhooked %s", hook.root)


def uninstall_hooks(project_root: Optional[PathArg] = None) -> None:
    """Remove the hooks of ``project_root`` (None: of every root); the originals come back when none is left.

    ``ValueError`` when ``project_root`` is given but not hooked.
    """
    with router.lock():
        hooks = router.hooked()
        if project_root is not None:
            root = os.path.abspath(os.fspath(project_root))
            spellings = {root, os.path.realpath(root)}
            hooks = [hook for hook in hooks if spellings & set(hook.aliases)]
            if not hooks:
                raise ValueError(f"{root} is not hooked (hooked: {[h.root for h in router.hooked()] or 'none'})")
        for hook in hooks:
            uninstall_one(hook)


def hooked_roots() -> Dict[str, HookedRoot]:
    """``{project_root: handle}`` of the active hooks."""
    return {hook.root: hook for hook in router.hooked()}
