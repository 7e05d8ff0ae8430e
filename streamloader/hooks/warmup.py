"""``streamloader.prefetch``: warm the cache for many files at once, so that the training loop's ``open()`` calls
never wait on the network.

Paths are given the way the training code opens them — relative to the cwd or absolute, under a root hooked with
``install_hooks`` — or as ``dagshub://owner/repo/path`` URLs::

    install_hooks(project_root=".", repo_url=url, branch="main")
    streamloader.prefetch([os.path.join("data", f) for f in squirrel_files])   # many downloads in flight
    Image.open(os.path.join("data", squirrel_files[0]))                        # served from the cache

Each path is routed to the repository that serves it (a hooked root's, or the ``dagshub://`` filesystem's), and
each repository fetches its share with :meth:`RemoteRepo.prefetch` (:mod:`streamloader.remote.prefetch`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from streamloader import _realos
from streamloader.hooks import router
from streamloader.remote.prefetch import PrefetchJob, PrefetchResult, settle

log = logging.getLogger(__name__)

__all__ = ["prefetch"]

_URL_PREFIX = "dagshub://"


def prefetch(paths: Iterable[Any], max_concurrency: Optional[int] = None, progress: bool = True,
             on_error: str = "raise",
             storage_options: Optional[Mapping[str, Any]] = None, processes: Optional[int] = None,
             wait: bool = True) -> Any:
    """Download ``paths`` into the cache concurrently, with a progress bar. ``max_concurrency``: at most that many
    requests in flight; None (default): as many as the host keeps up with (32 at first, growing up to 256 while
    answers come as fast, cut when it pushes back; see :mod:`streamloader.remote.limits`).

    Hooked paths that exist locally need no download and are skipped. ``on_error="raise"`` raises the first
    failure after all downloads finished; ``"skip"`` logs each failure, records it in ``result.failed`` (keyed by
    the path as given) and carries on. A path that is neither under a hooked root nor a ``dagshub://`` URL, or that
    matches the root's ``exclude_globs``, is such a failure (ValueError). ``storage_options`` go to the
    ``dagshub://`` filesystem (``host``, ``token``, ``branch``, ...). ``processes``: worker processes per
    repository (None = automatic, see :meth:`RemoteRepo.prefetch`). Returns a PrefetchResult, or with
    ``wait=False`` a :class:`PrefetchJob` at once (the downloads go on in the background; ``job.result()``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    groups, failed = _group(paths, storage_options or {})
    if failed and on_error == "raise":
        raise next(iter(failed.values()))
    started = time.perf_counter()
    jobs = [(fetch(list(rels), max_concurrency=max_concurrency, progress=progress, on_error="skip",
                   processes=processes, wait=False), rels) for fetch, rels in groups.values()]

    def merge(cancelled: Any) -> PrefetchResult:
        total = PrefetchResult(failed=dict(failed))
        for job, rels in jobs:
            part = job.result()
            total.files += part.files
            total.bytes += part.bytes
            total.cached += part.cached
            total.cached_bytes += part.cached_bytes
            for rel, exc in part.failed.items():
                total.failed[rels[rel]] = exc
        total.seconds = time.perf_counter() - started
        for path, exc in failed.items():
            log.warning("prefetch skipped %s: %s", path, exc, extra={"prefetch_failure": path})
        log.info("prefetch: %s", total)
        return total

    def cancel() -> None:
        for job, _rels in jobs:
            job.cancel()

    return settle(PrefetchJob(merge, on_error, on_cancel=cancel), wait)


def _group(paths: Iterable[Any], storage_options: Mapping[str, Any]) -> Tuple[Dict[Any, Tuple[Any, Dict[str, str]]],
                                                                               Dict[str, BaseException]]:
    """Sort paths by the repository that serves them: ({key: (prefetch function, {repo path: path as given})},
    {path as given: error})."""
    groups: Dict[Any, Tuple[Any, Dict[str, str]]] = {}
    failed: Dict[str, BaseException] = {}
    filesystem = None
    for given in paths:
        shown = os.fsdecode(os.fspath(given))
        if shown.startswith(_URL_PREFIX):
            if filesystem is None:
                from streamloader.remote.filesystem import DagsHubFileSystem

                filesystem = DagsHubFileSystem(**storage_options)
            try:
                repo, rel = filesystem.resolve(shown)
            except ValueError as exc:
                failed[shown] = exc
                continue
            groups.setdefault(("url", id(repo)), (repo.prefetch, {}))[1][rel] = shown
            continue
        route = router.resolve(given)
        if route is None:
            failed[shown] = ValueError(f"{shown!r} is neither under a hooked project root (install_hooks) "
                                       "nor a dagshub:// URL")
            continue
        hook, rel = route
        if hook.excluded(rel):
            failed[shown] = ValueError(f"{shown!r} matches the exclude_globs of {hook.root}: it is never fetched")
        elif not _realos.exists_locally(given, follow_symlinks=False):  # open() serves a local file: nothing to fetch
            groups.setdefault(("hook", hook.root), (hook.repo.prefetch, {}))[1][rel] = shown
    return groups, failed

