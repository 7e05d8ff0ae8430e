""".npy header parsing, row reads (memory-mapped and ranged), folder matching, key parsing."""
from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest

from streamloader.data.embeddings import (
    EmbeddingFolder,
    NpyRows,
    ShardEmbeddings,
    list_numbered_files,
    npy_from_bytes,
    parse_key,
    read_npy_header,
    tar_shard_digits,
)
from streamloader.errors import DataFormatError


def _npy_bytes(array, version=None):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    return buf.getvalue()


def _mem_write(url, data):
    with fsspec.open(url, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_header_versions(version):
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    header = read_npy_header(io.BytesIO(_npy_bytes(array, version)))
    assert (header.rows, header.dim, header.dtype, header.row_bytes) == (3, 4, np.float16, 8)
    assert header.data_offset % 64 == 0


@pytest.mark.parametrize(
    "data, message",
    [
        (_npy_bytes(np.zeros(5, np.float32)), "2-D"),
        (_npy_bytes(np.zeros((2, 2, 2), np.float32)), "2-D"),
        (_npy_bytes(np.array([["a", "b"]])), "numeric"),
        (_npy_bytes(np.asfortranarray(np.ones((3, 4), np.float32))), "Fortran"),
        (b"definitely not numpy", "not a valid .npy"),
        (b"", "not a valid .npy"),
    ],
)
def test_bad_headers_are_data_format_errors(data, message):
    with pytest.raises(DataFormatError, match=message):
        read_npy_header(io.BytesIO(data), "x.npy")


def test_rows_local_memmap_and_remote_ranged_reads_agree(tmp_path):
    array = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    np.save(tmp_path / "e.npy", array)
    _mem_write("memory://emb/e.npy", _npy_bytes(array))
    with NpyRows(str(tmp_path / "e.npy")) as local, NpyRows("memory://emb/e.npy") as remote:
        assert local._memmap is not None and remote._memmap is None  # the two access paths
        for rows in (local, remote):
            assert rows.rows == 50 and rows.dim == 16
            np.testing.assert_array_equal(rows.row(37), array[37])
            np.testing.assert_array_equal(rows.read(10, 13), array[10:13])
            rows.row(0)[0] = 123.0  # a private, writable copy
            assert rows.row(0)[0] == array[0, 0]
            with pytest.raises(DataFormatError, match="out of range"):
                rows.row(50)
            with pytest.raises(DataFormatError, match="out of range"):
                rows.row(-1)


def test_truncated_npy_is_detected_at_open(tmp_path):
    data = _npy_bytes(np.ones((10, 8), np.float32))
    (tmp_path / "t.npy").write_bytes(data[:-5])
    _mem_write("memory://emb/t.npy", data[:-5])
    for url in (str(tmp_path / "t.npy"), "memory://emb/t.npy"):
        with pytest.raises(DataFormatError, match="truncated"):
            NpyRows(url)


def test_numbered_files_sort_numerically_and_conflicts_are_errors(tmp_path):
    for n in (10, 2, 1):
        np.save(tmp_path / f"img_emb_{n}.npy", np.ones((1, 2)))
    (tmp_path / "notes.txt").write_text("ignored")
    fs, path = fsspec.core.url_to_fs(str(tmp_path))
    found = list_numbered_files(fs, path, "npy")
    assert list(sorted(found["img_emb"])) == [1, 2, 10]
    np.save(tmp_path / "img_emb_0002.npy", np.ones((1, 2)))
    with pytest.raises(DataFormatError, match="claim number 2"):
        list_numbered_files(fs, path, "npy")


def test_embedding_folder_prefix_choice_and_missing_shard(tmp_path):
    np.save(tmp_path / "img_emb_0000.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "text_emb_0000.npy", np.full((2, 3), 2, np.float32))
    folder = EmbeddingFolder(str(tmp_path))
    assert folder.shards() == [0] and folder.prefix == "img_emb"
    assert EmbeddingFolder(str(tmp_path), prefix="text_emb").open_shard(0).row(1)[0] == 2
    with pytest.raises(FileNotFoundError, match="shard 7") as err:
        folder.open_shard(7)
    assert err.value.filename.endswith("img_emb_0007.npy")
    with pytest.raises(FileNotFoundError):
        EmbeddingFolder(str(tmp_path / "nowhere")).shards()


@pytest.mark.parametrize(
    "key, url, sw, iw, expected",
    [
        ("00010509", "/d/0001.tar", 4, None, (1, 509)),  # the seed's example
        ("0003039", "/d/0003.tar", 4, None, (3, 39)),
        ("00010509", "/d/0001.tar", None, 4, (1, 509)),  # later DALLE2 index_width
        ("00010509", "/d/0001.tar", 4, 4, (1, 509)),
        ("00010509", "/d/train-0001.tar.gz", None, None, (1, 509)),  # widths inferred from the tar name
        ("sub/00010509", "/d/0001.tar", 4, None, (1, 509)),
        ("0509", "/d/0001.tar", None, 4, (1, 509)),  # no shard digits in the key: the tar says
    ],
)
def test_parse_key(key, url, sw, iw, expected):
    assert parse_key(key, url, sw, iw) == expected


@pytest.mark.parametrize(
    "key, url, sw, iw, message",
    [
        ("0001a509", "/d/0001.tar", 4, None, "not <shard digits>"),
        ("0001", "/d/0001.tar", 4, None, "too short"),
        ("00010509", "/d/0002.tar", 4, None, "names shard 1, but it is in shard 2"),
        ("00010509", "/d/0001.tar", 4, 3, "4\\+3 digits"),
        ("00010509", "/d/shard.tar", None, None, "pass shard_width"),
        ("0509", "/d/shard.tar", None, 4, "no shard digits"),
    ],
)
def test_malformed_keys(key, url, sw, iw, message):
    with pytest.raises(DataFormatError, match=message):
        parse_key(key, url, sw, iw)


def test_tar_shard_digits():
    assert tar_shard_digits("dagshub://o/r/data/00012.tar") == "00012"
    assert tar_shard_digits("/d/shard.tar") is None


def test_shard_embeddings_open_each_file_once_and_check_dims(tmp_path):
    np.save(tmp_path / "img_emb_0000.npy", np.ones((4, 3), np.float32))
    np.save(tmp_path / "img_emb_0001.npy", np.full((4, 3), 2, np.float32))
    lookup = ShardEmbeddings(EmbeddingFolder(str(tmp_path)))
    values = [lookup.lookup(shard, i)[0] for shard in (0, 1) for i in range(4)]
    assert values == [1] * 4 + [2] * 4 and lookup.opened == 2
    lookup.close()
    with pytest.raises(DataFormatError, match="dimension 3, expected 5"):
        ShardEmbeddings(EmbeddingFolder(str(tmp_path)), dim=5).lookup(0, 0)


def test_npy_member_decoding():
    np.testing.assert_array_equal(npy_from_bytes(_npy_bytes(np.arange(4.0))), np.arange(4.0))
    np.testing.assert_array_equal(npy_from_bytes(_npy_bytes(np.ones((1, 3)))), np.ones(3))
    with pytest.raises(DataFormatError):
        npy_from_bytes(_npy_bytes(np.ones((2, 3))))
    with pytest.raises(DataFormatError):
        npy_from_bytes(b"garbage")
    with pytest.raises(DataFormatError):
        npy_from_bytes(_npy_bytes(np.array([{"a": 1}], dtype=object)))


def test_npy_member_header_must_match_its_bytes_and_any_byte_order_comes_out_native():
    from numpy.lib import format as npformat

    for shape in ((10 ** 13,), (1, 10 ** 12), (2 * 10 ** 9,)):
        bomb = io.BytesIO()
        npformat.write_array_header_1_0(bomb, {"descr": "<f4", "fortran_order": False, "shape": shape})
        bomb.write(b"\0" * 64)  # a 200-byte member claiming terabytes: refused before any allocation
        with pytest.raises(DataFormatError, match="header says"):
            npy_from_bytes(bomb.getvalue())
    with pytest.raises(DataFormatError, match="header says"):
        npy_from_bytes(_npy_bytes(np.arange(4.0))[:-3])  # cut short
    big = npy_from_bytes(_npy_bytes(np.arange(4.0, dtype=">f4")))  # big-endian: torch takes none but native
    assert big.dtype == np.dtype("=f4") and big.tolist() == [0.0, 1.0, 2.0, 3.0] and big.flags.writeable
    import torch

    assert torch.from_numpy(big).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_big_endian_embedding_files_read_in_native_byte_order(tmp_path):
    path = tmp_path / "img_emb_0.npy"
    np.save(path, np.arange(12, dtype=">f8").reshape(3, 4))
    with NpyRows(str(path)) as rows:
        row = rows.row(2)
    assert row.dtype == np.dtype("=f8") and row.tolist() == [8.0, 9.0, 10.0, 11.0]
    fs = fsspec.filesystem("memory")
    with fs.open("/e/img_emb_0.npy", "wb") as f:
        np.save(f, np.arange(12, dtype=">f4").reshape(3, 4))
    with NpyRows("memory://e/img_emb_0.npy") as rows:  # (read through a file, not a memory map)
        assert rows.read(0, 2).dtype == np.dtype("=f4") and rows.row(1).tolist() == [4.0, 5.0, 6.0, 7.0]
