"""P10's measured sides: the user's repo at its real scale (540k JPEGs in ONE folder) served the way dagshub.com
serves it. Run in a child process by :mod:`.child`; settings come from the environment as for the other sides.

Peak RSS is reported as growth over the process's own baseline right before the measured work (after imports).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any, Dict, List

__all__ = ["scale_first_image", "scale_listdir", "scale_loader"]

_now = time.perf_counter


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(params: Dict[str, Any]) -> Any:
    from PIL import Image

    Image.init()
    if params["client"] == "official":
        from dagshub.streaming import install_hooks
    else:
        from streamloader.hooks import install_hooks
    os.chdir(params["project_root"])
    return Image, install_hooks


def scale_first_image(params: Dict[str, Any]) -> Dict[str, Any]:
    """install_hooks, read ``data/labels.tsv`` as the guide does, ``Image.open`` the first image named there."""
    Image, install_hooks = _setup(params)
    base = _rss_mb()
    started = _now()
    install_hooks(project_root=params["project_root"], repo_url=params["repo_url"], branch="main")
    installed = _now()
    with open("data/labels.tsv") as f:
        rows = f.readlines()
    first = rows[0].split("\t")[0]
    labels_done = _now()
    image = Image.open(os.path.join("data", first)).convert("RGB")
    done = _now()
    return {"seconds": done - started, "install_s": installed - started, "labels_s": labels_done - installed,
            "image_s": done - labels_done, "rows": len(rows), "pixels": image.size[0] * image.size[1],
            "rss_growth_mb": _rss_mb() - base}


def scale_listdir(params: Dict[str, Any]) -> Dict[str, Any]:
    """``os.listdir('data')`` under the hooks (after install_hooks, not timed)."""
    _Image, install_hooks = _setup(params)
    install_hooks(project_root=params["project_root"], repo_url=params["repo_url"], branch="main")
    base = _rss_mb()
    started = _now()
    names = os.listdir("data")
    seconds = _now() - started
    return {"seconds": seconds, "entries": len(names), "rss_growth_mb": _rss_mb() - base}


class _Images:
    """A torch Dataset over the first ``n`` names ``os.listdir`` gave, opened through the hooks in the workers."""

    def __init__(self, names: List[str]):
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(os.path.join("data", self.names[i])) as image:
            pixels = image.convert("RGB").size
        return pixels[0] * pixels[1], _rss_mb()


def scale_loader(params: Dict[str, Any]) -> Dict[str, Any]:
    """A ``spawn`` DataLoader with 2 workers reading 64 images of the listed folder (the listing is already in the
    store); reports the wall time of the epoch (worker start-up included) and the workers' peak RSS."""
    import torch.utils.data as tud

    _Image, install_hooks = _setup(params)
    install_hooks(project_root=params["project_root"], repo_url=params["repo_url"], branch="main")
    names = sorted(n for n in os.listdir("data") if n.endswith(".jpg"))[:params.get("images", 64)]
    started = _now()
    loader = tud.DataLoader(_Images(names), batch_size=8, num_workers=2, multiprocessing_context="spawn")
    pixels, worker_rss = 0, 0.0
    for batch_pixels, batch_rss in loader:
        pixels += int(batch_pixels.sum())
        worker_rss = max(worker_rss, float(batch_rss.max()))
    return {"seconds": _now() - started, "images": len(names), "pixels": pixels, "worker_rss_mb": worker_rss}
