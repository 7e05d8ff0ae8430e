"""Write small synthetic webdataset shards (JPEG + embedding) for tests and benchmarks.

The layout is what img2dataset + clip-retrieval + embedding-dataset-reordering produce, written with the stdlib
``tarfile`` the way webdataset's ``TarWriter`` does (``<key>.<ext>`` members, sorted extensions, mode 0o444), so
the runtime needs no webdataset::

    info = make_synthetic_shards(tmp_path, n_shards=2, per_shard=8, external_embeddings=True)
    info.tar_url         # ".../{0000..0001}.tar"
    info.embeddings_url  # ".../img_emb" holding img_emb_0000.npy, img_emb_0001.npy
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np

__all__ = ["SyntheticShards", "make_synthetic_shards", "write_tar"]


@dataclass
class SyntheticShards:
    """Where the synthetic data went and what it holds (``embeddings[key]`` is the expected vector)."""

    tar_url: str
    tar_paths: List[str]
    embeddings_url: Optional[str]
    keys: List[str]
    embeddings: Dict[str, np.ndarray] = field(repr=False)
    shard_width: int = 4


def write_tar(path: Union[str, os.PathLike], samples: List[Dict[str, bytes]], mtime: Optional[float] = None) -> None:
    """Write ``[{"__key__": k, ext: bytes, ...}, ...]`` as a webdataset tar (extensions in sorted order)."""
    now = time.time() if mtime is None else mtime
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(sample):
                if ext.startswith("_"):
                    continue
                data = sample[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(data))


def _jpeg_pool(n: int, size: int, rng: np.random.Generator) -> List[bytes]:
    from PIL import Image

    pool = []
    for _ in range(n):
        # Smooth gradients plus noise compress like photos rather than like pure noise.
        base = rng.integers(0, 256, size=(1, 1, 3))
        ramp = np.linspace(0, 255, size, dtype=np.float32)[None, :, None]
        pixels = (base + ramp + rng.normal(0, 12, size=(size, size, 3))) % 256
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    return pool


def make_synthetic_shards(
    directory: Union[str, os.PathLike],
    n_shards: int,
    per_shard: int,
    image_size: int = 256,
    emb_dim: int = 512,
    external_embeddings: bool = False,
    *,
    shard_width: int = 4,
    index_width: int = 4,
    dtype: str = "float32",
    extra_bytes: int = 0,
    distinct_images: int = 16,
    seed: int = 0,
) -> SyntheticShards:
    """Write ``n_shards`` tars of ``per_shard`` samples (``jpg``, ``txt``, ``json`` and ``npy`` or external rows).

    Keys follow img2dataset: ``<shard><index>`` (``00010509`` = shard 1, index 509). With
    ``external_embeddings`` the embeddings go to ``<directory>/img_emb/img_emb_<shard>.npy`` (row = index)
    instead of ``.npy`` members. ``extra_bytes`` adds a ``bin`` member of that size per sample to make big
    shards cheaply; images are drawn from a pool of ``distinct_images`` pre-encoded JPEGs for the same reason.
    """
    if per_shard > 10**index_width:
        raise ValueError(f"per_shard={per_shard} does not fit in index_width={index_width} digits")
    root = os.fspath(directory)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = _jpeg_pool(max(1, min(distinct_images, per_shard)), image_size, rng)
    payload = rng.integers(0, 256, size=extra_bytes, dtype=np.uint8).tobytes() if extra_bytes else b""
    emb_dir = os.path.join(root, "img_emb") if external_embeddings else None
    if emb_dir:
        os.makedirs(emb_dir, exist_ok=True)
    keys: List[str] = []
    embeddings: Dict[str, np.ndarray] = {}
    paths: List[str] = []
    for shard in range(n_shards):
        shard_name = str(shard).zfill(shard_width)
        # Offset away from zero: an all-zero row means "missing embedding".
        rows = (rng.standard_normal((per_shard, emb_dim)) + 0.01).astype(dtype)
        samples = []
        for index in range(per_shard):
            key = shard_name + str(index).zfill(index_width)
            sample = {
                "__key__": key,
                "jpg": pool[(shard * per_shard + index) % len(pool)],
                "txt": f"caption of {key}".encode(),
                "json": json.dumps({"key": key, "shard": shard, "index": index}).encode(),
            }
            if not emb_dir:
                buf = io.BytesIO()
                np.save(buf, rows[index])
                sample["npy"] = buf.getvalue()
            if payload:
                sample["bin"] = payload
            samples.append(sample)
            keys.append(key)
            embeddings[key] = rows[index]
        path = os.path.join(root, f"{shard_name}.tar")
        write_tar(path, samples)
        paths.append(path)
        if emb_dir:
            np.save(os.path.join(emb_dir, f"img_emb_{shard_name}.npy"), rows)
    last = str(n_shards - 1).zfill(shard_width)
    pattern = f"{'0' * shard_width}..{last}"
    tar_url = os.path.join(root, f"{{{pattern}}}.tar") if n_shards > 1 else paths[0]
    return SyntheticShards(tar_url, paths, emb_dir, keys, embeddings, shard_width)
