"""Issue 15 items 15-17 (adversarial review): line ends and BOMs in labels.tsv, skip counters counted once per
epoch, and tar members bounded in size. Every case is read through the real local server where a loader reads
remote data, and each test failed before its fix.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest

from conftest import TOKEN
from streamloader.data.filters import filter_labels
from streamloader.data.labels import LabelReader, LabelRow, read_labels
from streamloader.errors import DataFormatError

BOM = b"\xef\xbb\xbf"


# --- item 15: "\r\n", "\r" and "\n" all end a line; a BOM is stripped on the first line only ----------------------
def _naive_rows(data: bytes):
    """The guide's reading (text mode: universal newlines), parsed with the spec's last-two-fields rule."""
    rows = []
    for line in io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline=None):
        line = line.rstrip("\n")
        if line.strip():
            head, score, url = line.rsplit("\t", 2)
            file, _, caption = head.partition("\t")
            rows.append(LabelRow(file, caption, float(score), url))
    return rows


MIXED = (BOM + b"a.jpg\tA squirrel\t1.0\thttp://x/a\r"   # lone CR
         b"b.jpg\tb\tcaption\t2.0\thttp://x/b\r\n"       # CRLF
         b"c.jpg\tcaption with a Squirrel\t3.0\thttp://x/c\n"
         b"\r"                                             # a blank line made of a lone CR
         b"d.jpg\td squirrel\t4.5\thttp://x/d\r")         # lone CR at the end of the file


def _all_paths(source_factory, keyword: str = "squirrel"):
    """(rows, filtered files) from every parse path: full iteration at several block sizes, the keyword fast path
    and the in-memory filter."""
    results = []
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        reader = LabelReader(source_factory(), on_error="raise", chunk_size=chunk)
        rows = list(reader)
        selected = filter_labels(LabelReader(source_factory(), chunk_size=chunk), keyword)
        results.append((rows, selected.files, reader.stats["rows"], selected.scanned))
    return results


def test_lone_cr_crlf_and_lf_are_all_line_ends_in_every_parse_path(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_bytes(MIXED)
    expected = _naive_rows(MIXED)
    assert [r.file for r in expected] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    squirrels = [r.file for r in expected if "squirrel" in r.caption.lower()]
    for rows, files, count, scanned in _all_paths(lambda: io.BytesIO(MIXED)):
        assert rows == expected  # a.jpg keeps its own score: rows are never merged
        assert files == squirrels == ["a.jpg", "c.jpg", "d.jpg"]
        assert count == scanned == 4
    assert list(read_labels(path)) == expected
    assert filter_labels(path, "squirrel").files == squirrels
    # a file with only lone CRs (old Mac line ends), longer than one block, is many rows, not one huge line
    old_mac = b"".join(b"%04d.jpg\tcap %d\t%d.5\thttp://x/%d\r" % (i, i, i % 9, i) for i in range(3000))
    reader = LabelReader(io.BytesIO(old_mac), chunk_size=4096)
    assert [r.score for r in reader] == [i % 9 + 0.5 for i in range(3000)] and reader.stats["rows"] == 3000


def test_a_bom_on_a_later_line_is_a_malformed_row_not_part_of_a_file_name(tmp_path):
    # two labels files concatenated, each written with a BOM: the second BOM starts line 3
    data = BOM + b"a.jpg\tcap\t1.0\tu\nb.jpg\tcap\t2.0\tu\n" + BOM + b"c.jpg\tcap squirrel\t3.0\tu\n"
    path = tmp_path / "labels.tsv"
    path.write_bytes(data)
    with pytest.raises(DataFormatError, match=r"line 3: BOM at start of file name"):
        list(read_labels(path))
    with pytest.raises(DataFormatError, match=r"line 3: BOM at start of file name"):
        filter_labels(path, "squirrel")
    for chunk in (1, 5, 1 << 20):
        reader = LabelReader(path, on_error="skip", chunk_size=chunk)
        assert [r.file for r in reader] == ["a.jpg", "b.jpg"]
        assert reader.stats["skipped"] == 1 and reader.stats["reasons"] == Counter({"BOM at start of file name": 1})
        result = filter_labels(LabelReader(path, on_error="skip", chunk_size=chunk), "squirrel")
        assert result.files == [] and result.skipped == 1 and result.scanned == 3
    # only the first line's BOM is a BOM; U+FEFF inside a caption is just text
    inner = BOM + b"a.jpg\tzero\xef\xbb\xbfwidth\t1.0\tu\n"
    assert list(read_labels(io.BytesIO(inner))) == [LabelRow("a.jpg", "zero\ufeffwidth", 1.0, "u")]


def test_served_labels_with_lone_crs_give_the_laion_dataset_the_right_rows(tmp_path, make_server, served_env):
    from streamloader.data.laion import LaionAestheticsDataset

    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "labels.tsv").write_bytes(MIXED + BOM + b"e.jpg\tsquirrel\t5.0\tu\r")
    served_env(make_server(root, token=TOKEN), TOKEN)
    url = "dagshub://user/repo/data/labels.tsv"
    ds = LaionAestheticsDataset(url, "dagshub://user/repo/data", keywords="squirrel", on_error="skip")
    assert ds.files == ["a.jpg", "c.jpg", "d.jpg"] and ds.scores == [1.0, 3.0, 4.5]
    assert ds.stats["malformed_rows"] == 1 and ds.stats["scanned"] == 5
    with pytest.raises(DataFormatError, match="line 6: BOM"):
        LaionAestheticsDataset(url, "dagshub://user/repo/data")


# --- item 16: on_error="skip" counts each bad item once per epoch, not once per substitution step -------------------
@pytest.fixture
def mostly_bad_laion(tmp_path, make_server, served_env):
    """8 served images of which 6 are bad (4 cut-off JPEGs, 2 missing): only items 0 and 5 can be read."""
    from streamloader.synthetic import make_laion_repo

    laion = make_laion_repo(tmp_path / "laion", n_images=8, n_squirrel=1, image_size=(16, 16), seed=5)
    for index in (1, 2, 6, 7):
        path = laion.image_path(laion.files[index])
        path.write_bytes(path.read_bytes()[:150])  # served whole, undecodable: bad data, not a network error
    for index in (3, 4):
        laion.image_path(laion.files[index]).unlink()
    served_env(make_server(laion.root, token=TOKEN), TOKEN)
    return laion


@pytest.mark.timeout(120)
def test_skip_counts_each_bad_image_once_per_epoch_across_workers(mostly_bad_laion, figures):
    from torch.utils.data import DataLoader

    from streamloader.data.laion import LaionAestheticsDataset

    urls = ("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data")
    ds = LaionAestheticsDataset(*urls, on_error="skip")
    assert len(ds) == 8
    # in this process: every index once is one epoch; substitutes are the next readable items, in index order
    first = [ds[i][1].item() for i in range(8)]
    scores = ds.scores
    assert first == pytest.approx([scores[i] for i in (0, 5, 5, 5, 5, 5, 0, 0)], rel=1e-6)
    assert (ds.stats["decode_error"], ds.stats["missing_image"], ds.stats["skipped"]) == (4, 2, 6)
    [ds[i] for i in range(8)]  # a second epoch counts each bad item once more
    assert ds.stats["skipped"] == 12
    # two DataLoader workers, each with its own copy: still once per bad item per epoch, summed over the workers
    ds.reset_stats()
    for epoch in (1, 2):
        batches = list(DataLoader(ds, batch_size=4, num_workers=2))
        assert [len(scores_) for _images, scores_ in batches] == [4, 4]  # full batches of readable neighbours
        assert (ds.stats["decode_error"], ds.stats["missing_image"]) == (4 * epoch, 2 * epoch)
        assert ds.stats["skipped"] == 6 * epoch
    figures.update(items=8, bad=6, skipped_per_epoch=6, processes=3)


# --- item 17: a tar member over max_member_bytes is a typed error or a counted skip, never read into memory -------
HUGE = 128 << 20  # a 128 MiB member that gzip shrinks to ~130 KB (the review's case: 300 MB, +600 MB of memory)


def _tar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def _write_gzip_bomb(path, before: bytes, huge_name: str, after: bytes) -> None:
    """A .tar.gz of ``before`` members, a member of HUGE zero bytes, then ``after`` and the end of the archive.

    Written in well under a second: each piece is deflated on its own and full-flushed (byte-aligned, no reference
    back past its start), so one deflated MiB of zeros can simply be repeated."""
    header = tarfile.TarInfo(huge_name)
    header.size = HUGE
    head = before + header.tobuf(tarfile.USTAR_FORMAT)
    tail = after + b"\0" * 1024

    def deflated(data: bytes, final: bool = False) -> bytes:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        return packer.compress(data) + packer.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    mib = bytes(1 << 20)
    crc = zlib.crc32(head)
    for _ in range(HUGE >> 20):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + HUGE + len(tail)
    body = deflated(head) + deflated(mib) * (HUGE >> 20) + deflated(tail, final=True)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + struct.pack("<II", crc, size & 0xFFFFFFFF))


@pytest.fixture
def bomb_repo(tmp_path, make_server, served_env):
    from conftest import make_jpeg

    jpeg = make_jpeg(tmp_path / "x.jpg", seed=2)
    npy = io.BytesIO()
    np.save(npy, np.ones(4, np.float32))
    shards = tmp_path / "repo" / "shards"
    shards.mkdir(parents=True)

    def sample(key: str) -> bytes:
        return _tar_member(f"{key}.jpg", jpeg) + _tar_member(f"{key}.npy", npy.getvalue())

    _write_gzip_bomb(shards / "bomb.tar.gz", sample("00000000"), "00000001.jpg",
                     _tar_member("00000001.npy", npy.getvalue()) + sample("00000002"))
    (shards / "good.tar").write_bytes(sample("00000000") + b"\0" * 1024)
    assert (shards / "bomb.tar.gz").stat().st_size < 1 << 20
    served_env(make_server(tmp_path / "repo", token=TOKEN), TOKEN)
    return "dagshub://user/repo/shards/bomb.tar.gz"


_MEASURE_RSS = """
import json, resource, sys
from streamloader.data.counters import SharedCounters
from streamloader.data.tars import SKIP_REASONS, iter_samples, skip_and_count
list(iter_samples(sys.argv[2]))  # warm up: imports, the HTTP session, the cache
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
counters = SharedCounters(SKIP_REASONS)
keys = [s["__key__"] for s in iter_samples(sys.argv[1], handler=skip_and_count, counters=counters)]
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"growth_mb": growth_kib / 1024, "keys": keys, "stats": counters.as_dict()}))
"""


@pytest.mark.timeout(120)
def test_a_huge_tar_member_is_refused_or_skipped_with_bounded_memory(bomb_repo, figures):
    from streamloader.data.tar_embeddings import ImageEmbeddingDataset
    from streamloader.data.tars import DEFAULT_MAX_MEMBER_BYTES, iter_samples, skip_and_count

    assert DEFAULT_MAX_MEMBER_BYTES < HUGE
    # the default policy: a typed error naming the member, its size and the limit, before reading any of it
    with pytest.raises(DataFormatError, match=r"00000001\.jpg.* 134,217,728 bytes.*max_member_bytes"):
        list(iter_samples(bomb_repo))
    # skipping, in a fresh process: the sample goes (counted once), its neighbours stay, and memory stays flat
    good = bomb_repo.replace("bomb.tar.gz", "good.tar")
    proc = subprocess.run([sys.executable, "-c", _MEASURE_RSS, bomb_repo, good], capture_output=True, text=True,
                          timeout=100, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["keys"] == ["00000000", "00000002"]
    assert result["stats"]["oversized_member"] == 1 and sum(result["stats"].values()) == 1
    assert result["growth_mb"] < 100, result
    # the loader: the same skip through the handler, counted once (no second "incomplete sample" count)
    ds = ImageEmbeddingDataset(bomb_repo, handler=skip_and_count, extra_keys=("__key__",))
    assert [key for _image, _emb, key in ds] == ["00000000", "00000002"]
    assert ds.stats["oversized_member"] == 1 and sum(ds.stats.values()) == 1
    # and the limit is the caller's to set
    with pytest.raises(DataFormatError, match=r"00000000\.jpg.*over the 100-byte limit"):
        list(ImageEmbeddingDataset(good, max_member_bytes=100))
    with pytest.raises(ValueError, match="max_member_bytes"):
        ImageEmbeddingDataset(good, max_member_bytes=0)
    figures.update(member_mb=HUGE >> 20, rss_growth_mb=round(result["growth_mb"], 1), processes=2)
