"""FeatureExtractor: fingerprints, extraction (the guide's .extract), a user CNN plugged in, TinyCNN, pickling."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from streamloader.data.features import (
    FeatureExtractor,
    FeatureExtractorProtocol,
    ImagePreprocess,
    TinyCNN,
    describe_preprocess,
    tiny_cnn_extractor,
    weights_digest,
)
from streamloader.data.images import load_image
from streamloader.synthetic import make_laion_repo


class SmallCNN(nn.Module):
    """A user model shaped like a torchvision backbone: features + pooling, output [B, C, 1, 1]."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.avgpool(self.features(x))


def flatten_features(batch):
    return batch.flatten(1)


class Unhelpful:
    """A preprocessing object whose default repr has a memory address."""

    def __call__(self, image):
        return ImagePreprocess(8)(image)


@pytest.fixture
def images(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=3, n_squirrel=0, image_size=(20, 16))
    return [str(repo.image_path(name)) for name in repo.files]


def test_fingerprint_is_stable_and_tracks_name_weights_and_preprocessing():
    base = tiny_cnn_extractor(input_size=16).fingerprint
    assert base == tiny_cnn_extractor(input_size=16).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert base != tiny_cnn_extractor(input_size=24).fingerprint  # preprocessing
    assert base != tiny_cnn_extractor(input_size=16, seed=1).fingerprint  # weights
    model = TinyCNN(seed=0)
    renamed = FeatureExtractor(model, ImagePreprocess(16), name="other", feature_dims=32)
    assert base != renamed.fingerprint
    changed = FeatureExtractor(TinyCNN(seed=0), ImagePreprocess(16), name="other", feature_dims=32)
    with torch.no_grad():
        changed.model.body[0].bias[0] += 1e-3
    assert changed.fingerprint != renamed.fingerprint


def test_fingerprint_is_the_same_in_a_new_process():
    code = ("from streamloader.data.features import tiny_cnn_extractor; "
            "print(tiny_cnn_extractor(input_size=16).fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == tiny_cnn_extractor(input_size=16).fingerprint


def test_weights_digest_of_modules_bound_methods_and_functions():
    model = SmallCNN()
    assert weights_digest(model).startswith("sha256:")
    assert weights_digest(model.forward) != weights_digest(model)  # which method counts too
    assert weights_digest(model.forward).startswith("sha256:")
    assert weights_digest(flatten_features) == f"callable:{__name__}.flatten_features"


def test_describe_preprocess_has_no_memory_addresses():
    text = describe_preprocess(Unhelpful())
    assert "0x" not in text and "Unhelpful" in text
    assert describe_preprocess(Unhelpful()) == text
    assert describe_preprocess(ImagePreprocess(8)).startswith("ImagePreprocess(size=(8, 8)")
    assert describe_preprocess(load_image) == "streamloader.data.images.load_image"


def test_extract_with_a_user_cnn_flattens_pooled_output(images):
    extractor = FeatureExtractor(SmallCNN(), ImagePreprocess(12), name="small-cnn")
    vector = extractor.extract(images[0])
    assert vector.shape == (6,) and vector.dtype == torch.float32
    assert extractor.feature_dims == 6  # learned from the first output
    batch = torch.stack([ImagePreprocess(12)(load_image(p)) for p in images])
    out = extractor.forward_batch(batch)
    assert out.shape == (3, 6)
    assert torch.allclose(out[0], vector, atol=1e-6)
    assert isinstance(extractor, FeatureExtractorProtocol)


def test_feature_dims_mismatch_is_an_error(images):
    extractor = FeatureExtractor(SmallCNN(), ImagePreprocess(12), feature_dims=7)
    with pytest.raises(ValueError, match="expected 7"):
        extractor.extract(images[0])


def test_bound_method_model_and_eval_mode(images):
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(3 * 8 * 8, 4))
    extractor = FeatureExtractor(model.forward, ImagePreprocess(8), name="seq")
    first = extractor.extract(images[1])
    assert not model.training  # dropout off: extraction is deterministic
    assert torch.equal(first, extractor.extract(images[1]))
    assert extractor.weights_digest == weights_digest(model.forward)


def test_tiny_cnn_does_not_disturb_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    TinyCNN(seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_extractor_pickles_with_its_fingerprint(images):
    extractor = tiny_cnn_extractor(input_size=16)
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone.fingerprint == extractor.fingerprint
    assert torch.equal(clone.extract(images[2]), extractor.extract(images[2]))


def test_constructor_validates():
    with pytest.raises(TypeError):
        FeatureExtractor(object(), ImagePreprocess(8))


def test_benchmark_runs_small(tmp_path):
    from benchmarks.feature_cache import benchmark_feature_cache  # the bench's P5 side (the checkout, not the wheel)

    result = benchmark_feature_cache(n_images=8, image_size=(24, 24), input_size=16, workdir=str(tmp_path))
    assert result["n_images"] == 8
    assert set(result) >= {"extract_s", "cached_epoch_s", "speedup", "cached_us_per_image"}
    json.dumps(result)
