"""LaionAestheticsDataset: items over local paths and dagshub:// URLs, workers (fork and spawn), every filter
option, on_error policies, prefetch, and the hooks."""
from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import LABEL_ROWS, TOKEN
from streamloader.data.filters import filter_labels
from streamloader.data.labels import LabelRow
from streamloader.data.laion import LaionAestheticsDataset
from streamloader.errors import DataFormatError
from streamloader.synthetic import make_laion_repo


@pytest.fixture
def laion(tmp_path):
    return make_laion_repo(tmp_path / "laion", n_images=24, n_squirrel=6, image_size=(16, 16), seed=3)


def _local(repo, **kwargs):
    return LaionAestheticsDataset(str(repo.labels_path), str(repo.root / "data"), **kwargs)


def _pixels(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).astype(np.float32) / 255)


def _remote(server, tmp_path, **kwargs):
    options = {"host": server.url, "cache_dir": str(tmp_path / "cache"), "skip_instance_cache": True}
    return LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                  storage_options=options, **kwargs)


# -- items ---------------------------------------------------------------------------------------------------------
def test_local_items_are_image_tensors_and_score_tensors(laion):
    ds = _local(laion)
    assert len(ds) == 24 and ds.files == laion.files
    for i in (0, 7, 23, -1):
        image, score = ds[i]
        name = laion.files[i]
        assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert torch.equal(image, _pixels(laion.image_path(name)))
        assert score.dtype == torch.float32 and score.shape == (1,)
        assert score.item() == pytest.approx(laion.scores[name], abs=1e-5)
    image, _ = ds[torch.tensor(3)]  # tensor and numpy indices, as samplers may produce
    assert torch.equal(image, _pixels(laion.image_path(laion.files[3])))
    assert torch.equal(ds[np.int64(3)][0], image) and torch.equal(ds[-21][0], image)
    with pytest.raises(IndexError):
        ds[24]
    with pytest.raises(TypeError):
        ds[1.5]


def test_guide_positional_arguments_with_relative_paths(laion, monkeypatch):
    monkeypatch.chdir(laion.root)
    ds = LaionAestheticsDataset("data/labels.tsv", "data", None, 5)  # the guide's (annotations, img_dir, fe, limit)
    assert ds.files == laion.files[:5] and ds.img_files == ds.files and ds.img_path == ds.img_dir  # the guide's names
    assert ds.paths[0] == "data/" + laion.files[0]
    assert torch.equal(ds[4][0], _pixels(laion.image_path(laion.files[4])))


def test_transform_gets_the_pil_image(laion):
    ds = _local(laion, transform=lambda image: torch.tensor(image.size))
    assert ds[0][0].tolist() == [16, 16]
    with pytest.raises(ValueError, match="transform"):
        _local(laion, transform=lambda image: image, feature_extractor=object())


def test_rows_from_memory_and_filter_result(laion):
    result = filter_labels(laion.labels_path, "squirrel")
    assert _local_rows(laion, result).files == result.files
    rows = result.rows + [LabelRow("extra.jpg", "a squirrel", float("nan"), "u")]
    with pytest.raises(DataFormatError, match="finite"):
        _local_rows(laion, rows)
    outside = laion.root / "outside.jpg"
    outside.write_bytes(laion.image_path(laion.files[0]).read_bytes())
    rows += [LabelRow("../outside.jpg", "a squirrel", 7.0, "u"), LabelRow(str(outside), "a squirrel", 7.0, "u")]
    with pytest.raises(DataFormatError, match="'..' in file name"):
        _local_rows(laion, rows[:1] + rows[-2:])
    skipping = _local_rows(laion, rows, on_error="skip")
    assert skipping.files == result.files  # no row can point outside img_dir
    assert skipping.stats["malformed_rows"] == 3
    assert skipping.stats["malformed_reasons"] == {"non-finite score": 1, "'..' in file name": 1,
                                                   "absolute file name": 1}


def _local_rows(repo, rows, **kwargs):
    return LaionAestheticsDataset(rows, str(repo.root / "data"), **kwargs)


@pytest.mark.parametrize(
    "options",
    [
        {"keywords": "squirrel"},
        {"keywords": ["squirrel", "sunset"], "match": "any"},
        {"keywords": ["photo", "the"], "match": "all"},
        {"exclude": ["the", "café"]},
        {"keywords": "squirrel", "whole_word": True},
        {"regex": r"\b(cat|dog)\b"},
        {"min_score": 7.0},
        {"max_score": 7.0},
        {"min_score": 7.0, "max_score": 8.0, "keywords": "lake"},
        {"limit": 4},
        {"keywords": "dark", "limit": 3},
        {"sample": 0.5, "seed": 4},
    ],
)
def test_every_filter_option_passes_through(laion, options):
    ds = _local(laion, **options)
    expected = filter_labels(laion.labels_path, **options)
    assert ds.files == expected.files
    assert 0 < len(ds) < 24, "the option must actually select something"
    assert ds.stats["matched"] == expected.matched and ds.stats["scanned"] == expected.scanned


# -- on_error ------------------------------------------------------------------------------------------------------
@pytest.fixture
def damaged(laion):
    """Item 2's image is missing and item 5's is not an image."""
    laion.image_path(laion.files[2]).unlink()
    laion.image_path(laion.files[5]).write_bytes(b"not a jpeg at all")
    return laion


def test_on_error_raise_names_the_file(damaged):
    ds = _local(damaged)
    with pytest.raises(FileNotFoundError, match=re.escape(damaged.files[2])):
        ds[2]
    with pytest.raises(DataFormatError, match=re.escape(damaged.files[5])):
        ds[5]


def test_on_error_skip_serves_the_next_good_item_and_counts(damaged):
    ds = _local(damaged, on_error="skip")
    assert torch.equal(ds[2][0], _pixels(damaged.image_path(damaged.files[3])))
    assert ds[5][1].item() == pytest.approx(damaged.scores[damaged.files[6]], abs=1e-5)
    assert (ds.stats["missing_image"], ds.stats["decode_error"], ds.stats["skipped"]) == (1, 1, 2)
    batches = list(DataLoader(ds, batch_size=8))
    assert [b[0].shape[0] for b in batches] == [8, 8, 8]  # full, valid batches
    assert ds.stats["skipped"] == 4  # one more skip of each bad item in the epoch
    ds.reset_stats()
    assert ds.stats["skipped"] == 0


def test_on_error_warn_logs(damaged, caplog):
    ds = _local(damaged, on_error="warn")
    with caplog.at_level(logging.WARNING, logger="streamloader.data.laion"):
        ds[2]
    assert damaged.files[2] in caplog.text


def test_all_images_bad_raises_instead_of_looping(laion):
    for name in laion.files[:3]:
        laion.image_path(name).unlink()
    ds = _local(laion, on_error="skip", limit=3)
    with pytest.raises(DataFormatError, match="none of the 3 images"):
        ds[0]


def test_nan_scores_follow_on_error(laion):
    text = laion.labels_path.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = text[1].split("\t")
    fields[-2] = "nan"
    text[1] = "\t".join(fields)
    laion.labels_path.write_text("".join(text), encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 2"):
        _local(laion)
    ds = _local(laion, on_error="skip")
    assert len(ds) == 23 and laion.files[1] not in ds.files
    assert ds.stats["malformed_rows"] == 1 and ds.stats["malformed_reasons"] == {"nan score": 1}
    assert all(not math.isnan(s) for s in ds.scores)


def test_invalid_on_error(laion):
    with pytest.raises(ValueError, match="on_error"):
        _local(laion, on_error="ignore")


# -- dagshub:// URLs and DataLoader workers --------------------------------------------------------------------------
def test_remote_items_match_the_files(server, repo_dir, tmp_path):
    ds = _remote(server, tmp_path)
    assert ds.files == [row[0] for row in LABEL_ROWS]
    for i, row in enumerate(LABEL_ROWS):
        image, score = ds[i]
        assert torch.equal(image, _pixels(repo_dir / "data" / row[0]))
        assert score.item() == pytest.approx(float(row[2]))
    assert _remote(server, tmp_path, keywords="squirrel").files == ["0000.jpg", "0002.jpg"]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_remote_dataset_with_two_workers(server, repo_dir, tmp_path, context):
    (repo_dir / "data" / "0001.jpg").unlink()  # one missing image: skipped and counted across workers
    ds = _remote(server, tmp_path, on_error="skip")
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context=context)
    got = [(image[0], score.item()) for image, score in loader]
    expected_files = ["0000.jpg", "0002.jpg", "0002.jpg", "0003.jpg"]  # item 1 is served by item 2
    assert len(got) == 4
    for (image, score), name in zip(got, expected_files):
        assert torch.equal(image, _pixels(repo_dir / "data" / name))
    assert ds.stats["missing_image"] == 1 and ds.stats["skipped"] == 1


def test_remote_features_with_spawned_workers(server, tmp_path):
    from streamloader.data.features import tiny_cnn_extractor

    ds = _remote(server, tmp_path, feature_extractor=tiny_cnn_extractor(input_size=16))
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="spawn", persistent_workers=True)
    first = torch.cat([features for features, _ in loader])
    assert first.shape == (4, 32) and ds.stats["features_computed"] == 4  # computed in the workers, counted here
    server.reset_counts()
    second = torch.cat([features for features, _ in loader])
    assert torch.equal(first, second) and ds.stats["features_cached"] == 4
    assert server.request_count(kind="raw") == 0


def test_guide_style_extractor_is_cached_in_memory(laion):
    class GuideExtractor:  # the guide's EfficientNetFeatureExtractor shape: only .extract(image_path)
        calls = 0

        def extract(self, image_path):
            GuideExtractor.calls += 1
            return torch.tensor([float(Image.open(image_path).size[0])])

    ds = _local(laion, feature_extractor=GuideExtractor())
    assert ds.feature_cache is None
    assert ds[3][0].tolist() == [16.0] and ds[3][0].tolist() == [16.0]
    assert GuideExtractor.calls == 1
    from streamloader.data.features import tiny_cnn_extractor

    uncached = _local(laion, feature_extractor=tiny_cnn_extractor(input_size=16), cache_features=False)
    assert uncached.feature_cache is None and uncached[0][0].shape == (32,)


def test_remote_prefetch_downloads_once(server, tmp_path):
    ds = _remote(server, tmp_path)
    server.reset_counts()
    result = ds.prefetch(progress=False)
    assert result.files == 4 and not result.failed
    assert server.request_count(kind="raw") == 4
    server.reset_counts()
    list(DataLoader(ds, batch_size=2))
    assert server.request_count(kind="raw") == 0


def test_remote_prefetch_of_missing_image_follows_policy(server, repo_dir, tmp_path):
    (repo_dir / "data" / "0003.jpg").unlink()
    with pytest.raises(FileNotFoundError):
        _remote(server, tmp_path).prefetch(progress=False)
    result = _remote(server, tmp_path, on_error="skip").prefetch(progress=False)
    assert result.files == 3 and [p.rsplit("/", 1)[-1] for p in result.failed] == ["0003.jpg"]


def test_local_prefetch_is_a_no_op(laion):
    result = _local(laion).prefetch(progress=False)
    assert result.files == 0 and not result.failed


def test_remote_auth_failure_is_raised_not_skipped(server, tmp_path):
    ds = _remote(server, tmp_path, on_error="skip")
    fresh = LaionAestheticsDataset(ds.rows, "dagshub://user/repo/data", on_error="skip",
                                   storage_options={"host": server.url, "token": "wrong-" + TOKEN,
                                                    "skip_instance_cache": True, "cache_dir": str(tmp_path / "c2")})
    with pytest.raises(PermissionError):
        fresh[0]
    assert fresh.stats["skipped"] == 0


# -- hooks ---------------------------------------------------------------------------------------------------------
def test_plain_paths_stream_through_hooks(server, tmp_path, monkeypatch):
    from streamloader.hooks import install_hooks as install

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    handle = install(project_root=str(project), repo_url=server.repo_url, branch="main",
                     cache_dir=str(tmp_path / "hook-cache"))
    try:
        ds = LaionAestheticsDataset("data/labels.tsv", "data", keywords="squirrel")
        assert ds.files == ["0000.jpg", "0002.jpg"]
        image, score = ds[1]
        assert image.shape == (3, 32, 32) and score.item() == pytest.approx(6.6)
        server.reset_counts()
        result = ds.prefetch(progress=False)
        assert not result.failed
        list(DataLoader(ds, batch_size=2))
        assert server.request_count(kind="raw") <= 2
    finally:
        handle.uninstall()
