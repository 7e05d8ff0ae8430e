"""Synthetic LAION-Aesthetics style data for the demo, the benchmark and the tests.

``make_laion_repo`` writes a small repo tree (``data/labels.tsv`` + real JPEGs) whose squirrel rows are known;
``make_labels_file`` writes a big labels.tsv (540k rows in about a second) for parser benchmarks::

    repo = make_laion_repo(tmp_path / "repo", n_images=200, n_squirrel=12)
    repo.labels_path, repo.squirrel_files          # .../data/labels.tsv, ['00000007.jpg', ...]
    benchmark_labels()["rows_per_s"]               # parse + 'squirrel' filter speed

Image size knob: images are uniform RGB noise (incompressible, so sizes are realistic for the bytes moved):
at JPEG quality 85, ``image_size=(64, 64)`` is about 4 KB, ``(160, 160)`` about 20 KB and ``(200, 200)`` about
30 KB — the bench uses (200, 200) for LAION-like ~30 KB images.

Scores are random by default: nothing in an image predicts them. ``scores="brightness"`` (the demo's and
``streamloader serve --demo-data``'s choice) makes each score follow its image's brightness, which any feature
extractor sees, so a regressor trained on them really learns (the validation loss falls)::

    make_laion_repo("/tmp/laion", n_images=400, n_squirrel=40, image_size=(128, 128), scores="brightness")
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple, Union

from streamloader.data.labels import LabelRow, write_labels

__all__ = ["SyntheticRepo", "LabelsFileInfo", "make_laion_repo", "make_labels_file", "benchmark_labels"]

# No word here contains "squirrel"; captions only mention one where we put it on purpose.
_WORDS = (
    "a the of and in on with at by for photo painting portrait landscape sunset mountain river forest city street "
    "night light dark blue red green golden old new beautiful small large vintage modern abstract art oil canvas "
    "print poster woman man girl boy cat dog bird flower tree garden house room table chair window door sky cloud "
    "sea beach lake winter summer autumn spring snow rain morning evening wall design pattern texture illustration "
    "drawing sketch watercolor café Zürich naïve façade 東京 夜景 Ελλάδα"
).split()
# Mixed case and plurals: the guide's substring test ('squirrel' in caption.lower()) must match all of them.
_SQUIRREL_FORMS = ("squirrel", "Squirrel", "Squirrels", "SQUIRREL", "red squirrel", "grey Squirrels", "squirrels")


@dataclass
class SyntheticRepo:
    """What make_laion_repo wrote: root, the labels file, image names (relative to ``data/``) and their labels."""

    root: Path
    labels_path: Path
    files: List[str]
    squirrel_files: List[str]
    scores: Dict[str, float] = field(default_factory=dict)
    captions: Dict[str, str] = field(default_factory=dict)

    def image_path(self, name: str) -> Path:
        """Local path of one image."""
        return self.root / "data" / name


def _caption(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(_WORDS, k=words)).capitalize()


def make_laion_repo(
    root: Union[str, "os.PathLike[str]"],
    n_images: int = 200,
    n_squirrel: int = 12,
    image_size: Tuple[int, int] = (64, 64),
    seed: int = 0,
    tab_captions: bool = True,
    jpeg_quality: int = 85,
    progress: bool = False,
    scores: str = "random",
) -> SyntheticRepo:
    """Write ``root/data/labels.tsv`` and ``root/data/<8 digits>.jpg`` (deterministic for a seed); return the manifest.

    ``n_squirrel`` captions mention squirrels in mixed forms ("Squirrels", "SQUIRREL", ...). With ``tab_captions``
    about one caption in five contains a tab, and the first squirrel caption has "squirrel" only AFTER its tab,
    which the guide's ``row.split('\\t')[:2]`` misses. Scores are in [6.5, 8.5]: uniform and unrelated to the image
    with ``scores="random"``; with ``scores="brightness"`` 6.5 + 2 x the image's brightness (0..1) plus a little
    noise (sd 0.05), the image being noise of half the full range around that brightness. ``image_size`` is
    (width, height).

    Usage: ``make_laion_repo("/tmp/laion", n_images=2000, image_size=(200, 200))`` (~30 KB JPEGs, ~1 s).
    """
    import numpy as np
    from PIL import Image
    from streamloader._progress import progress_bar

    if n_images < 0 or not 0 <= n_squirrel <= n_images:
        raise ValueError(f"need 0 <= n_squirrel <= n_images; got n_squirrel={n_squirrel}, n_images={n_images}")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive; got {image_size!r}")
    if scores not in ("random", "brightness"):
        raise ValueError(f"scores must be 'random' or 'brightness'; got {scores!r}")
    # brightness in its own stream: the default data (squirrel rows, captions, pixels) stays the same for a seed
    brightness = np.random.default_rng([seed, 1]).uniform(0.0, 1.0, n_images) if scores == "brightness" else None
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    data_dir = Path(root) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    squirrel_at = set(rng.sample(range(n_images), n_squirrel))
    first_squirrel = min(squirrel_at) if squirrel_at else -1
    rows: List[LabelRow] = []
    for index in range(n_images):
        caption = _caption(rng, rng.randint(6, 14))
        if index in squirrel_at:
            form = rng.choice(_SQUIRREL_FORMS)
            if tab_captions and index == first_squirrel:
                caption = f"{caption}\twith a {form} on a branch"
            else:
                caption = f"{form.capitalize() if rng.random() < 0.3 else form} {caption.lower()}"
        elif tab_captions and rng.random() < 0.2:
            caption = caption.replace(" ", "\t", 1)
        score = round(rng.uniform(6.5, 8.5), 4)
        if brightness is not None:
            score = round(min(8.5, max(6.5, 6.5 + 2.0 * brightness[index] + (score - 7.5) * 0.05 * 3 ** 0.5)), 4)
        rows.append(LabelRow(f"{index:08d}.jpg", caption, score, f"https://example.com/laion/{index:08d}.jpg"))
    labels_path = data_dir / "labels.tsv"
    write_labels(rows, labels_path)

    bar = progress_bar(iterable=rows, desc="synthetic images", unit="img", disable=not progress)
    for index, row in enumerate(bar):
        noise = pixels.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        if brightness is not None:  # half-range noise centred on the brightness: 0 -> [0, 128), 1 -> [128, 256)
            noise = (noise // 2 + int(round(brightness[index] * 128))).clip(0, 255).astype(np.uint8)
        Image.fromarray(noise).save(data_dir / row.file, "JPEG", quality=jpeg_quality)

    return SyntheticRepo(
        root=Path(root),
        labels_path=labels_path,
        files=[row.file for row in rows],
        squirrel_files=[row.file for i, row in enumerate(rows) if i in squirrel_at],
        scores={row.file: row.score for row in rows},
        captions={row.file: row.caption for row in rows},
    )


class LabelsFileInfo(NamedTuple):
    """What make_labels_file wrote."""

    path: Path
    n_rows: int
    n_squirrel: int


def make_labels_file(
    path: Union[str, "os.PathLike[str]"],
    n_rows: int,
    squirrel_every: int = 4696,
    seed: int = 0,
    tab_every: int = 50,
) -> LabelsFileInfo:
    """Write a big labels.tsv fast: rows 0, ``squirrel_every``, ... mention a squirrel (540k rows → 115 of them,
    ~0.02%), rows ``tab_every - 1``, ``2 * tab_every - 1``, ... have a tab in their caption; captions are ~50–120
    characters.

    Usage: ``make_labels_file("/tmp/labels.tsv", 540_000).n_squirrel == 115`` (~1 s).
    """
    if n_rows < 0 or squirrel_every <= 0 or tab_every <= 0:
        raise ValueError("n_rows must be >= 0 and squirrel_every, tab_every > 0")
    rng = random.Random(seed)
    # Caption halves drawn from small pools: far faster than drawing every word, and lengths stay realistic.
    heads = [_caption(rng, rng.randint(4, 8)) for _ in range(997)]
    tails = [_caption(rng, rng.randint(4, 8)).lower() for _ in range(1009)]
    scores = [f"{rng.uniform(6.5, 8.5):.6f}" for _ in range(1013)]
    n_squirrel = 0
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for start in range(0, n_rows, 65536):
            lines = []
            for i in range(start, min(start + 65536, n_rows)):
                caption = f"{heads[i % 997]} {tails[(i * 7) % 1009]}"
                if i % squirrel_every == 0:
                    caption += " with a Squirrel"
                    n_squirrel += 1
                if i % tab_every == tab_every - 1:
                    caption = caption.replace(" ", "\t", 1)
                lines.append(f"{i:09d}.jpg\t{caption}\t{scores[i % 1013]}\thttps://example.com/laion/{i}.jpg\n")
            handle.write("".join(lines))
    return LabelsFileInfo(Path(path), n_rows, n_squirrel)


def benchmark_labels(n_rows: int = 540_000, keyword: str = "squirrel", repeat: int = 3) -> Dict[str, float]:
    """Time parse + keyword filter of a synthetic labels.tsv (best of ``repeat``); returns rows_per_s and details.

    Usage: ``benchmark_labels()["rows_per_s"]`` (about 1.8–2 million per CPU-second on a 2-core machine).
    """
    from streamloader.data.filters import filter_labels

    with tempfile.TemporaryDirectory(prefix="streamloader-bench-") as tmp:
        start = time.perf_counter()
        info = make_labels_file(Path(tmp) / "labels.tsv", n_rows)
        generate_s = time.perf_counter() - start
        best, matched = float("inf"), 0
        for _ in range(max(1, repeat)):
            start = time.perf_counter()
            result = filter_labels(info.path, keyword)
            best = min(best, time.perf_counter() - start)
            matched = result.matched
        file_mb = info.path.stat().st_size / 1e6
    return {
        "rows": float(n_rows),
        "matched": float(matched),
        "seconds": best,
        "rows_per_s": n_rows / best if best > 0 else float("inf"),
        "generate_seconds": generate_s,
        "file_mb": file_mb,
    }
