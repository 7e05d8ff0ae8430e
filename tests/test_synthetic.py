"""The synthetic LAION-style repo and labels-file generators used by the demo, the benchmark and the tests."""
from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from streamloader.data.filters import filter_labels
from streamloader.data.labels import read_labels
from streamloader.synthetic import benchmark_labels, make_labels_file, make_laion_repo


def test_make_laion_repo_writes_labels_and_real_distinct_jpegs(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=40, n_squirrel=6, image_size=(48, 32), seed=3)
    assert repo.labels_path == tmp_path / "repo" / "data" / "labels.tsv"
    rows = list(read_labels(repo.labels_path))
    assert [row.file for row in rows] == repo.files
    assert len(repo.files) == 40 and len(set(repo.files)) == 40
    digests = set()
    for name in repo.files:
        with Image.open(repo.image_path(name)) as image:
            assert image.format == "JPEG" and image.size == (48, 32)
            digests.add(hashlib.sha256(image.convert("RGB").tobytes()).hexdigest())
    assert len(digests) == 40  # every image has its own pixels
    assert all(6.5 <= score <= 8.5 for score in repo.scores.values())
    assert {row.file: row.score for row in rows} == repo.scores
    assert {row.file: row.caption for row in rows} == repo.captions
    assert all(row.url.startswith("https://") for row in rows)


def test_squirrel_rows_are_exactly_the_ones_the_filter_finds(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=300, n_squirrel=12, image_size=(8, 8))
    assert len(repo.squirrel_files) == 12
    assert filter_labels(repo.labels_path, "squirrel").files == repo.squirrel_files
    squirrel_captions = [repo.captions[name] for name in repo.squirrel_files]
    assert any("Squirrel" in c or "SQUIRREL" in c for c in squirrel_captions)  # mixed case
    assert any("squirrels" in c.lower() for c in squirrel_captions)  # plurals
    tabbed = [c for c in repo.captions.values() if "\t" in c]
    assert tabbed and any("squirrel" in c.split("\t", 1)[1].lower() for c in tabbed)


def test_tab_captions_can_be_turned_off(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=100, n_squirrel=5, image_size=(8, 8), tab_captions=False)
    assert not any("\t" in caption for caption in repo.captions.values())
    assert all(line.count("\t") == 3 for line in repo.labels_path.read_text(encoding="utf-8").splitlines())


def test_same_seed_same_repo_other_seed_other_repo(tmp_path):
    first = make_laion_repo(tmp_path / "a", n_images=20, n_squirrel=3, image_size=(16, 16), seed=1)
    again = make_laion_repo(tmp_path / "b", n_images=20, n_squirrel=3, image_size=(16, 16), seed=1)
    other = make_laion_repo(tmp_path / "c", n_images=20, n_squirrel=3, image_size=(16, 16), seed=2)
    assert first.labels_path.read_bytes() == again.labels_path.read_bytes()
    assert first.image_path(first.files[5]).read_bytes() == again.image_path(again.files[5]).read_bytes()
    assert first.labels_path.read_bytes() != other.labels_path.read_bytes()
    assert first.image_path(first.files[5]).read_bytes() != other.image_path(other.files[5]).read_bytes()


def test_image_size_and_quality_knobs_change_file_size(tmp_path):
    small = make_laion_repo(tmp_path / "s", n_images=3, n_squirrel=0, image_size=(32, 32), progress=True)
    large = make_laion_repo(tmp_path / "l", n_images=3, n_squirrel=0, image_size=(200, 200))
    low = make_laion_repo(tmp_path / "q", n_images=3, n_squirrel=0, image_size=(200, 200), jpeg_quality=20)
    size = lambda repo: sum(repo.image_path(name).stat().st_size for name in repo.files) / 3  # noqa: E731
    assert size(small) < 4_000
    assert 20_000 < size(large) < 45_000  # the documented "(200, 200) is about 30 KB"
    assert size(low) < size(large) / 2


@pytest.mark.parametrize(
    "kwargs", [{"n_images": 3, "n_squirrel": 4}, {"n_images": -1}, {"image_size": (0, 10)}]
)
def test_make_laion_repo_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_laion_repo(tmp_path / "repo", **kwargs)


def test_brightness_scores_follow_the_images_and_keep_the_rows(tmp_path):
    import numpy as np

    plain = make_laion_repo(tmp_path / "plain", n_images=40, n_squirrel=6, image_size=(32, 32), seed=2)
    lit = make_laion_repo(tmp_path / "lit", n_images=40, n_squirrel=6, image_size=(32, 32), seed=2,
                          scores="brightness")
    assert (lit.files, lit.squirrel_files, lit.captions) == (plain.files, plain.squirrel_files, plain.captions)
    brightness = []
    for name in lit.files:
        with Image.open(lit.image_path(name)) as image:
            brightness.append(np.asarray(image.convert("L"), dtype=np.float64).mean())
    scores = [lit.scores[name] for name in lit.files]
    assert all(6.5 <= score <= 8.5 for score in scores)
    assert np.corrcoef(brightness, scores)[0, 1] > 0.95  # an image shows its score
    assert abs(np.corrcoef(brightness, [plain.scores[n] for n in plain.files])[0, 1]) < 0.5
    with pytest.raises(ValueError, match="scores"):
        make_laion_repo(tmp_path / "bad", n_images=2, n_squirrel=0, scores="sharpness")


def test_make_labels_file_counts_and_parses(tmp_path):
    info = make_labels_file(tmp_path / "labels.tsv", 10_000, squirrel_every=1000, tab_every=7)
    assert info.n_rows == 10_000 and info.n_squirrel == 10
    result = filter_labels(info.path, "squirrel")
    assert (result.scanned, result.matched, result.skipped) == (10_000, 10, 0)
    rows = list(read_labels(info.path))
    assert sum("\t" in row.caption for row in rows) == 10_000 // 7
    lengths = sorted(len(row.caption) for row in rows)
    assert 40 <= lengths[len(lengths) // 2] <= 120


def test_make_labels_file_default_density_matches_the_guide(tmp_path):
    # 540,000 rows with the default spacing hold 115 squirrels, as the guide reports; check the arithmetic cheaply
    info = make_labels_file(tmp_path / "labels.tsv", 9_393)
    assert info.n_squirrel == 3  # rows 0, 4696, 9392
    assert -(-540_000 // 4696) == 115


def test_benchmark_labels_reports_a_rate(tmp_path):
    result = benchmark_labels(n_rows=20_000, repeat=1)
    assert result["rows"] == 20_000 and result["matched"] == 5
    assert result["rows_per_s"] > 0 and result["seconds"] > 0
