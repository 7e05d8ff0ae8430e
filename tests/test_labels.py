"""labels.tsv reading, filtering, writing and the ``streamloader filter`` command, on real files."""
from __future__ import annotations

import builtins
import dataclasses
import logging
import math
import re
import uuid
from collections import Counter

import fsspec
import pytest
from conftest import LABEL_ROWS, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamloader.cli import main
from streamloader.data.filters import FilterResult, LabelFilter, filter_labels, sample_keeps
from streamloader.data.laion import LaionAestheticsDataset
from streamloader.data.labels import (
    MAX_LINE_BYTES, LabelReader, LabelRow, file_name_problem, parse_label_line, read_labels, write_labels,
)
from streamloader.errors import DataFormatError
from streamloader.synthetic import make_labels_file, make_laion_repo

ROWS = [
    LabelRow("00000000.jpg", "A red Squirrel on a branch", 7.25, "https://example.com/0.jpg"),
    LabelRow("00000001.jpg", "Sunset over the sea", 6.5, "https://example.com/1.jpg"),
    LabelRow("00000002.jpg", "Two cats\tand a squirrel", 8.5, "https://example.com/2.jpg"),
    LabelRow("00000003.jpg", "squirrels, cats and dogs", 7.0, "https://example.com/3.jpg"),
    LabelRow("00000004.jpg", "A grey squirrelfish", 6.9, "https://example.com/squirrel.jpg"),
    LabelRow("sub/00000005.jpg", "", 8.0, ""),
]
TEXT = "".join(f"{r.file}\t{r.caption}\t{r.score!r}\t{r.url}\n" for r in ROWS)


def write_bytes(tmp_path, data: bytes, name: str = "labels.tsv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- parsing ------------------------------------------------------------------------------------------------------
def test_caption_tabs_first_field_file_last_two_score_url():
    row = parse_label_line("a.jpg\tA cat\twith\ttabs\t7.5\thttp://x/a.jpg\n")
    assert row == LabelRow("a.jpg", "A cat\twith\ttabs", 7.5, "http://x/a.jpg")
    assert parse_label_line("b.jpg\t\t7\t\r\n") == LabelRow("b.jpg", "", 7.0, "")


def test_reads_local_path_and_memory_url_identically(tmp_path):
    local = write_bytes(tmp_path, TEXT.encode())
    url = f"memory://streamloader-test-{uuid.uuid4().hex}/data/labels.tsv"
    with fsspec.open(url, "wb") as handle:
        handle.write(TEXT.encode())
    try:
        assert list(read_labels(local)) == ROWS
        assert list(read_labels(str(local))) == ROWS
        reader = read_labels(url)
        assert list(reader) == ROWS
        assert reader.stats == {"rows": 6, "skipped": 0, "blank": 0, "reasons": Counter()}
    finally:
        fsspec.filesystem("memory").rm(url)


def test_plain_paths_go_through_builtins_open_at_call_time(tmp_path, monkeypatch):
    # streamloader's hooks patch builtins.open: a path that only the patched open can serve must still be read
    real = write_bytes(tmp_path, TEXT.encode())
    original_open = builtins.open
    seen = []

    def hooked_open(file, *args, **kwargs):
        if file == "data/labels.tsv":
            seen.append(args)
            file = real
        return original_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", hooked_open)
    assert list(read_labels("data/labels.tsv")) == ROWS
    assert seen == [("rb",)]


def test_file_objects_are_read(tmp_path):
    path = write_bytes(tmp_path, TEXT.encode())
    with open(path, "rb") as handle:
        assert list(LabelReader(handle)) == ROWS


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf" + TEXT.encode(),  # UTF-8 BOM
        TEXT.replace("\n", "\r\n").encode(),  # CRLF
        TEXT.encode().rstrip(b"\n"),  # no final newline
        (b"\xef\xbb\xbf" + TEXT.replace("\n", "\r\n").encode()).rstrip(b"\r\n") + b"\r",  # all three, lone CR at EOF
        b"\n\n" + TEXT.replace("\n", "\n \n").encode() + b"\t\t\n",  # blank lines (spaces / tabs only) are ignored
    ],
    ids=["bom", "crlf", "no-final-newline", "bom-crlf-eof-cr", "blank-lines"],
)
def test_line_end_variants_read_the_same_rows(tmp_path, data):
    reader = read_labels(write_bytes(tmp_path, data))
    assert list(reader) == ROWS
    assert reader.stats["skipped"] == 0


def test_empty_and_blank_only_files(tmp_path):
    reader = read_labels(write_bytes(tmp_path, b""))
    assert list(reader) == []
    assert reader.stats == {"rows": 0, "skipped": 0, "blank": 0, "reasons": Counter()}
    reader = read_labels(write_bytes(tmp_path, b"\n \r\n\n", "blank.tsv"))
    assert list(reader) == []
    assert reader.stats["blank"] == 3 and reader.stats["rows"] == 0


BAD_LINES = [  # (line, reason) — placed after a good first line, so line numbers start at 2
    ("only\ttwo\n", "too few fields"),
    ("\tcaption\t7.0\thttp://x\n", "empty file name"),
    ("a.jpg\tcaption\tseven\thttp://x\n", "non-numeric score"),
    ("a.jpg\tcaption\tnan\thttp://x\n", "nan score"),
    ("a.jpg\tcaption\t1e999\thttp://x\n", "non-finite score"),
    ("/etc/passwd\tcaption\t7\thttp://x\n", "absolute file name"),
    ("../secret.jpg\tcaption\t7\thttp://x\n", "'..' in file name"),
    ("a/../../b.jpg\tcaption\t7\thttp://x\n", "'..' in file name"),
    ("C:\\x.jpg\tcaption\t7\thttp://x\n", "absolute file name"),
    ("a\x00b.jpg\tcaption\t7\thttp://x\n", "control character in file name"),
]


def malformed_file(tmp_path):
    text = "ok0.jpg\tfirst\t7.0\thttp://x/0\n"
    for index, (line, _) in enumerate(BAD_LINES):
        text += line + f"ok{index + 1}.jpg\tgood {index + 1}\t7.5\thttp://x/{index + 1}\n"
    return write_bytes(tmp_path, text.encode())


def test_malformed_raise_names_line_and_reason_after_yielding_earlier_rows(tmp_path):
    path = malformed_file(tmp_path)
    got = []
    with pytest.raises(DataFormatError, match=r"line 2: too few fields"):
        for row in read_labels(path):
            got.append(row.file)
    assert got == ["ok0.jpg"]
    for index, (line, reason) in enumerate(BAD_LINES):
        single = write_bytes(tmp_path, ("x.jpg\tc\t7\tu\n\n" + line).encode(), f"bad{index}.tsv")
        with pytest.raises(DataFormatError, match=rf"line 3: {re.escape(reason)}"):
            list(read_labels(single))


def test_malformed_skip_counts_every_reason(tmp_path):
    reader = read_labels(malformed_file(tmp_path), on_error="skip")
    rows = list(reader)
    assert [row.file for row in rows] == [f"ok{i}.jpg" for i in range(len(BAD_LINES) + 1)]
    assert reader.stats["rows"] == len(BAD_LINES) + 1
    assert reader.stats["skipped"] == len(BAD_LINES)
    assert reader.stats["reasons"] == Counter(reason for _, reason in BAD_LINES)


def test_malformed_warn_logs_each_row_up_to_a_cap_then_a_summary(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="streamloader.data.labels")
    reader = read_labels(malformed_file(tmp_path), on_error="warn")
    assert len(list(reader)) == len(BAD_LINES) + 1
    messages = [record.getMessage() for record in caplog.records]
    assert "line 2: too few fields" in messages[0]
    assert len(BAD_LINES) == 10  # exactly the cap: no summary yet
    assert len(messages) == 10
    caplog.clear()
    many = "".join(f"f{i}.jpg\tcaption\tbad\turl\n" for i in range(25))
    reader = read_labels(write_bytes(tmp_path, many.encode(), "many.tsv"), on_error="warn")
    assert list(reader) == []
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 11
    assert "25 malformed rows skipped" in messages[-1] and "15 not logged" in messages[-1]


def test_undecodable_bytes_are_malformed_rows_with_line_numbers(tmp_path):
    data = b"a.jpg\tcaf\xc3\xa9\t7\tu\nb.jpg\tbad \xff byte\t7\tu\nc.jpg\tok\t8\tu\n"
    with pytest.raises(DataFormatError, match=r"line 2: undecodable bytes"):
        list(read_labels(write_bytes(tmp_path, data)))
    reader = read_labels(write_bytes(tmp_path, data), on_error="skip")
    assert [(r.file, r.caption) for r in reader] == [("a.jpg", "café"), ("c.jpg", "ok")]
    assert reader.stats["reasons"] == Counter({"undecodable bytes (utf-8)": 1})
    latin = [r.caption for r in read_labels(write_bytes(tmp_path, data), encoding="latin-1")]
    assert latin == ["cafÃ©", "bad ÿ byte", "ok"]
    with pytest.raises(ValueError, match="ASCII-compatible"):
        read_labels(write_bytes(tmp_path, data), encoding="utf-16")


@pytest.mark.parametrize(
    "name, problem",
    [
        ("a.jpg", None), ("dir/a.jpg", None), ("./a.jpg", None), ("a..b.jpg", None), ("..a.jpg", None),
        ("../a.jpg", "'..' in file name"), ("a/..", "'..' in file name"), ("a\\..\\..\\b", "'..' in file name"),
        ("/a.jpg", "absolute file name"), ("\\\\server\\a.jpg", "absolute file name"),
        ("c:a.jpg", "absolute file name"), ("   ", "empty file name"), ("a\nb", "control character in file name"),
    ],
)
def test_file_name_safety(name, problem):
    assert file_name_problem(name) == problem


def test_small_blocks_give_the_same_rows_stats_and_line_numbers(tmp_path):
    path = malformed_file(tmp_path)
    big = read_labels(path, on_error="skip")
    small = LabelReader(path, on_error="skip", chunk_size=7)
    assert list(small) == list(big)
    assert small.stats == big.stats
    with pytest.raises(DataFormatError, match="line 2:"):
        list(LabelReader(path, chunk_size=5))


def test_a_huge_line_without_newline_is_refused_not_buffered(tmp_path):
    path = write_bytes(tmp_path, b"a.jpg\tc\t7\tu\n" + b"x" * (MAX_LINE_BYTES + 10))
    with pytest.raises(DataFormatError, match=f"line 2: longer than {MAX_LINE_BYTES:,} bytes"):
        list(LabelReader(path, on_error="skip"))


def test_select_lines_hook_must_return_line_starts(labels):
    assert list(LabelReader(labels).iter_selected(lambda block: [0])) == [ROWS[0]]
    with pytest.raises(ValueError, match="not the start of a later line"):
        list(LabelReader(labels).iter_selected(lambda block: [3]))


def test_reader_argument_validation():
    with pytest.raises(ValueError, match="on_error"):
        LabelReader("x.tsv", on_error="ignore")
    with pytest.raises(ValueError, match="chunk_size"):
        LabelReader("x.tsv", chunk_size=0)
    with pytest.raises(ValueError, match="unknown encoding"):
        LabelReader("x.tsv", encoding="no-such-codec")


# --- an independent oracle: the spec's rules, written the slow obvious way -------------------------------------------
def oracle(data: str):
    rows, reasons = [], Counter()
    for line in re.split(r"\r\n|\r|\n", data.removeprefix("\ufeff")):  # universal newlines, like text mode
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            reasons["too few fields"] += 1
            continue
        file, caption, score, url = fields[0], "\t".join(fields[1:-2]), fields[-2], fields[-1]
        parts = re.split(r"[/\\]", file)
        if not file.strip():
            reasons["empty file name"] += 1
        elif file[0] == "\ufeff":
            reasons["BOM at start of file name"] += 1
        elif any(ord(c) < 32 or ord(c) == 127 for c in file):
            reasons["control character in file name"] += 1
        elif file[0] in "/\\" or re.match(r"[A-Za-z]:", file):
            reasons["absolute file name"] += 1
        elif ".." in parts:
            reasons["'..' in file name"] += 1
        elif score.strip().lower().lstrip("+-") == "nan":
            reasons["nan score"] += 1
        elif not re.fullmatch(r"\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*", score):
            reasons["non-numeric score"] += 1
        elif not math.isfinite(float(score)):
            reasons["non-finite score"] += 1
        else:
            rows.append(LabelRow(file, caption, float(score), url))
    return rows, reasons


TOKENS = list("ab.\\/: 09-+eE\t\r\u212aİ\x00\xa0é\ufeff") + ["nan", "..", "1e999", "7.5", "C:", "1" * 25, "squirrel"]
FIELD_TEXT = st.lists(st.sampled_from(TOKENS), max_size=6).map("".join)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(lines=st.lists(st.lists(FIELD_TEXT, min_size=1, max_size=5).map("\t".join), max_size=8))
def test_reader_agrees_with_the_oracle_on_arbitrary_lines(tmp_path, lines):
    data = "\n".join(lines)
    path = write_bytes(tmp_path, data.encode())
    reader = LabelReader(path, on_error="skip")
    expected_rows, expected_reasons = oracle(data)
    assert list(reader) == expected_rows
    assert reader.stats["reasons"] == expected_reasons
    needle_rows = [r for r in expected_rows if "e" in r.caption.lower()]
    assert filter_labels(path, "E", on_error="skip").rows == needle_rows


# --- filtering ------------------------------------------------------------------------------------------------------
def files(result: FilterResult):
    return [row.file.split("/")[-1][-5] for row in result.rows]  # "00000003.jpg" -> "3"


@pytest.fixture
def labels(tmp_path):
    return write_bytes(tmp_path, TEXT.encode())


def test_keyword_is_the_guides_case_insensitive_substring(labels):
    result = filter_labels(labels, "squirrel")
    assert files(result) == ["0", "2", "3", "4"]  # "Squirrel", after a tab, "squirrels", "squirrelfish"
    assert (result.scanned, result.matched, result.skipped) == (6, 4, 0)
    assert result.summary() == "4 of 6 rows matched (0 malformed skipped)"
    assert files(filter_labels(labels, "SQUIRREL")) == ["0", "2", "3", "4"]


def test_keyword_in_url_or_file_name_only_does_not_match(labels):
    assert "squirrel" in ROWS[4].url
    assert files(filter_labels(labels, "example")) == []
    assert files(filter_labels(labels, "sub/")) == []


def test_keyword_lists_any_all_exclude_whole_word(labels):
    assert files(filter_labels(labels, ["sunset", "cats"])) == ["1", "2", "3"]
    assert files(filter_labels(labels, ["squirrel", "cats"], match="all")) == ["2", "3"]
    assert files(filter_labels(labels, "squirrel", exclude=["fish", "dogs"])) == ["0", "2"]
    assert files(filter_labels(labels, "squirrel", whole_word=True)) == ["0", "2"]
    assert files(filter_labels(labels, "squirrel", exclude="cat")) == ["0", "4"]  # "cats" contains "cat"
    assert files(filter_labels(labels, "squirrel", exclude="cat", whole_word=True)) == ["0", "2"]  # not a word
    assert files(filter_labels(labels, exclude="squirrel")) == ["1", "5"]


def test_regex_score_range_limit(labels):
    assert files(filter_labels(labels, regex=r"\bSQUIRRELS?\b")) == ["0", "2", "3"]
    assert files(filter_labels(labels, regex=re.compile(r"squirrel"))) == ["2", "3", "4"]  # compiled: case-sensitive
    assert files(filter_labels(labels, min_score=7.0)) == ["0", "2", "3", "5"]  # inclusive
    assert files(filter_labels(labels, max_score=7.0)) == ["1", "3", "4"]  # inclusive
    assert files(filter_labels(labels, "squirrel", min_score=7, max_score=8)) == ["0", "3"]
    limited = filter_labels(labels, "squirrel", limit=2)
    assert files(limited) == ["0", "2"] and limited.stopped_early
    assert limited.scanned == 3  # the counts cover the rows read up to the limit
    assert filter_labels(labels, "squirrel", limit=0).rows == []


def test_sample_is_seeded_deterministic_and_about_the_fraction(tmp_path):
    path = tmp_path / "many.tsv"
    make_labels_file(path, 4000, squirrel_every=1)  # every row mentions a squirrel
    first = filter_labels(path, "squirrel", sample=0.25, seed=7)
    assert first.rows == filter_labels(path, "squirrel", sample=0.25, seed=7).rows
    assert first.matched == 4000
    assert 800 < len(first.rows) < 1200
    assert first.rows != filter_labels(path, "squirrel", sample=0.25, seed=8).rows
    assert [sample_keeps(r.file, 0.25, 7) for r in first.rows] == [True] * len(first.rows)
    assert len(filter_labels(path, "squirrel", sample=1.0).rows) == 4000
    # the sample decision is per row: a limit takes a prefix of the same sample
    assert filter_labels(path, "squirrel", sample=0.25, seed=7, limit=10).rows == first.rows[:10]


def test_unicode_lowercasing_matches_str_lower(tmp_path):
    rows = [
        LabelRow("0.jpg", "5 \u212a outside", 7, "u"),  # KELVIN SIGN lower-cases to ASCII "k"
        LabelRow("1.jpg", "İSTANBUL at night", 7, "u"),
        LabelRow("2.jpg", "CAFÉ DE FLORE", 7, "u"),
        LabelRow("3.jpg", "plain", 7, "u"),
    ]
    path = tmp_path / "u.tsv"
    write_labels(rows, path)
    for keyword in ["5 k", "i̇stanbul", "café", "plain", "k"]:
        expected = [r for r in rows if keyword in r.caption.lower()]
        assert filter_labels(path, keyword).rows == expected, keyword
        assert filter_labels(rows, keyword).rows == expected, keyword


def test_same_filter_on_rows_and_on_reader(labels):
    rows = list(read_labels(labels))
    for kwargs in [{"keywords": "squirrel"}, {"keywords": ["cats", "sea"], "min_score": 7}, {"regex": "cat"}]:
        from_path = filter_labels(labels, **kwargs)
        assert filter_labels(rows, **kwargs).rows == from_path.rows
        assert filter_labels(read_labels(labels), **kwargs).rows == from_path.rows
    keep = LabelFilter("squirrel", whole_word=True)
    assert [r.file for r in rows if keep(r)] == ["00000000.jpg", "00000002.jpg"]


def test_label_filter_is_one_frozen_normalized_value(labels):
    keep = LabelFilter(["Squirrel", "CATS"], match="all", exclude="dogs", min_score=7, limit=3, sample=1.0)
    assert keep.keywords == ("squirrel", "cats") and keep.exclude == ("dogs",) and keep.min_score == 7.0
    assert keep == LabelFilter(("squirrel", "cats"), match="all", exclude=["DOGS"], min_score=7.0, limit=3,
                               sample=1.0)
    assert len({keep, LabelFilter(("squirrel", "cats"), match="all", exclude="dogs", min_score=7.0, limit=3,
                                  sample=1.0)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        keep.limit = 5  # type: ignore[misc]
    assert LabelFilter(regex="sq.*rel").regex.search("SQUIRREL") is not None  # compiled, case-insensitive
    assert repr(LabelFilter("cat", limit=2)) == "LabelFilter(keywords=('cat',), limit=2)"
    # the same value and the same keywords select the same rows, limit and sample included
    options = {"keywords": "squirrel", "min_score": 6.5, "limit": 2, "sample": 0.9, "seed": 4}
    assert filter_labels(labels, label_filter=LabelFilter(**options)).rows == filter_labels(labels, **options).rows


def test_label_filter_or_its_keywords_not_both(labels):
    keep = LabelFilter("squirrel")
    same = filter_labels(labels, label_filter=keep, match="any", seed=0)  # defaults are not a second filter
    assert same.files == filter_labels(labels, "squirrel").files
    with pytest.raises(ValueError, match=r"label_filter or the filter options \(keywords, limit\)"):
        filter_labels(labels, "cats", label_filter=keep, limit=1)
    with pytest.raises(TypeError, match="must be a LabelFilter"):
        filter_labels(labels, label_filter={"keywords": "cats"})


def test_laion_dataset_takes_a_label_filter_or_builds_one(tmp_path):
    repo = make_laion_repo(tmp_path / "laion", n_images=12, n_squirrel=4, image_size=(8, 8), seed=1)
    data = str(repo.root / "data")
    by_keywords = LaionAestheticsDataset(str(repo.labels_path), data, None, 3, keywords="squirrel")
    by_value = LaionAestheticsDataset(str(repo.labels_path), data, label_filter=LabelFilter("squirrel", limit=3))
    assert by_keywords.label_filter == by_value.label_filter == LabelFilter("squirrel", limit=3)
    assert by_keywords.files == by_value.files == repo.squirrel_files[:3]
    with pytest.raises(ValueError, match="not both"):
        LaionAestheticsDataset(str(repo.labels_path), data, None, 3, label_filter=LabelFilter("squirrel"))


def test_int_at_least_is_the_one_integer_bound_of_the_cli():
    import argparse

    from streamloader.commands._remote import int_at_least

    assert int_at_least(0)("0") == 0 and int_at_least(1)("32") == 32
    for bound, text, message in ((0, "-1", "must be at least 0, got -1"), (1, "0", "must be at least 1, got 0"),
                                 (1, "x", "not an integer: 'x'")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            int_at_least(bound)(text)


def test_filter_counts_malformed_rows_in_the_fast_path(tmp_path):
    path = malformed_file(tmp_path)
    result = filter_labels(path, "good", on_error="skip")
    assert len(result.rows) == len(BAD_LINES)
    assert result.skipped == len(BAD_LINES)
    assert result.scanned == 2 * len(BAD_LINES) + 1
    assert result.reasons == Counter(reason for _, reason in BAD_LINES)
    with pytest.raises(DataFormatError, match="line 2: too few fields"):
        filter_labels(path, "squirrel")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"match": "some"}, "match must be"),
        ({"sample": 0}, "sample must be"),
        ({"sample": 1.5}, "sample must be"),
        ({"limit": -1}, "limit must be"),
        ({"min_score": 8, "max_score": 7}, "greater than max_score"),
        ({"min_score": float("nan")}, "min_score must be a number"),
        ({"keywords": [""]}, "non-empty"),
        ({"keywords": "a\nb"}, "newline"),
        ({"regex": "("}, "invalid regex"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_filter_argument_validation(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        filter_labels(labels, **kwargs)


# --- the guide's loop -----------------------------------------------------------------------------------------------
def guide_squirrels(labels_path):
    squirrel_files = []
    with open(labels_path) as f:
        for row in f.readlines():
            image_name, caption = row.split("\t")[:2]
            if "squirrel" in caption.lower():
                squirrel_files.append(image_name)
    return squirrel_files


def test_guide_loop_and_filter_labels_agree_without_tab_captions(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=120, n_squirrel=9, image_size=(8, 8), tab_captions=False)
    ours = filter_labels(repo.labels_path, "squirrel")
    assert guide_squirrels(repo.labels_path) == ours.files == repo.squirrel_files
    assert len(ours.files) == 9


def test_guide_split_is_wrong_on_tab_captions_ours_is_right(tmp_path):
    repo = make_laion_repo(tmp_path / "repo", n_images=120, n_squirrel=9, image_size=(8, 8), tab_captions=True)
    ours = filter_labels(repo.labels_path, "squirrel")
    assert ours.files == repo.squirrel_files
    guide = guide_squirrels(repo.labels_path)
    assert len(guide) < len(ours.files)  # the squirrel after the tab is lost by split('\t')[:2]
    assert set(guide) < set(ours.files)


# --- writing --------------------------------------------------------------------------------------------------------
def test_write_labels_round_trips_and_rejects_what_cannot(tmp_path):
    path = tmp_path / "out.tsv"
    assert write_labels(ROWS, path) == len(ROWS)
    assert list(read_labels(path)) == ROWS
    assert path.read_text(encoding="utf-8") == TEXT
    for bad in [
        LabelRow("a.jpg", "two\nlines", 7.0, "u"),
        LabelRow("a.jpg", "old\rmac", 7.0, "u"),
        LabelRow("\ufeffa.jpg", "c", 7.0, "u"),
        LabelRow("../a.jpg", "c", 7.0, "u"),
        LabelRow("a.jpg", "c", float("nan"), "u"),
        LabelRow("a.jpg", "c", 7.0, "tab\tin url"),
    ]:
        with pytest.raises(DataFormatError, match="cannot write row 2"):
            write_labels([ROWS[0], bad], tmp_path / "bad.tsv")


SAFE_NAME = st.text(alphabet="abcXYZ019_-./", min_size=1, max_size=12).filter(lambda n: file_name_problem(n) is None)
CAPTION = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40)
URL = st.text(alphabet=st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=20)
SCORE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(rows=st.lists(st.builds(LabelRow, SAFE_NAME, CAPTION, SCORE, URL), max_size=10))
def test_write_then_read_round_trips_exactly(tmp_path, rows):
    path = tmp_path / "rt.tsv"
    write_labels(rows, path)
    assert list(read_labels(path)) == rows


# --- the CLI --------------------------------------------------------------------------------------------------------
def test_cli_filter_writes_subset_that_round_trips(labels, tmp_path, capsys):
    out = tmp_path / "subset.tsv"
    assert main(["filter", str(labels), "--keyword", "squirrel", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "4 of 6 rows matched (0 malformed skipped)" in stdout
    assert list(read_labels(out)) == [ROWS[0], ROWS[2], ROWS[3], ROWS[4]]


def test_cli_filter_prints_file_names_without_out(labels, capsys):
    args = ["filter", str(labels), "-k", "squirrel", "-k", "cats", "--all", "--exclude", "dogs", "--min-score", "7"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["00000002.jpg"]
    assert "1 of 6 rows matched (0 malformed skipped)" in captured.err
    assert main(["filter", str(labels), "--regex", "sq.*rel", "--whole-word", "--limit", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["00000000.jpg"] and "stopped at --limit 1" in captured.err


def test_cli_filter_malformed_policies(tmp_path, capsys):
    path = malformed_file(tmp_path)
    assert main(["filter", str(path), "-k", "good"]) == 1
    assert "line 2: too few fields" in capsys.readouterr().err
    assert main(["filter", str(path), "-k", "good", "--on-error", "skip"]) == 0
    assert "10 of 21 rows matched (10 malformed skipped)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["filter"],
        ["filter", "x.tsv", "--sample", "2"],
        ["filter", "x.tsv", "--sample", "0"],
        ["filter", "x.tsv", "--limit", "-1"],
        ["filter", "x.tsv", "--regex", "("],
        ["filter", "x.tsv", "--on-error", "ignore"],
        ["filter", "x.tsv", "--min-score", "nan"],
        ["prefetch", "dagshub://o/r/data", "-j", "0"],
    ],
)
def test_cli_filter_bad_usage_exits_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_filter_min_above_max_exits_2(labels, capsys):
    assert main(["filter", str(labels), "--min-score", "8", "--max-score", "7"]) == 2
    assert "greater than --max-score" in capsys.readouterr().err


def test_cli_missing_file_is_a_runtime_error(tmp_path, capsys):
    assert main(["filter", str(tmp_path / "missing.tsv"), "-k", "x"]) == 1
    assert "missing.tsv" in capsys.readouterr().err


# --- through the real local DagsHub server ---------------------------------------------------------------------------
def test_reads_and_filters_a_dagshub_url_from_the_local_server(server, tmp_path, monkeypatch, capsys):
    url = "dagshub://user/repo/data/labels.tsv"
    options = {"host": server.url, "token": TOKEN, "cache_dir": str(tmp_path / "cache")}
    expected = [LabelRow(name, caption, float(score), link) for name, caption, score, link in LABEL_ROWS]
    assert list(read_labels(url, storage_options=options)) == expected  # row 1's caption keeps its tab
    result = filter_labels(url, "squirrel", storage_options=options)
    assert result.files == ["0000.jpg", "0002.jpg"] and result.scanned == 4
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", server.url)
    assert main(["filter", url, "--keyword", "squirrel"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["0000.jpg", "0002.jpg"]
    assert "2 of 4 rows matched (0 malformed skipped)" in captured.err
