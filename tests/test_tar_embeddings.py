"""ImageEmbeddingDataset / create_image_embedding_dataloader: outputs, exactly-once, shuffling, every error path."""
from __future__ import annotations

import collections
import io
import os
import textwrap

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from torch.utils.data import DataLoader

from _helpers import gather_from_gloo_ranks
from streamloader.data.tar_embeddings import ImageEmbeddingDataset, create_image_embedding_dataloader
from streamloader.data.tar_samples import shuffle_buffer
from streamloader.data.shardgen import make_synthetic_shards, write_tar
from streamloader.data.tars import skip_and_count, warn_and_continue
from streamloader.errors import DataFormatError


def _shards(path, n_shards=4, per_shard=6, external=True, **kw):
    return make_synthetic_shards(
        path, n_shards, per_shard, image_size=16, emb_dim=8, external_embeddings=external, **kw
    )


def _keys(dataset, num_workers=0, batch_size=None):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return [item[-1] for item in loader]


def _jpeg(size=16):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("external", [True, False])
def test_default_outputs_and_rows(tmp_path, external):
    info = _shards(tmp_path, external=external)
    loader = create_image_embedding_dataloader(
        tar_url=info.tar_url, embeddings_url=info.embeddings_url, num_workers=0, batch_size=5, shard_width=4,
        extra_keys=("__key__", "txt", "json"),
    )
    seen = []
    for img, emb, keys, captions, meta in loader:
        assert img.dtype == torch.float32 and img.shape[1:] == (3, 16, 16)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert emb.shape[1:] == (8,)
        for key, row, caption, index in zip(keys, emb, captions, meta["index"]):
            np.testing.assert_array_equal(row.numpy(), info.embeddings[key])
            assert caption == f"caption of {key}" and int(index) == int(key[4:])
        seen.extend(keys)
    assert sorted(seen) == sorted(info.keys)


def test_tarwriter_shards_with_external_embeddings(tmp_path):
    rows = {shard: np.random.default_rng(shard).standard_normal((5, 4)).astype(np.float32) + 5 for shard in (0, 1)}
    os.makedirs(tmp_path / "emb")
    for shard, array in rows.items():
        np.save(tmp_path / "emb" / f"img_emb_{shard:04d}.npy", array)
        with wds.TarWriter(str(tmp_path / f"{shard:04d}.tar")) as writer:
            for index in (4, 0, 2):  # sparse, unordered indices: rows are found by key, not position
                writer.write({"__key__": f"{shard:04d}{index:04d}", "jpg": _jpeg(), "seg.png": _jpeg()})
    dataset = ImageEmbeddingDataset(
        str(tmp_path / "{0000..0001}.tar"), embedding_folder_url=str(tmp_path / "emb"), shard_width=4,
        extra_keys=("__key__", "seg.png"), shuffle_shards=False,
    )
    out = list(dataset)
    assert [key for *_, key, _ in out] == ["00000004", "00000000", "00000002", "00010004", "00010000", "00010002"]
    for img, emb, key, seg in out:
        np.testing.assert_array_equal(emb.numpy(), rows[int(key[:4])][int(key[4:])])
        assert seg.shape == (3, 16, 16)


def test_exactly_once_across_workers_and_reproducible_shuffles(tmp_path):
    info = _shards(tmp_path, n_shards=5, per_shard=8)

    def make(**kw):
        return ImageEmbeddingDataset(
            info.tar_url, info.embeddings_url, shard_width=4, extra_keys=("__key__",), shuffle_num=10, seed=3, **kw
        )

    ds = make()
    first = _keys(ds, num_workers=2)
    assert sorted(first) == sorted(info.keys) and len(set(first)) == len(first)
    assert _keys(make(), num_workers=2) == first  # same seed, same epoch: same order
    ds.set_epoch(1)
    second = _keys(ds, num_workers=2)
    assert sorted(second) == sorted(first) and second != first
    ds.set_epoch(0)
    assert _keys(ds, num_workers=2) == first


def test_shuffle_num_takes_effect_and_buffer_is_a_permutation(tmp_path):
    info = _shards(tmp_path, n_shards=2, per_shard=20)
    plain = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",), shuffle_shards=False)
    shuffled = ImageEmbeddingDataset(
        info.tar_url, info.embeddings_url, extra_keys=("__key__",), shuffle_shards=False, shuffle_num=15
    )
    assert _keys(plain) == info.keys
    keys = _keys(shuffled)
    assert keys != info.keys and sorted(keys) == info.keys
    import random

    assert sorted(shuffle_buffer(range(100), 7, random.Random(0))) == list(range(100))


def test_set_epoch_reaches_persistent_workers(tmp_path):
    info = _shards(tmp_path, n_shards=4, per_shard=6)
    ds = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",), shuffle_num=8)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epoch0 = [k for *_, k in loader]
    ds.set_epoch(5)
    epoch5 = [k for *_, k in loader]
    ds.set_epoch(0)
    assert [k for *_, k in loader] == epoch0 != epoch5


def test_explicit_rank_split_partitions_the_shards(tmp_path):
    info = _shards(tmp_path, n_shards=6, per_shard=3)
    parts = [
        _keys(ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",), rank=r, world_size=3),
              num_workers=2)
        for r in range(3)
    ]
    flat = [k for part in parts for k in part]
    assert sorted(flat) == sorted(info.keys) and len(set(flat)) == len(flat)


def test_rank_from_environment(tmp_path, monkeypatch):
    info = _shards(tmp_path, n_shards=4, per_shard=3)
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append(_keys(ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",))))
    assert len(parts[0]) == len(parts[1]) == 6 and sorted(parts[0] + parts[1]) == info.keys


def test_fewer_shards_than_readers_warns_and_does_not_hang(tmp_path):
    info = _shards(tmp_path, n_shards=1, per_shard=5)
    with pytest.warns(UserWarning, match="only 1 shard"):
        loader = create_image_embedding_dataloader(info.tar_url, info.embeddings_url, num_workers=2, batch_size=2,
                                                   extra_keys=("__key__",))
    assert sorted(k for batch in loader for k in batch[-1]) == info.keys
    with pytest.warns(UserWarning, match="reader"):
        list(ImageEmbeddingDataset(info.tar_url, info.embeddings_url, rank=0, world_size=2))


def test_resampling_is_infinite_unless_epoch_length(tmp_path):
    info = _shards(tmp_path, n_shards=2, per_shard=3)
    endless = iter(ImageEmbeddingDataset(info.tar_url, info.embeddings_url, resample=True))
    assert len([next(endless) for _ in range(20)]) == 20  # more than the 6 samples that exist
    ds = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, resample=True, epoch_length=11)
    assert len(ds) == 11 and len(list(DataLoader(ds, batch_size=None, num_workers=2))) == 11
    loader = create_image_embedding_dataloader(info.tar_url, info.embeddings_url, num_workers=0, batch_size=4,
                                               resample_shards=True, epoch_length=10)
    assert len(loader) == 3 and sum(len(b[0]) for b in loader) == 10
    with pytest.raises(TypeError):
        len(ImageEmbeddingDataset(info.tar_url, info.embeddings_url))


def test_resampling_unusable_shards_errors_instead_of_spinning(tmp_path):
    (tmp_path / "0000.tar").write_bytes(b"junk" * 300)
    ds = ImageEmbeddingDataset(str(tmp_path / "0000.tar"), resample=True, handler=skip_and_count)
    with pytest.raises(DataFormatError, match="no usable sample"):
        next(iter(ds))


def test_img_preproc_gets_rgb_pil_images(tmp_path):
    info = _shards(tmp_path, n_shards=1, per_shard=2)
    seen = []

    def preproc(image):
        seen.append((image.mode, image.size))
        return torch.zeros(3, 4, 4)

    out = list(ImageEmbeddingDataset(info.tar_url, info.embeddings_url, img_preproc=preproc))
    assert seen == [("RGB", (16, 16))] * 2 and out[0][0].shape == (3, 4, 4)


def test_later_dalle2_names_return_an_embedding_dict(tmp_path):
    info = _shards(tmp_path, n_shards=2, per_shard=4)
    text_dir = tmp_path / "text_emb"
    os.makedirs(text_dir)
    for shard in (0, 1):
        np.save(text_dir / f"text_emb_{shard:04d}.npy", np.full((4, 6), shard + 1, np.float32))
    loader = create_image_embedding_dataloader(
        tar_url=info.tar_url, img_embeddings_url=info.embeddings_url, text_embeddings_url=str(text_dir),
        index_width=4, num_workers=0, batch_size=3, extra_keys=("__key__",),
    )
    count = 0
    for img, emb, keys in loader:
        assert set(emb) == {"img", "text"} and emb["text"].shape[1:] == (6,)
        for i, key in enumerate(keys):
            np.testing.assert_array_equal(emb["img"][i].numpy(), info.embeddings[key])
            assert float(emb["text"][i][0]) == int(key[:4]) + 1
        count += len(keys)
    assert count == 8
    with pytest.raises(TypeError, match="keyword"):
        create_image_embedding_dataloader(info.tar_url, 4, 32)
    with pytest.raises(ValueError):
        ImageEmbeddingDataset(info.tar_url, "a", img_embedding_folder_url="b")


def _run(dataset, num_workers=0):
    return [item[-1] for item in DataLoader(dataset, batch_size=None, num_workers=num_workers)]


def test_index_past_array_and_dimension_mismatch(tmp_path):
    info = _shards(tmp_path, n_shards=2, per_shard=5)
    np.save(os.path.join(info.embeddings_url, "img_emb_0001.npy"), np.ones((3, 8), np.float32))  # rows 3, 4 gone
    ds = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",), shuffle_shards=False)
    with pytest.raises(DataFormatError, match="index 3 out of range"):
        _run(ds)
    with pytest.raises(DataFormatError, match="index 3 out of range"):  # the same type through workers
        _run(ds, num_workers=2)
    ds = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",), handler=skip_and_count)
    assert sorted(_run(ds, num_workers=2)) == info.keys[:5] + ["00010000", "00010001", "00010002"]
    assert ds.stats["bad_embedding"] == 2  # counted in the workers, visible here
    ds = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, embedding_dim=16, handler=skip_and_count)
    assert _run(ds) == [] and ds.stats["bad_embedding"] == 2  # one per shard file
    with pytest.raises(DataFormatError, match="dimension 8, expected 16"):
        list(ImageEmbeddingDataset(info.tar_url, info.embeddings_url, embedding_dim=16))


def test_in_tar_embeddings_validation(tmp_path, caplog):
    good = np.ones(8, np.float32)
    write_tar(tmp_path / "0000.tar", [
        {"__key__": "00000000", "jpg": _jpeg(), "npy": _npy(good)},
        {"__key__": "00000001", "jpg": _jpeg()},  # a member without an embedding
        {"__key__": "00000002", "jpg": _jpeg(), "npy": _npy(np.zeros(8, np.float32))},  # missing marker
        {"__key__": "00000003", "jpg": _jpeg(), "npy": _npy(np.ones(4, np.float32))},  # wrong dimension
        {"__key__": "00000004", "jpg": b"not a jpeg", "npy": _npy(good)},  # corrupt image
        {"__key__": "00000005", "npy": _npy(good)},  # no image
        {"__key__": "00000006", "jpg": _jpeg(), "npy": b"garbage"},
        {"__key__": "00000007", "jpg": _jpeg(), "npy": _npy(good)},
    ])
    url = str(tmp_path / "0000.tar")
    with pytest.raises(DataFormatError, match="no .npy embedding"):
        list(ImageEmbeddingDataset(url))
    ds = ImageEmbeddingDataset(url, extra_keys=("__key__",), embedding_dim=8, handler=warn_and_continue)
    with caplog.at_level("INFO", logger="streamloader"):
        assert _run(ds) == ["00000000", "00000007"]
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()]
    assert len(warned) == 5  # one per handled error (the all-zero row is counted, not a warning)
    assert any("worker 0 epoch 0: skipped" in r.getMessage() for r in caplog.records)
    assert {k: v for k, v in ds.stats.items() if v} == {
        "incomplete_sample": 2, "missing_embedding": 1, "bad_embedding": 2, "decode_error": 1,
    }
    ds.reset_stats()
    assert not any(ds.stats.values())
    # without embedding_dim, the first embedding read sets it: a 4-long one is refused, not batched with 8-long ones
    write_tar(tmp_path / "0001.tar", [
        {"__key__": "00010000", "jpg": _jpeg(), "npy": _npy(good)},
        {"__key__": "00010001", "jpg": _jpeg(), "npy": _npy(np.ones(4, np.float32))},
        {"__key__": "00010002", "jpg": _jpeg(), "npy": _npy(good)},
    ])
    mixed = str(tmp_path / "0001.tar")
    with pytest.raises(DataFormatError, match="dimension 4, expected 8 .the dimension of the first one read"):
        list(ImageEmbeddingDataset(mixed))
    ds = ImageEmbeddingDataset(mixed, extra_keys=("__key__",), handler=skip_and_count)
    assert _run(ds) == ["00010000", "00010002"] and ds.stats["bad_embedding"] == 1


def test_all_zero_rows_malformed_keys_and_missing_embedding_files(tmp_path):
    info = _shards(tmp_path, n_shards=3, per_shard=4)
    rows = np.load(os.path.join(info.embeddings_url, "img_emb_0000.npy"))
    rows[2] = 0
    np.save(os.path.join(info.embeddings_url, "img_emb_0000.npy"), rows)
    os.remove(os.path.join(info.embeddings_url, "img_emb_0002.npy"))
    write_tar(tmp_path / "0003.tar", [{"__key__": "0003abcd", "jpg": _jpeg()}, {"__key__": "00040000", "jpg": _jpeg()}])
    np.save(os.path.join(info.embeddings_url, "img_emb_0003.npy"), np.ones((4, 8), np.float32))
    url = str(tmp_path / "{0000..0003}.tar")
    with pytest.raises(FileNotFoundError, match="shard 2"):
        list(ImageEmbeddingDataset(url, info.embeddings_url, shard_width=4, shuffle_shards=False))
    ds = ImageEmbeddingDataset(url, info.embeddings_url, shard_width=4, extra_keys=("__key__",), handler=skip_and_count)
    keys = _run(ds)
    assert sorted(keys) == ["00000000", "00000001", "00000003"] + info.keys[4:8]
    counted = {k: v for k, v in ds.stats.items() if v}
    assert counted == {"missing_embedding": 1, "missing_embedding_file": 1, "bad_key": 2}
    with pytest.raises(DataFormatError, match="not <shard digits>"):
        list(ImageEmbeddingDataset(str(tmp_path / "0003.tar"), info.embeddings_url, shard_width=4))


def test_corrupt_and_missing_shards_do_not_kill_a_skipping_run(tmp_path):
    info = _shards(tmp_path, n_shards=3, per_shard=4, external=False)
    data = open(info.tar_paths[1], "rb").read()
    open(info.tar_paths[1], "wb").write(data[: len(data) // 2])
    urls = info.tar_paths + [str(tmp_path / "0009.tar")]
    ds = ImageEmbeddingDataset(urls, extra_keys=("__key__",), handler=skip_and_count)
    keys = _run(ds, num_workers=2)
    assert set(info.keys[:4] + info.keys[8:]) <= set(keys) and len(set(keys)) == len(keys)
    assert ds.stats["unreadable_shard"] == 1 and ds.stats["missing_shard"] == 1
    with pytest.raises(DataFormatError, match="truncated"):
        list(ImageEmbeddingDataset(info.tar_paths[1]))


class CountingMemoryFS(MemoryFileSystem):
    """memory:// with a record of every file opened (shares memory://'s store)."""

    protocol = "countmem"
    opened: collections.Counter = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path):
        if path.startswith("countmem://"):
            path = "memory://" + path[len("countmem://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        CountingMemoryFS.opened[self._strip_protocol(path)] += 1
        return super()._open(path, mode, **kwargs)


def test_remote_shards_and_one_open_per_embedding_file(tmp_path):
    fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)
    info = _shards(tmp_path, n_shards=3, per_shard=5)
    for path in info.tar_paths:
        with fsspec.open(f"memory://ds/{os.path.basename(path)}", "wb") as f:
            f.write(open(path, "rb").read())
    for name in os.listdir(info.embeddings_url):
        with fsspec.open(f"memory://ds/emb/{name}", "wb") as f:
            f.write(open(os.path.join(info.embeddings_url, name), "rb").read())
    CountingMemoryFS.opened.clear()
    ds = ImageEmbeddingDataset("countmem://ds/{0000..0002}.tar", "countmem://ds/emb", shard_width=4,
                               extra_keys=("__key__",), shuffle_num=6)
    out = list(ds)
    assert sorted(k for *_, k in out) == info.keys
    for _, emb, key in out:
        np.testing.assert_array_equal(emb.numpy(), info.embeddings[key])
    npy_opens = {p: n for p, n in CountingMemoryFS.opened.items() if p.endswith(".npy")}
    assert sorted(npy_opens.values()) == [1, 1, 1], npy_opens


def test_dataset_pickles_for_spawned_workers(tmp_path):
    info = _shards(tmp_path, n_shards=2, per_shard=3)
    ds = ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",))
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert sorted(item[-1] for item in loader) == info.keys


RANK_WORK = textwrap.dedent(
    """
    def work(rank, world, tar_url, emb_url):
        from streamloader.dataloaders import create_image_embedding_dataloader
        loader = create_image_embedding_dataloader(tar_url=tar_url, embeddings_url=emb_url, num_workers=2,
                                                   batch_size=4, shard_width=4, shuffle_num=5,
                                                   extra_keys=("__key__",))
        return [k for batch in loader for k in batch[-1]]
    """
)


def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    info = _shards(tmp_path / "data", n_shards=6, per_shard=5)
    per_rank = gather_from_gloo_ranks(tmp_path, RANK_WORK, 2, info.tar_url, info.embeddings_url)
    flat = [k for keys in per_rank for k in keys]
    assert all(per_rank) and sorted(flat) == sorted(info.keys) and len(set(flat)) == len(flat)
