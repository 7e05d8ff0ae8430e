"""Prior embedding reader, PriorEmbeddingDataset and make_splits (disjoint, covering, equal batches per rank)."""
from __future__ import annotations

import textwrap

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from _helpers import gather_from_gloo_ranks
from streamloader.data.embedding_reader import check_paired, get_reader
from streamloader.data.embedding_splits import PriorEmbeddingDataset, make_splits, rank_share
from streamloader.errors import DataFormatError

# File numbers deliberately sort differently as strings ("10" < "2").
FILES = {0: 7, 1: 5, 2: 9, 10: 6}


def _write(root, files=FILES, dim=4, dtype=np.float32):
    """Row r (global, in numeric file order) has value r in column 0; captions say the same."""
    img, txt, meta = root / "img_emb", root / "text_emb", root / "metadata"
    for d in (img, txt, meta):
        d.mkdir(parents=True, exist_ok=True)
    row = 0
    for number, n in sorted(files.items()):
        ids = np.arange(row, row + n)
        block = np.ones((n, dim), dtype)
        block[:, 0] = ids
        np.save(img / f"img_emb_{number}.npy", block)
        np.save(txt / f"text_emb_{number}.npy", -block)
        pd.DataFrame({"caption": [f"row {i}" for i in ids], "image_path": ["x"] * n}).to_parquet(
            meta / f"metadata_{number}.parquet"
        )
        row += n
    return str(img), str(txt), str(meta)


def test_reader_reads_in_numeric_file_order_across_boundaries(tmp_path):
    img, _, meta = _write(tmp_path)
    reader = get_reader(text_conditioned=True, img_url=img, meta_url=meta)
    assert (reader.count, reader.dimension, reader.nb_files, reader.dtype) == (27, 4, 4, np.float32)
    assert reader.file_rows() == [(0, 7), (1, 5), (2, 9), (10, 6)]
    np.testing.assert_array_equal(reader.read_rows(5, 22)[:, 0], np.arange(5, 22))
    assert reader.read_meta(20, 23) == ["row 20", "row 21", "row 22"]
    batches = list(reader(batch_size=10, start=3, end=27))
    assert [len(e) for e, _ in batches] == [10, 10, 4]
    assert list(batches[1][1]["caption"]) == [f"row {i}" for i in range(13, 23)]
    with pytest.raises(IndexError):
        reader.read_rows(20, 28)


def test_get_reader_is_lazy_and_checks_arguments(tmp_path):
    reader = get_reader(text_conditioned=True, img_url=str(tmp_path / "nope"), meta_url=str(tmp_path / "nope2"))
    with pytest.raises(FileNotFoundError):
        reader.count  # noqa: B018 - the first access does the I/O
    with pytest.raises(ValueError, match="meta_url"):
        get_reader(text_conditioned=True, img_url="x")
    with pytest.raises(ValueError, match="txt_url"):
        get_reader(text_conditioned=False, img_url="x")


def test_reader_over_fsspec_memory(tmp_path):
    img, txt, meta = _write(tmp_path)
    for local, remote in ((img, "memory://prior/img"), (meta, "memory://prior/meta")):
        fs = fsspec.filesystem("file")
        for path in fs.ls(local, detail=False):
            with fsspec.open(f"{remote}/{path.rsplit('/', 1)[-1]}", "wb") as f:
                f.write(fs.cat_file(path))
    reader = get_reader(True, "memory://prior/img", meta_url="memory://prior/meta")
    np.testing.assert_array_equal(reader.read_rows(0, 27)[:, 0], np.arange(27))
    assert reader.read_meta(26, 27) == ["row 26"]


@pytest.mark.parametrize("problem", ["dtype", "dim", "meta_rows", "meta_missing", "no_caption", "text_rows"])
def test_paired_file_validation(tmp_path, problem):
    img, txt, meta = _write(tmp_path)
    if problem == "dtype":
        np.save(f"{img}/img_emb_2.npy", np.ones((9, 4), np.float16))
    elif problem == "dim":
        np.save(f"{img}/img_emb_2.npy", np.ones((9, 5), np.float32))
    elif problem == "meta_rows":
        pd.DataFrame({"caption": ["a"] * 8}).to_parquet(f"{meta}/metadata_2.parquet")
    elif problem == "meta_missing":
        (tmp_path / "metadata" / "metadata_10.parquet").unlink()
    elif problem == "no_caption":
        pd.DataFrame({"text": ["a"] * 9}).to_parquet(f"{meta}/metadata_2.parquet")
    elif problem == "text_rows":
        np.save(f"{txt}/text_emb_10.npy", np.ones((5, 4), np.float32))
    with pytest.raises(DataFormatError):
        if problem == "text_rows":
            check_paired(*get_reader(False, img, txt_url=txt))
        else:
            get_reader(True, img, meta_url=meta).count  # noqa: B018


def test_dataset_yields_embeddings_with_captions_or_text_embeddings(tmp_path):
    img, txt, meta = _write(tmp_path)
    reader = get_reader(True, img, meta_url=meta)
    ds = PriorEmbeddingDataset(True, 4, 5, 15, reader)
    assert len(ds) == 3
    out = list(DataLoader(ds, batch_size=None))
    assert [e.shape[0] for e, _ in out] == [4, 4, 2] and out[0][0].dtype == torch.float32
    assert out[2][1] == ["row 13", "row 14"]
    tokenizer = lambda caps: torch.tensor([len(c) for c in caps])  # noqa: E731 - stands in for clip.tokenize
    tokenized = PriorEmbeddingDataset(True, 4, 5, 15, reader, tokenizer=tokenizer)
    assert next(iter(tokenized))[1].tolist() == [5, 5, 5, 5]
    img_reader, txt_reader = get_reader(False, img, txt_url=txt)
    pairs = list(PriorEmbeddingDataset(False, 5, 0, 27, img_reader, txt_reader))
    assert len(pairs) == 6
    assert all(torch.equal(i, -t) for i, t in pairs)
    with pytest.raises(ValueError):
        PriorEmbeddingDataset(False, 5, 0, 27, img_reader)
    with pytest.raises(ValueError):
        PriorEmbeddingDataset(True, 5, 0, 27, img_reader)  # no captions


def test_dataset_deals_batches_to_workers_once(tmp_path):
    img, _, meta = _write(tmp_path)
    ds = PriorEmbeddingDataset(True, 3, 0, 27, get_reader(True, img, meta_url=meta))
    rows = [int(r) for e, _ in DataLoader(ds, batch_size=None, num_workers=2) for r in e[:, 0]]
    assert sorted(rows) == list(range(27))


@pytest.mark.parametrize("size", range(0, 24))
@pytest.mark.parametrize("world, batch", [(1, 4), (3, 2), (3, 4), (4, 3), (2, 1), (5, 7)])
def test_rank_share_is_disjoint_and_balanced(size, world, batch):
    shares = [rank_share(size, r, world, batch) for r in range(world)]
    assert len({n for _, _, n in shares}) == 1  # the same number of batches everywhere
    covered = [i for offset, rows, _ in shares for i in range(offset, offset + rows)]
    assert len(covered) == len(set(covered))
    if not (size % world and (size < world or batch == 1)):
        assert sorted(covered) == list(range(size))
    for offset, rows, n in shares:
        # the dataset accepts every share (it raises when rows cannot fill exactly n batches)
        assert len(PriorEmbeddingDataset(True, batch, offset, offset + rows, None, num_batches=n)) == n


def _split_rows(loader):
    return [int(r) for emb, _ in loader for r in emb[:, 0]]


def test_make_splits_cover_honour_start_and_balance(tmp_path):
    img, txt, meta = _write(tmp_path)
    reader = get_reader(True, img, meta_url=meta)
    args = dict(text_conditioned=True, batch_size=2, num_data_points=22, train_split=0.5, eval_split=0.25,
                image_reader=reader, start=4, world_size=3)
    per_rank = [make_splits(rank=r, **args) for r in range(3)]
    for split in range(3):
        lengths = {len(loaders[split]) for loaders in per_rank}
        counted = {len(list(loaders[split])) for loaders in per_rank}
        assert len(lengths) == 1 and lengths == counted
    rows = [[r for loaders in per_rank for r in _split_rows(loaders[split])] for split in range(3)]
    assert rows[0] == list(range(4, 15)) and rows[1] == list(range(15, 20)) and rows[2] == list(range(20, 26))
    # asking for more than exists clamps to what is after start (with a warning), never past the end
    train, val, test = make_splits(True, 4, 10**6, 0.5, 0.25, reader, start=7)
    assert sorted(_split_rows(train) + _split_rows(val) + _split_rows(test)) == list(range(7, 27))
    with pytest.raises(ValueError):
        make_splits(True, 4, 10, 0.8, 0.3, reader)
    with pytest.raises(ValueError):
        make_splits(True, 4, 10, 0.5, 0.25, reader, start=27)
    with pytest.raises(ValueError):
        make_splits(True, 4, 10, 0.5, 0.25, reader, rank=3, world_size=3)


def test_make_splits_without_text_conditioning(tmp_path):
    img, txt, _ = _write(tmp_path)
    img_reader, txt_reader = get_reader(False, img, txt_url=txt)
    train, val, test = make_splits(False, 3, 27, 0.6, 0.2, img_reader, txt_reader)
    for loader in (train, val, test):
        for i, t in loader:
            assert torch.equal(i, -t)
    assert sum(len(i) for i, _ in test) == 27 - 16 - 5


SPLIT_RANK = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist

    def work(rank, world, img, meta):
        from streamloader.dataloaders import get_reader, make_splits
        reader = get_reader(text_conditioned=True, img_url=img, meta_url=meta)
        loaders = make_splits(text_conditioned=True, batch_size=2, num_data_points=25, train_split=0.5,
                              eval_split=0.25, image_reader=reader, start=2, rank=rank, world_size=world)
        mine = []
        for loader in loaders:
            rows = []
            for emb, captions in loader:
                dist.all_reduce(torch.ones(1))  # a DDP step: unequal batch counts would hang here
                rows += [int(r) for r in emb[:, 0]]
                assert captions == ["row %d" % int(r) for r in emb[:, 0]]
            mine.append(rows)
        return mine
    """
)


def test_three_ranks_get_disjoint_covering_splits_with_equal_steps(tmp_path):
    img, _, meta = _write(tmp_path / "data")
    per_rank = gather_from_gloo_ranks(tmp_path, SPLIT_RANK, 3, img, meta)
    edges = [2, 14, 20, 27]
    for split in range(3):
        rows = sorted(r for rank in per_rank for r in rank[split])
        assert rows == list(range(edges[split], edges[split + 1]))
