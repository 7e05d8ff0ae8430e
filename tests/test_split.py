"""train_valid_split: deterministic, disjoint, complete, sized as asked; Subsets for datasets, lists for rows."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import Subset

from streamloader.data.filters import filter_labels
from streamloader.data.labels import LabelRow
from streamloader.data.laion import LaionAestheticsDataset
from streamloader.data.split import split_indices, train_valid_split
from streamloader.synthetic import make_laion_repo


def _rows(n):
    return [LabelRow(f"{i:05d}.jpg", f"caption {i}", 6.5 + i / 100, "u") for i in range(n)]


@given(n=st.integers(0, 300), fraction=st.floats(0, 0.99), seed=st.integers(0, 2**31))
def test_row_split_properties(n, fraction, seed):
    rows = _rows(n)
    train, valid = train_valid_split(rows, fraction, seed)
    assert sorted(train + valid) == rows and not set(train) & set(valid)
    assert train == [r for r in rows if r in set(train)]  # original order kept
    expected = round(n * fraction)
    if fraction > 0 and n >= 2:
        expected = min(max(expected, 1), n - 1)
    assert len(valid) == expected
    assert (train, valid) == train_valid_split(rows, fraction, seed)


def test_seed_changes_the_split_and_is_stable_across_processes():
    rows = _rows(50)
    _, valid0 = train_valid_split(rows, 0.2, seed=0)
    _, valid1 = train_valid_split(rows, 0.2, seed=1)
    assert valid0 != valid1 and len(valid0) == len(valid1) == 10
    code = ("from streamloader.data.split import split_indices; "
            "print(split_indices([f'{i:05d}.jpg' for i in range(50)], 0.2, 0)[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([int(r.file[:5]) for r in valid0])


def test_split_of_a_dataset_gives_subsets(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=20, n_squirrel=0, image_size=(8, 8))
    ds = LaionAestheticsDataset(str(repo.labels_path), str(repo.root / "data"))
    train, valid = train_valid_split(ds, valid_fraction=0.25, seed=3)
    assert isinstance(train, Subset) and isinstance(valid, Subset) and train.dataset is ds
    assert len(valid) == 5 and len(train) == 15
    assert sorted(train.indices + valid.indices) == list(range(20))
    # the same rows as splitting the rows themselves (identity = file name)
    _, valid_rows = train_valid_split(ds.rows, 0.25, 3)
    assert [ds.files[i] for i in valid.indices] == [r.file for r in valid_rows]
    assert valid[0][1].shape == (1,)


def test_filter_result_and_plain_sequences():
    result = filter_labels(_rows(10), "caption")
    train, valid = train_valid_split(result, 0.3)
    assert len(train) == 7 and len(valid) == 3 and isinstance(train, list)
    train, valid = train_valid_split(list(range(10)), 0.5, seed=2)  # no file names: by index
    assert sorted(train + valid) == list(range(10)) and len(valid) == 5


def test_invalid_arguments():
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="valid_fraction"):
            split_indices(["a", "b"], bad)
    with pytest.raises(ValueError, match="seed"):
        split_indices(["a", "b"], 0.5, seed=1.5)
    assert split_indices(["a"], 0.5) == ([0], [])
    assert split_indices(["a", "b", "c"], 0) == ([0, 1, 2], [])
