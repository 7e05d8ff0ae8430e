"""Measured sides that talk to the benchmark server (run in a child process by :mod:`.child`).

Settings come from the environment the parent prepared: ``DAGSHUB_CLIENT_HOST``, ``DAGSHUB_USER_TOKEN`` /
``DAGSHUB_TOKEN``, ``DAGSHUB_CLIENT_TOKENS_CACHE`` and ``STREAMLOADER_CACHE`` (a fresh one for a cold side).
Every function takes the JSON params and returns a JSON-able dict of figures (seconds are wall-clock).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable, Dict, List, Tuple

__all__ = ["guide_loop", "one_get_floor", "dataset_epoch", "warm_epoch", "shared_cache_reader", "stream_tar"]

_now = time.perf_counter


def _import_pil() -> Any:
    # load PIL's plugins before any hooks exist, so neither side pays for (or routes) plugin imports
    from PIL import Image

    Image.init()
    return Image


def _hooks_api(client: str) -> Tuple[Callable[..., Any], Callable[[], Any]]:
    if client == "official":
        from dagshub.streaming import install_hooks, uninstall_hooks
    else:
        from streamloader.hooks import install_hooks, uninstall_hooks
    return install_hooks, uninstall_hooks


def guide_loop(params: Dict[str, Any]) -> Dict[str, Any]:
    """The DagsHub guide's loop, unchanged, under ``client``'s hooks: read labels.tsv, open every image as RGB.

    Runs with the project root as the working directory (the guide uses relative paths).
    """
    Image = _import_pil()
    install_hooks, uninstall_hooks = _hooks_api(params["client"])
    limit = params.get("limit")
    root = params["project_root"]
    os.chdir(root)
    started = _now()
    install_hooks(project_root=root, repo_url=params["repo_url"], branch="main")
    try:
        installed = _now()
        # -- the guide, verbatim but for the limit --
        files: List[str] = []
        with open("data/labels.tsv") as f:
            for row in f.readlines():
                image_name = row.split("\t")[0]
                files.append(image_name)
        labels_done = _now()
        pixels = 0
        for name in files[:limit]:
            image = Image.open(os.path.join("data", name)).convert("RGB")
            pixels += image.size[0] * image.size[1]
        done = _now()
    finally:
        uninstall_hooks()
    count = len(files[:limit])
    return {"seconds": done - started, "install_s": installed - started, "labels_s": labels_done - installed,
            "images_s": done - labels_done, "files": count, "pixels": pixels}


def one_get_floor(params: Dict[str, Any]) -> Dict[str, Any]:
    """The least any client can do for the guide's loop: one keep-alive GET per image and the guide's decode.

    ``http.client`` on one connection, the bytes kept in memory (no cache, no hooks, no retries, no checks):
    ``official / this`` is the best ratio P2 could show for a client that fetches each file when it is opened.
    Times the first ``limit`` images listed in labels.tsv; returns seconds per image as well. With ``store_dir``
    each body is also written to a new file there and renamed into place (no hash, no lock, no fsync): the least a
    client that keeps a copy on disk must do.
    """
    import http.client
    import io
    from urllib.parse import quote, urlsplit

    Image = _import_pil()
    from streamloader.remote.client import DagsHubClient

    client = DagsHubClient(params["repo_url"], branch="main")
    labels_url = urlsplit(client.raw_url("data/labels.tsv"))  # resolves the branch: outside the timed region
    prefix = labels_url.path[: -len("labels.tsv")]
    token = os.environ.get("DAGSHUB_TOKEN") or os.environ["DAGSHUB_USER_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection(labels_url.hostname, labels_url.port)

    def get(path: str) -> bytes:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        return body

    started = _now()
    names = [row.split("\t")[0] for row in get(labels_url.path).decode("utf-8").splitlines()]
    names = names[: params.get("limit")]
    labels_done = _now()
    store_dir = params.get("store_dir")
    pixels = 0
    for number, name in enumerate(names):
        body = get(prefix + quote(name))
        if store_dir:
            part = os.path.join(store_dir, f"{number}.part")
            with open(part, "wb") as f:
                f.write(body)
            os.replace(part, os.path.join(store_dir, str(number)))
        image = Image.open(io.BytesIO(body)).convert("RGB")
        pixels += image.size[0] * image.size[1]
    done = _now()
    conn.close()
    return {"seconds": done - started, "images_s": done - labels_done, "files": len(names), "pixels": pixels,
            "s_per_image": (done - labels_done) / max(1, len(names))}


# -- streamloader's dataset ----------------------------------------------------------------------------------------
def _open_dataset(params: Dict[str, Any]) -> Any:
    """LaionAestheticsDataset over the bench repo's dagshub:// URLs (items: image tensor, score)."""
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.remote.urls import RepoRef

    ref = RepoRef.parse(params["repo_url"])
    base = f"dagshub://{ref.owner}/{ref.repo}/data"
    options = {"host": ref.host, "branch": "main", "max_concurrency": int(params.get("concurrency", 32))}
    return LaionAestheticsDataset(f"{base}/labels.tsv", base, limit=params.get("limit"), storage_options=options)


def dataset_epoch(params: Dict[str, Any]) -> Dict[str, Any]:
    """Cold epoch with streamloader's dataset: build it (reads labels.tsv), prefetch every image, read every item.

    ``background`` (the default) starts the prefetch with ``wait=False`` and reads the items at once, as a training
    loop would; otherwise the prefetch finishes first (that run times the fetch phase on its own).
    """
    _import_pil()
    import torch  # noqa: F401 - the dataset imports it; keep that out of the timed region

    background = bool(params.get("background", True))
    started = _now()
    dataset = _open_dataset(params)
    built = _now()
    job = dataset.prefetch(max_concurrency=int(params.get("concurrency", 32)), progress=False,
                           wait=not background)
    fetched = _now()
    pixels = 0
    for index in range(len(dataset)):
        image, _score = dataset[index]
        pixels += image.shape[1] * image.shape[2]
    read = _now()
    result = job.result() if background else job
    done = _now()
    return {"seconds": done - started, "setup_s": built - started, "background": background,
            "prefetch_s": result.seconds, "read_s": read - fetched, "files": len(dataset), "pixels": pixels,
            "prefetched": result.files, "prefetched_mb": result.bytes / 1e6}


def warm_epoch(params: Dict[str, Any]) -> Dict[str, Any]:
    """Warm epoch through the dataset vs a plain loop over the same files on local disk (same decode + tensor).

    Also times bytes only (no decode). The epoch is cut into blocks of ``block`` items and the sides take turns
    block by block (alternating who goes first), so load from other processes lands on both sides alike; the
    per-side sums of the best of ``repeats`` epochs are reported.
    """
    _import_pil()
    from streamloader.data.images import decode_image, image_to_tensor, read_image_bytes

    dataset = _open_dataset(params)
    local_dir = os.path.join(params["local_root"], "data")
    names = [os.path.join(local_dir, name) for name in dataset.files]
    fs = dataset.filesystem

    def ours(items: range) -> None:
        for index in items:
            dataset[index]

    def local(items: range) -> None:
        for index in items:
            with open(names[index], "rb") as f:
                image_to_tensor(decode_image(f.read(), names[index]))

    def ours_bytes(items: range) -> None:
        for index in items:
            read_image_bytes(dataset.paths[index], fs)

    def local_bytes(items: range) -> None:
        for index in items:
            with open(names[index], "rb") as f:
                f.read()

    n, block = len(dataset), int(params.get("block", 100))
    blocks = [range(start, min(start + block, n)) for start in range(0, n, block)]
    pairs = (("ours", ours, "local", local), ("ours_bytes", ours_bytes, "local_bytes", local_bytes))
    ours(range(min(n, 8)))  # first-use costs (filesystem instance, listing load) are not part of an epoch
    best = {name: float("inf") for pair in pairs for name in pair[0::2]}
    for _ in range(int(params.get("repeats", 3))):
        for name_a, fn_a, name_b, fn_b in pairs:
            total = {name_a: 0.0, name_b: 0.0}
            for number, items in enumerate(blocks):
                order = ((name_a, fn_a), (name_b, fn_b)) if number % 2 else ((name_b, fn_b), (name_a, fn_a))
                for name, fn in order:
                    t = _now()
                    fn(items)
                    total[name] += _now() - t
            for name, seconds in total.items():
                best[name] = min(best[name], seconds)
    return {**best, "files": n}


def shared_cache_reader(params: Dict[str, Any]) -> Dict[str, Any]:
    """One of several processes reading the same files cold through one cache (P9); starts on a flag file."""
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.repo import RemoteRepo

    paths = params["paths"]
    repo = RemoteRepo(DagsHubClient(params["repo_url"], branch="main", max_concurrency=params.get("threads", 16)))
    repo.revision()
    open(params["ready_file"], "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(params["start_flag"]):  # line up with the other readers
        if time.monotonic() > deadline:
            raise TimeoutError("the start flag never appeared")
        time.sleep(0.002)
    started = _now()
    if params.get("order") == "reversed":
        paths = paths[::-1]
    repo.prefetch(paths, max_concurrency=params.get("threads", 16), progress=False)
    total = 0
    for path in paths:
        with repo.open(path) as f:
            total += len(f.read())
    return {"seconds": _now() - started, "files": len(paths), "bytes": total}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def stream_tar(params: Dict[str, Any]) -> Dict[str, Any]:
    """Stream one tar shard through ImageEmbeddingDataset (decode included); peak RSS over the post-import baseline."""
    import torch  # noqa: F401 - part of the baseline, as in any training process

    from streamloader.data.tar_embeddings import ImageEmbeddingDataset

    dataset = ImageEmbeddingDataset(params["url"], params.get("emb_url"), shard_width=params.get("shard_width", 4),
                                    shuffle_shards=False, shuffle_num=params.get("shuffle_num") or None)
    baseline = _current_rss_mb()
    peak_before = _rss_mb()
    started = _now()
    samples = 0
    for image, _embedding in dataset:
        samples += 1
        del image
    seconds = _now() - started
    peak = _rss_mb()
    return {"samples": samples, "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak,
            "peak_before_mb": peak_before, "delta_mb": peak - max(baseline, 0.0)}
