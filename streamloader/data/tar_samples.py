"""One webdataset sample's members: which are images, how the other extensions decode, and the sample shuffle.

A sample is the tar members sharing a key (``000123.jpg``, ``000123.txt``, ...). The tar-shard loader
(:mod:`streamloader.data.tar_embeddings`) and its resumable pass (:mod:`streamloader.data.resume`) share these::

    image = open_image(sample["jpg"])          # PIL image, decoded now (a corrupt one fails here)
    caption = decode_extra("txt", sample["txt"])
    for item in shuffle_buffer(items, 200, random.Random(seed)): ...
"""
from __future__ import annotations

import io
import json
import random
from typing import Any, Iterable, Iterator, List

import numpy as np

from streamloader.data.images import image_to_tensor

__all__ = ["IMAGE_EXTS", "SKIP_SHARD", "open_image", "decode_extra", "shuffle_buffer"]

#: member extensions read as the sample's image, in order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
_TEXT_EXTS = ("txt", "text", "caption")
_INT_EXTS = ("cls", "cls2", "index", "inx", "id")
#: sentinel returned by a sample check: drop the rest of the current shard
SKIP_SHARD = object()


def open_image(data: bytes) -> Any:
    """The PIL image in ``data``, decoded now (in its own mode) so a corrupt image fails here."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()  # decode now so a corrupt image fails here, inside the handler's reach
    return image


def decode_extra(ext: str, value: Any) -> Any:
    """A member's bytes decoded by its extension: images -> tensor, txt -> str, json -> object, cls -> int, npy
    -> array; ``__key__``/``__url__`` and unknown extensions pass through unchanged."""
    last = ext.rsplit(".", 1)[-1]
    if ext.startswith("__"):
        return value
    if last in IMAGE_EXTS:
        return image_to_tensor(open_image(value))
    if last in _TEXT_EXTS:
        return value.decode("utf-8")
    if last == "json":
        return json.loads(value)
    if last in _INT_EXTS:
        return int(value)
    if last == "npy":
        return np.load(io.BytesIO(value), allow_pickle=False)
    return value



def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Yield ``items`` in a random order using a buffer of ``size`` items (webdataset-style)."""
    buffer: List[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer

