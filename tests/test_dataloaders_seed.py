"""The two usage snippets of the DALLE2-pytorch dataloader README, run as written with only the import changed.

The data is made with webdataset's own TarWriter (img2dataset layout) and the clip-retrieval folder layout.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

DECODER_SNIPPET = '''
from streamloader.dataloaders import ImageEmbeddingDataset, create_image_embedding_dataloader

# Create a dataloader directly.
dataloader = create_image_embedding_dataloader(
    tar_url="/path/or/url/to/webdataset/{0000..9999}.tar", # Uses bracket expanding notation. This specifies to read all tars from 0000.tar to 9999.tar
    embeddings_url="path/or/url/to/embeddings/folder",     # Included if .npy files are not in webdataset. Left out or set to None otherwise
    num_workers=4,
    batch_size=32,
    shard_width=4,                                         # If a file in the webdataset shard 3 is named 0003039.jpg, we know the shard width is 4 and the last three digits are the index
    shuffle_num=200,                                       # Does a shuffle of the data with a buffer size of 200
    shuffle_shards=True,                                   # Shuffle the order the shards are read in
    resample_shards=False,                                 # Sample shards with replacement. If true, an epoch will be infinite unless stopped manually
)
for img, emb in dataloader:
    print(img.shape)  # torch.Size([32, 3, 256, 256])
    print(emb.shape)  # torch.Size([32, 512])
    # Train decoder only as shown above

# Or create a dataset without a loader so you can configure it manually
dataset = ImageEmbeddingDataset(
    urls="/path/or/url/to/webdataset/{0000..9999}.tar",
    embedding_folder_url="path/or/url/to/embeddings/folder",
    shard_width=4,
    shuffle_shards=True,
    resample=False
)
'''

PRIOR_SNIPPET = '''
from streamloader.dataloaders import get_reader, make_splits

# grab embeddings from some specified location
IMG_URL = "data/img_emb/"
META_URL = "data/meta/"

reader = get_reader(text_conditioned=True, img_url=IMG_URL, meta_url=META_URL)

# some config for training
TRAIN_ARGS = {
    "world_size": 3,
    "text_conditioned": True,
    "start": 0,
    "num_data_points": 10000,
    "batch_size": 2,
    "train_split": 0.5,
    "eval_split": 0.25,
    "image_reader": reader,
}

# specifying a rank will handle allocation internally
rank0_train, rank0_eval, rank0_test = make_splits(rank=0, **TRAIN_ARGS)
rank1_train, rank1_eval, rank1_test = make_splits(rank=1, **TRAIN_ARGS)
rank2_train, rank2_eval, rank2_test = make_splits(rank=2, **TRAIN_ARGS)
'''

SHARDS, PER_SHARD, DIM = 4, 64, 512


def _write_img2dataset_shards(root):
    """4 TarWriter shards of 64 JPEGs (256x256) and img_emb_<shard>.npy rows matching the keys."""
    tars, emb_dir = root / "webdataset", root / "path/or/url/to/embeddings/folder"
    tars.mkdir(parents=True)
    emb_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 120, 200)).save(buf, format="JPEG")
    rows = {}
    for shard in range(SHARDS):
        rows[shard] = rng.standard_normal((PER_SHARD, DIM)).astype(np.float32)
        np.save(emb_dir / f"img_emb_{shard:04d}.npy", rows[shard])
        with wds.TarWriter(str(tars / f"{shard:04d}.tar")) as writer:
            for index in range(PER_SHARD):
                writer.write({"__key__": f"{shard:04d}{index:04d}", "jpg": buf.getvalue(), "txt": "a caption"})
    return str(tars / ("{0000..%04d}.tar" % (SHARDS - 1))), rows


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_decoder_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet's embeddings path is relative
    tar_url, rows = _write_img2dataset_shards(tmp_path)
    code = DECODER_SNIPPET.replace("/path/or/url/to/webdataset/{0000..9999}.tar", tar_url)
    printed = []
    namespace = {"print": printed.append}
    exec(compile(code, "decoder_snippet", "exec"), namespace)
    assert len(printed) == 2 * SHARDS * PER_SHARD // 32
    assert {str(p) for p in printed} == {"torch.Size([32, 3, 256, 256])", "torch.Size([32, 512])"}
    # each embedding is exactly its row: iterate the snippet's dataset with keys attached
    dataset = namespace["dataset"]
    assert type(dataset).__name__ == "ImageEmbeddingDataset"
    dataset.extra_keys = ("__key__",)
    seen = 0
    for img, emb, key in dataset:
        np.testing.assert_array_equal(emb.numpy(), rows[int(key[:4])][int(key[4:])])
        seen += 1
    assert seen == SHARDS * PER_SHARD and not any(dataset.stats.values())


def test_prior_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/img_emb")
    os.makedirs("data/meta")
    sizes = {0: 4000, 1: 3500, 2: 2500}
    start = 0
    for number, n in sizes.items():
        block = np.random.default_rng(number).standard_normal((n, DIM)).astype(np.float16)
        np.save(f"data/img_emb/img_emb_{number}.npy", block)
        pd.DataFrame({"caption": [f"c{i}" for i in range(start, start + n)]}).to_parquet(
            f"data/meta/metadata_{number}.parquet"
        )
        start += n
    namespace: dict = {}
    exec(compile(PRIOR_SNIPPET, "prior_snippet", "exec"), namespace)
    ranks = [[namespace[f"rank{r}_{s}"] for s in ("train", "eval", "test")] for r in range(3)]
    # captions carry the global row id, so coverage and disjointness are checked through them
    expected_ranges = [range(0, 5000), range(5000, 7500), range(7500, 10000)]
    for split, expected in enumerate(expected_ranges):
        assert len({len(loaders[split]) for loaders in ranks}) == 1  # equal batch counts on every rank
        captions = []
        for loaders in ranks:
            for emb, caps in loaders[split]:
                assert emb.shape[1:] == (DIM,) and emb.shape[0] <= 2 and len(caps) == emb.shape[0]
                captions += caps
        assert sorted(int(c[1:]) for c in captions) == list(expected)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_decoder_snippet_over_dagshub_urls(tmp_path, monkeypatch, make_server):
    """The same snippet streaming the shards and embeddings from `streamloader serve` via dagshub:// URLs."""
    from conftest import TOKEN

    tar_url, rows = _write_img2dataset_shards(tmp_path)
    srv = make_server(str(tmp_path), token=TOKEN)
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", srv.url)
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    code = DECODER_SNIPPET.replace(
        "/path/or/url/to/webdataset/{0000..9999}.tar", "dagshub://user/repo/webdataset/{0000..0003}.tar"
    ).replace('"path/or/url/to/embeddings/folder"', '"dagshub://user/repo/path/or/url/to/embeddings/folder"')
    printed = []
    namespace = {"print": printed.append}
    exec(compile(code, "decoder_snippet", "exec"), namespace)
    assert {str(p) for p in printed} == {"torch.Size([32, 3, 256, 256])", "torch.Size([32, 512])"}
    assert len(printed) == 2 * SHARDS * PER_SHARD // 32
    dataset = namespace["dataset"]
    dataset.extra_keys = ("__key__",)
    keys = []
    for _img, emb, key in dataset:
        np.testing.assert_array_equal(emb.numpy(), rows[int(key[:4])][int(key[4:])])
        keys.append(key)
    assert sorted(keys) == sorted(f"{s:04d}{i:04d}" for s in range(SHARDS) for i in range(PER_SHARD))
    tar_gets = {p: n for p, n in srv.get_counts(kind="raw").items() if p.endswith(".tar")}
    assert set(tar_gets) == {f"webdataset/{s:04d}.tar" for s in range(SHARDS)}


def test_prior_reader_over_dagshub_urls(tmp_path, monkeypatch, make_server):
    from conftest import TOKEN
    from streamloader.dataloaders import get_reader, make_splits

    (tmp_path / "data/img_emb").mkdir(parents=True)
    (tmp_path / "data/meta").mkdir(parents=True)
    start = 0
    for number, n in {0: 40, 2: 30, 10: 30}.items():  # numeric order: 0, 2, 10
        np.save(tmp_path / f"data/img_emb/img_emb_{number}.npy", np.full((n, 8), start, np.float32)
                + np.arange(n, dtype=np.float32)[:, None])
        pd.DataFrame({"caption": [f"c{i}" for i in range(start, start + n)]}).to_parquet(
            tmp_path / f"data/meta/metadata_{number}.parquet")
        start += n
    srv = make_server(str(tmp_path), token=TOKEN)
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", srv.url)
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    reader = get_reader(text_conditioned=True, img_url="dagshub://user/repo/data/img_emb/",
                        meta_url="dagshub://user/repo/data/meta/")
    train, _eval, _test = make_splits(text_conditioned=True, batch_size=10, num_data_points=100, train_split=0.8,
                                      eval_split=0.1, image_reader=reader)
    for emb, caps in train:
        assert [f"c{int(v)}" for v in emb[:, 0].tolist()] == list(caps)
