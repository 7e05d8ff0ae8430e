"""LaionAestheticsPyDataset (Keras 3, torch backend, no TensorFlow): model.fit on streamed data, workers and
processes under the hooks, the feature cache shared with the torch dataset, and the guide's Keras generator."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from PIL import Image  # noqa: E402

from conftest import TOKEN  # noqa: E402
from streamloader.data.features import tiny_cnn_extractor  # noqa: E402
from streamloader.data.keras_dataset import LaionAestheticsPyDataset  # noqa: E402
from streamloader.data.laion import LaionAestheticsDataset  # noqa: E402
from streamloader.data.split import train_valid_split  # noqa: E402
from streamloader.synthetic import make_laion_repo  # noqa: E402

N_IMAGES = 40


@pytest.fixture
def laion_server(tmp_path, make_server, monkeypatch):
    repo = make_laion_repo(tmp_path / "laion", n_images=N_IMAGES, n_squirrel=0, image_size=(16, 16), seed=5)
    srv = make_server(repo.root, token=TOKEN)
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    return repo, srv


def _remote(srv, tmp_path, extractor, cache="cache", **kwargs):
    options = {"host": srv.url, "skip_instance_cache": True}
    return LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data", extractor,
                                  cache_dir=str(tmp_path / cache), storage_options=options, **kwargs)


def _regressor(dims):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((dims,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def test_fit_with_validation_lowers_the_training_loss(laion_server, tmp_path):
    repo, srv = laion_server
    full = _remote(srv, tmp_path, tiny_cnn_extractor(input_size=16))
    train, valid = train_valid_split(full, valid_fraction=0.25, seed=1)
    train_ds = LaionAestheticsPyDataset(train, batch_size=8)
    valid_ds = LaionAestheticsPyDataset(valid, batch_size=8, shuffle=False)
    assert len(train_ds) == 4 and len(valid_ds) == 2
    embeddings, scores = train_ds[0]
    assert embeddings.shape == (8, 32) and embeddings.dtype == np.float32
    assert scores.shape == (8,) and scores.dtype == np.float32 and 6.5 <= scores.min() <= scores.max() <= 8.5
    history = _regressor(32).fit(train_ds, validation_data=valid_ds, epochs=2, verbose=0)
    loss = history.history["loss"]
    assert loss[1] < loss[0] and len(history.history["val_loss"]) == 2
    assert full.stats["features_computed"] == N_IMAGES  # each image streamed and extracted once over 2 epochs
    assert {path for path, n in srv.get_counts(kind="raw").items() if path.endswith(".jpg") and n > 1} == set()


def test_every_epoch_is_a_new_seeded_order_of_the_same_samples(laion_server, tmp_path):
    repo, srv = laion_server
    ds = LaionAestheticsPyDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                  tiny_cnn_extractor(input_size=16), batch_size=16, seed=3,
                                  storage_options={"host": srv.url, "skip_instance_cache": True},
                                  cache_dir=str(tmp_path / "c"), min_score=7.0)
    assert len(ds.order) == len(ds.dataset) < N_IMAGES and len(ds) == math.ceil(len(ds.order) / 16)
    first = ds.order.copy()
    ds.on_epoch_end()
    assert sorted(ds.order) == sorted(first) and list(ds.order) != list(first)
    ds.set_epoch(0)
    assert list(ds.order) == list(first)
    scores = np.concatenate([ds[i][1] for i in range(len(ds))])
    assert sorted(scores.tolist()) == pytest.approx(sorted(ds.dataset.scores))
    assert len(LaionAestheticsPyDataset(ds.dataset, batch_size=16, drop_last=True)) == len(ds.order) // 16
    with pytest.raises(ValueError, match="feature_extractor"):
        LaionAestheticsPyDataset(_remote(srv, tmp_path, None))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_features_cached_by_the_torch_dataset_serve_keras(laion_server, tmp_path):
    from torch.utils.data import DataLoader

    repo, srv = laion_server
    torch_ds = _remote(srv, tmp_path, tiny_cnn_extractor(input_size=16), cache="shared")
    torch_features = {name: f for (f, _), name in zip(torch_ds, torch_ds.files)}
    list(DataLoader(torch_ds, batch_size=8))
    srv.reset_counts()
    fresh = _remote(srv, tmp_path, tiny_cnn_extractor(input_size=16), cache="shared")
    keras_ds = LaionAestheticsPyDataset(fresh, batch_size=8, shuffle=False)
    embeddings = np.concatenate([keras_ds[i][0] for i in range(len(keras_ds))])
    assert fresh.stats["features_cached"] == N_IMAGES and fresh.stats["features_computed"] == 0
    assert srv.request_count(kind="raw") == 0  # no image bytes needed: the features were on disk
    np.testing.assert_array_equal(embeddings, np.stack([torch_features[n].numpy() for n in fresh.files]))


class GuideFeatureExtractor:
    """The guide's EfficientNetFeatureExtractor.extract, with Keras 3 names for tf.* and a one-layer frozen model
    (at the guide's 480x480: big enough for torch to run its ops on several threads)."""

    feature_dims = 4

    def __init__(self, record=None):
        self.record = record  # a file that gets the pid of every process that extracts
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([keras.Input((480, 480, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                                       keras.layers.GlobalAveragePooling2D()])
        self.model.trainable = False
        self.preprocess = keras.applications.efficientnet.preprocess_input

    def extract(self, image_path):
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{os.getpid()}\n")
        image = Image.open(image_path).convert('RGB')
        image = image.resize((480, 480))  # Resize the image to match EfficientNet's input size
        image = keras.utils.img_to_array(image)
        image = self.preprocess(image)
        image = keras.ops.expand_dims(image, axis=0)
        embedding = self.model(image)[0]
        return embedding


@pytest.fixture
def hooked_project(laion_server, tmp_path, monkeypatch):
    from streamloader.hooks import install_hooks

    repo, srv = laion_server
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    handle = install_hooks(project_root=str(project), repo_url=srv.repo_url, branch="main",
                           cache_dir=str(tmp_path / "hook-cache"))
    yield repo, srv
    handle.uninstall()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("use_multiprocessing", [False, True])
def test_guide_extractor_under_hooks_with_workers(hooked_project, tmp_path, use_multiprocessing):
    repo, srv = hooked_project
    record = tmp_path / "pids.txt"
    train = LaionAestheticsPyDataset("data/labels.tsv", "data", GuideFeatureExtractor(record), batch_size=8, limit=24,
                                     workers=2, use_multiprocessing=use_multiprocessing)
    valid = LaionAestheticsPyDataset("data/labels.tsv", "data", GuideFeatureExtractor(), batch_size=8, limit=8,
                                     shuffle=False)
    history = _regressor(4).fit(train, validation_data=valid, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    images = {path: n for path, n in srv.get_counts(kind="raw").items() if path.endswith(".jpg")}
    assert len(images) == 24 and max(images.values()) == 1  # streamed through the hooks, each image once
    pids = set(record.read_text().split())
    assert (str(os.getpid()) not in pids) if use_multiprocessing else (pids == {str(os.getpid())})


_FORKED = {}


def _batch_in_child(index):
    return _FORKED["dataset"][index]


@pytest.mark.timeout(120)
def test_a_forked_worker_after_threaded_torch_ops_does_not_hang(hooked_project):
    import multiprocessing

    import torch

    dataset = LaionAestheticsPyDataset("data/labels.tsv", "data", GuideFeatureExtractor(), batch_size=4, limit=4)
    # this thread ran torch's OpenMP pool (as a training step does): a child forked from it inherits a pool whose
    # threads do not exist, and hangs in its first parallel op unless it runs torch single-threaded
    torch.nn.functional.conv2d(torch.randn(8, 16, 64, 64), torch.randn(16, 16, 3, 3))
    _FORKED["dataset"] = dataset  # handed over by fork, as Keras hands its PyDataset to its pool
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            embeddings, scores = pool.apply_async(_batch_in_child, (0,)).get(timeout=60)
    finally:
        _FORKED.clear()
    assert embeddings.shape == (4, 4) and scores.shape == (4,)


class GuideDataGenerator(keras.utils.Sequence):
    """The guide's LAIONAestheticsDataGenerator: indices per epoch, ``__data_generation`` as the guide shows it."""

    def __init__(self, img_files, scores, img_path, feature_extractor, batch_size=8, shuffle=True):
        super().__init__()
        self.img_files, self.scores, self.img_path = img_files, scores, img_path
        self.feature_extractor, self.batch_size, self.shuffle = feature_extractor, batch_size, shuffle
        self.embeddings = {}
        self.on_epoch_end()

    def __len__(self):
        return int(np.floor(len(self.img_files) / self.batch_size))

    def __getitem__(self, index):
        idxs = self.indexes[index * self.batch_size:(index + 1) * self.batch_size]
        return self.__data_generation(idxs)

    def on_epoch_end(self):
        self.indexes = np.arange(len(self.img_files))
        if self.shuffle:
            np.random.shuffle(self.indexes)

    def __data_generation(self, idxs):
        embeddings = np.empty((self.batch_size, self.feature_extractor.feature_dims))
        scores = np.empty((self.batch_size))

        # Generate data
        for i, idx in enumerate(idxs):
            # Store sample
            embedding = self.embeddings.get(idx, None)
            if embedding is None:
                img_path = os.path.join(self.img_path, self.img_files[idx])
                embedding = self.feature_extractor.extract(img_path)
                self.embeddings[idx] = embedding

            embeddings[i,] = embedding
            scores[i] = self.scores[idx]
        return embeddings, scores


def test_the_guides_own_generator_trains_under_hooks(hooked_project):
    from streamloader.data.filters import filter_labels

    repo, srv = hooked_project
    rows = filter_labels("data/labels.tsv", limit=32).rows  # labels.tsv streamed, as in the guide's split
    train_rows, valid_rows = train_valid_split(rows, valid_fraction=0.25)
    extractor = GuideFeatureExtractor()

    def generator(rows, **kw):
        return GuideDataGenerator([r.file for r in rows], [r.score for r in rows], "data", extractor, **kw)

    history = _regressor(4).fit(generator(train_rows), validation_data=generator(valid_rows, shuffle=False),
                                epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert srv.request_count(kind="raw") >= 24  # the images really came from the server
