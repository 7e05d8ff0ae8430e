"""Cold-fetch sides (P12-P15): one list of small files fetched into a fresh cache, by streamloader or by fsspec.

Run in a child process by :mod:`.child`; settings come from the environment as for the other sides
(``DAGSHUB_CLIENT_HOST``, ``DAGSHUB_TOKEN``, ``STREAMLOADER_CACHE``: a fresh one per side, so the host limiter's
state under it starts fresh too). Both sides resolve the branch before the timed region (the raw URLs fsspec gets
name the commit; streamloader pins the same commit); everything after that is timed: for streamloader
``fs.prefetch`` (listing included), for fsspec ``filecache`` over its ``http`` filesystem (aiohttp) ``fs.cat(urls)``,
which also reads every cached copy back into memory.

CPU is the client's own: ``time.process_time()`` of the side's process (every thread) plus the CPU of the worker
processes it forked and joined (``RUSAGE_CHILDREN``); the server runs in another process tree.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any, Dict, List, Optional

__all__ = ["cold_fetch", "fsspec_http_missing"]

_now = time.perf_counter


def fsspec_http_missing() -> Optional[str]:
    """Why fsspec's ``http`` filesystem cannot run here (``"aiohttp is not installed"``), or None if it can."""
    import importlib.util

    for module in ("aiohttp", "fsspec"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install aiohttp)"
    return None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fetch_fsspec(params: Dict[str, Any], paths: List[str]) -> Dict[str, Any]:
    import fsspec

    from streamloader.remote.client import DagsHubClient

    client = DagsHubClient(params["repo_url"], branch="main")
    urls = [client.raw_url(path) for path in paths]  # resolves the branch: outside the timed region
    token = os.environ.get("DAGSHUB_TOKEN") or os.environ["DAGSHUB_USER_TOKEN"]
    # the token travels in a header, never in a URL that could end up in the bench's output
    options = {"client_kwargs": {"headers": {"Authorization": f"Bearer {token}"}}}
    store = os.path.join(os.environ["STREAMLOADER_CACHE"], "fsspec-filecache")
    fs = fsspec.filesystem("filecache", target_protocol="http", target_options=options, cache_storage=store)
    cpu, children, started = time.process_time(), _children_cpu(), _now()
    out = fs.cat(urls)
    seconds = _now() - started
    cpu = time.process_time() - cpu + _children_cpu() - children
    if len(out) != len(urls):
        raise RuntimeError(f"fsspec returned {len(out)} of {len(urls)} files")
    return {"seconds": seconds, "cpu_s": cpu, "files": len(out), "bytes": sum(len(body) for body in out.values())}


def _fetch_bare(params: Dict[str, Any], paths: List[str]) -> Dict[str, Any]:
    """The floor of a client's work per file on this machine: one thread, one keep-alive ``http.client``
    connection, a GET per file, its body written to a new temp file and renamed into place (no hash, no locks, no
    index, no sync, no concurrency) -- what the CPU of any client that stores files one by one starts from."""
    import http.client
    from urllib.parse import urlsplit

    from streamloader.remote.client import DagsHubClient

    client = DagsHubClient(params["repo_url"], branch="main")
    urls = [urlsplit(client.raw_url(path)) for path in paths]  # resolves the branch: outside the timed region
    token = os.environ.get("DAGSHUB_TOKEN") or os.environ["DAGSHUB_USER_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    store = os.path.join(os.environ["STREAMLOADER_CACHE"], "bare")
    os.makedirs(store)
    first = urls[0]
    connection = http.client.HTTPConnection(first.hostname, first.port, timeout=60)
    cpu, started, total = time.process_time(), _now(), 0
    for number, url in enumerate(urls):
        if (url.hostname, url.port) != (first.hostname, first.port):
            raise RuntimeError(f"the bare side fetches from one origin only, not {url.netloc}")
        connection.request("GET", f"{url.path}?{url.query}" if url.query else url.path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"the bare side got HTTP {response.status} for {url.path}")
        name = os.path.join(store, str(number))
        fd = os.open(name + ".part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if os.write(fd, body) != len(body):
                raise RuntimeError(f"a short write to {name}.part")
        finally:
            os.close(fd)
        os.rename(name + ".part", name)
        total += len(body)
    seconds = _now() - started
    cpu = time.process_time() - cpu
    connection.close()
    return {"seconds": seconds, "cpu_s": cpu, "files": len(urls), "bytes": total}


def _fetch_streamloader(params: Dict[str, Any], paths: List[str]) -> Dict[str, Any]:
    import fsspec

    from streamloader.remote.urls import RepoRef

    ref = RepoRef.parse(params["repo_url"])
    fs = fsspec.filesystem("dagshub", host=ref.host, branch="main")
    fs.repo(ref.owner, ref.repo).revision()  # resolves the branch: outside the timed region
    concurrency = params.get("concurrency")
    cpu, children, started = time.process_time(), _children_cpu(), _now()
    result = fs.prefetch([f"{ref.owner}/{ref.repo}/{path}" for path in paths],
                         max_concurrency=int(concurrency) if concurrency else None, progress=False,
                         processes=params.get("processes"))
    seconds = _now() - started
    self_cpu = time.process_time() - cpu
    children_cpu = _children_cpu() - children
    if result.downloaded != len(paths):
        raise RuntimeError(f"prefetch downloaded {result.downloaded} of {len(paths)} files ({result})")
    return {"seconds": seconds, "cpu_s": self_cpu + children_cpu, "self_cpu_s": self_cpu,
            "children_cpu_s": children_cpu, "files": result.files, "bytes": result.bytes,
            "prefetch_s": result.seconds}


def cold_fetch(params: Dict[str, Any]) -> Dict[str, Any]:
    """Fetch ``paths`` (repo-relative) cold with ``engine`` ``"fsspec"``, ``"streamloader"`` or ``"bare"`` (the
    floor: :func:`_fetch_bare`); ``concurrency``: streamloader's ``max_concurrency``, None = adaptive;
    ``processes``: its worker processes, None = automatic.

    Returns wall seconds, client CPU seconds (and per file), files and bytes fetched."""
    paths = list(params["paths"])
    engine = params["engine"]
    if engine == "fsspec":
        result = _fetch_fsspec(params, paths)
    elif engine == "streamloader":
        result = _fetch_streamloader(params, paths)
    elif engine == "bare":
        result = _fetch_bare(params, paths)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    result.update(engine=engine, cpu_ms_per_file=result["cpu_s"] / max(1, len(paths)) * 1e3)
    return result
