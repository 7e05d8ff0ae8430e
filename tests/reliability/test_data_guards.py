"""Issue 15 items 15-17 (adversarial review): line ends and BOMs in labels.tsv, skip counters counted once per
epoch, and tar members bounded in size. Every case is read through the real local server where a loader reads
remote data, and each test failed before its fix.
"""
from __future__ import annotations

import io
from collections import Counter

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
