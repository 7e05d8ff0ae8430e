"""Issue 8.7 — property tests (hypothesis) for the three parsers that take untrusted names: the labels.tsv
reader, the tar sample grouper, and the remote path → request path / cache path mapping.

tests/test_labels.py already checks the reader against an oracle on token soup, and tests/test_cache.py that
any key maps inside the cache root; these add arbitrary *bytes* (encodings, line ends, chunk boundaries),
webdataset itself as the grouping oracle, tars with hostile members, and the request path a repo path turns into.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import posixpath
import tarfile
from typing import List, Tuple
from urllib.parse import unquote

import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamloader.cache import FileCache
from streamloader.data.labelrows import fast_rows, parse_checked
from streamloader.data.labels import LabelReader, LabelRow, file_name_problem
from streamloader.data.labelscan import scan_block
from streamloader.data.tars import ErrorPolicy, group_members, iter_tar_members, skip_and_count, split_key
from streamloader.errors import DataFormatError
from streamloader.remote.client import DagsHubClient, RemoteEntry
from streamloader.remote.repo import RemoteRepo
from streamloader.remote.urls import RepoRef, safe_repo_path, split_repo_path

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROOT = "/srv/cache-root"

# --- labels.tsv ---------------------------------------------------------------------------------------------------
TSV_PIECES = [b"a.jpg", b"x/y.jpg", b"\t", b"\t", b"\n", b"\r\n", b"\r", b" ", b"7.5", b"-1e3", b"nan", b"inf",
              b"1e999", b"..", b"/", b"\\", b"C:", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xc3\xa9", b"\x00", b"caption",
              b"\xe2\x80\xa8", b"http://u:p@h/x", b"../../etc/passwd", b"\x7f", b"\x01", b"\xe6\x9d\xb1"]
FIELD_PIECES = [p for p in TSV_PIECES if p not in (b"\t", b"\n")]
TSV_FIELD = st.lists(st.sampled_from(FIELD_PIECES), max_size=4).map(b"".join)
TSV_FILE = st.one_of(TSV_FIELD, st.sampled_from([b"a.jpg", b"x/y.jpg", b"../../etc/passwd", b"/etc/passwd",
                                                 b"a/../../b", b"C:\\x", b"..\\x", b"", b" ", b"a\xffb.jpg",
                                                 b"a..b.jpg", b"\\\\h\\x"]))
TSV_SCORE = st.sampled_from([b"7.5", b"-1e3", b" 6 ", b"nan", b"inf", b"1e999", b"x", b"", b"7", b"7.", b".5",
                             b"0.25", b"1..2", b"7.5.1", b"9" * 64, b"9" * 400, b"7\x7f", b"\xef\xbc\x97"])
TSV_ROW = st.builds(lambda f, caption, score, url: b"\t".join([f, *caption, score, url]),
                    TSV_FILE, st.lists(TSV_FIELD, min_size=1, max_size=3), TSV_SCORE, TSV_FIELD)
TSV_LINE = st.one_of(TSV_ROW, st.lists(TSV_FIELD, min_size=1, max_size=5).map(b"\t".join))
TSV_LINES = st.builds(lambda lines, end: end.join(lines), st.lists(TSV_LINE, max_size=8),
                      st.sampled_from([b"\n", b"\r\n", b"\r"]))
TSV_BYTES = st.one_of(TSV_LINES, st.lists(st.sampled_from(TSV_PIECES), max_size=40).map(b"".join),
                      st.binary(max_size=200))


def _line_count(data: bytes) -> int:
    """Lines as Python's universal newlines split them ("\\r\\n", a lone "\\r" and "\\n" each end one)."""
    return len(io.TextIOWrapper(io.BytesIO(data), encoding="latin-1", newline=None).readlines())


@SETTINGS
@given(data=TSV_BYTES, chunk=st.integers(1, 64))
def test_tsv_reader_on_arbitrary_bytes_yields_only_safe_rows_and_accounts_for_every_line(data, chunk):
    reader = LabelReader(io.BytesIO(data), on_error="skip")
    rows = list(reader)
    stats = reader.stats
    assert stats["rows"] == len(rows)
    assert stats["rows"] + stats["skipped"] + stats["blank"] == _line_count(data)  # every line accounted for
    for row in rows:
        assert file_name_problem(row.file) is None and math.isfinite(row.score)
        joined = posixpath.normpath(posixpath.join(ROOT, row.file.replace("\\", "/")))
        assert joined.startswith(ROOT + "/")  # a row can never name a file outside the image folder
        assert "\n" not in row.caption + row.url and "\r" not in row.caption + row.url
        assert not row.file.startswith("\ufeff")
    # chunk boundaries anywhere (inside a CRLF, a UTF-8 sequence, the BOM) change nothing
    small = LabelReader(io.BytesIO(data), on_error="skip", chunk_size=chunk)
    assert list(small) == rows and small.stats == stats
    # and the strict policy gives the same rows, or a typed error: nothing else
    try:
        strict = list(LabelReader(io.BytesIO(data), on_error="raise"))
    except DataFormatError:
        assert stats["skipped"] > 0
    else:
        assert strict == rows and stats["skipped"] == 0


UTF8_PIECES = [b"a", b"\t", b"\n", b"\x7f", b"\xc2\x80", b"\xdf\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\x80", b"\xbf",
               b"\xe0\xa0\x80", b"\xe0\x9f\xbf", b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xe3\x81",
               b"\xf0\x90\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
               b"\xf0\x9f\x98", b"\xff", b"\xe6\x9d\xb1\xe4\xba\xac"]

# near-valid rows: a valid row with at most one field swapped for a variant, so every fast rule meets rows that
# break only it
NEAR_FILE = st.sampled_from([b"a.jpg", b"x/y.jpg", b"a..b.jpg", b"../a.jpg", b"a/../b", b"..\\x", b"C:x", b"c:\\x",
                             b"/a", b"\\a", b" a", b"a b", b"\xef\xbb\xbfa.jpg", b"a\x7f", b"a\x01b", b"\x01a",
                             b"\xc3\xa9.jpg", b"a:b", b"1:", b".a", b"a.", b"a\xef\xbb\xbf", b"", b"\x00"])
NEAR_FIELD = st.sampled_from([b"", b"cap", b"a\x00b", b"x\x7f", b"..", b"\xe6\x9d\xb1", b"7.5", b" ", b"a\tb", b"\x1f"])
NEAR_ROW = st.one_of(
    st.builds(lambda f: b"%s\tcap\t7.5\tu" % f, NEAR_FILE),
    st.builds(lambda score: b"a.jpg\tcap\t%s\tu" % score, TSV_SCORE),
    st.builds(lambda caption: b"a.jpg\t%s\t6\tu" % caption, NEAR_FIELD),
    st.builds(lambda url: b"a.jpg\tcap\t6.5\t%s" % url, NEAR_FIELD),
)
NEAR_ROWS = st.lists(NEAR_ROW, min_size=1, max_size=6).map(b"\n".join)


def _block(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + b"\n"  # a block as the reader hands it over


@settings(SETTINGS, max_examples=300)
@given(data=st.one_of(st.lists(st.sampled_from(UTF8_PIECES), max_size=30).map(b"".join),
                      st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=40)))
def test_vectorised_utf8_check_is_exactly_strict_decoding(data):
    block = _block(data)
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        assert scan_block(block) is None
    else:
        assert scan_block(block) is not None


@settings(SETTINGS, max_examples=300)
@given(data=st.one_of(NEAR_ROWS, TSV_BYTES))
def test_vectorised_scan_vouches_only_for_what_the_parser_accepts(data):
    block = _block(data)
    scanned = scan_block(block)
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        assert scanned is None
        return
    ends, suspects = scanned
    assert ends.tolist() == [i for i, byte in enumerate(block) if byte == 10]
    assert suspects.tolist() == sorted(set(suspects.tolist()))
    start = 0
    for index, line in enumerate(text.split("\n")[:-1]):
        end = start + len(line.encode("utf-8")) + 1
        if index not in suspects:  # vouched for: a valid row, and the fast split gives the parser's row
            expected = parse_checked(line)
            assert isinstance(expected, LabelRow), (line, expected)
            assert fast_rows(block, start, end) == [expected]
        start = end
    # and the rows a reader yields for it are the per-line parser's
    lines = text.removeprefix("\ufeff").split("\n")[:-1]  # the reader strips a BOM starting the block
    rows = [row for row in map(parse_checked, lines) if isinstance(row, LabelRow)]
    assert list(LabelReader(io.BytesIO(block), on_error="skip")) == rows


# --- tar sample grouping -----------------------------------------------------------------------------------------
NAME_DIRS = st.sampled_from(["", "", "a/", "a.b/", "d/e/"])
NAME_BASES = st.sampled_from(["0001", "0002", "0001", "x", "X", "", "0003"])
NAME_EXTS = st.sampled_from(["jpg", "JPG", "txt", "seg.png", "npy", "", "json"])
SAFE_NAMES = st.builds(lambda d, b, e: f"{d}{b}.{e}" if e else f"{d}{b}", NAME_DIRS, NAME_BASES, NAME_EXTS).filter(
    lambda n: n and not n.endswith("/"))
META_NAMES = st.sampled_from(["__meta__", "__index__", "__x__/0001.jpg"])


def _tar(members: List[Tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _webdataset_samples(tar_bytes: bytes) -> list:
    from webdataset import tariterators

    files = ({**f, "__url__": "u"} for f in tariterators.tar_file_iterator(io.BytesIO(tar_bytes)))
    return list(tariterators.group_by_keys(files))


@SETTINGS
@given(names=st.lists(st.one_of(SAFE_NAMES, META_NAMES), max_size=14))
def test_grouping_matches_webdataset_exactly_when_no_sample_repeats_an_extension(names):
    members = [(name, f"{i}:{name}".encode()) for i, name in enumerate(names)]
    tar_bytes = _tar(members)
    expected = _webdataset_samples_or_none(tar_bytes)
    policy = ErrorPolicy(skip_and_count)
    ours = list(group_members(iter_tar_members(io.BytesIO(tar_bytes), "u", policy), "u", policy))
    if expected is None:  # webdataset refuses the shard: a sample repeats an extension; ours drops that sample
        assert policy.local["malformed_sample"] >= 1
        return
    assert policy.local["malformed_sample"] == 0
    assert ours == expected


def _webdataset_samples_or_none(tar_bytes: bytes):
    try:
        return _webdataset_samples(tar_bytes)
    except ValueError as exc:
        assert "duplicate" in str(exc)
        return None


@SETTINGS
@given(names=st.lists(SAFE_NAMES, max_size=14))
def test_grouping_drops_exactly_the_runs_that_repeat_an_extension_and_counts_them(names):
    members = [(name, f"{i}".encode()) for i, name in enumerate(names)]
    policy = ErrorPolicy(skip_and_count)
    ours = list(group_members(iter(members), "u", policy))
    keyed = [(k, e.lower()) for k, e in (split_key(n) for n in names) if k is not None]
    runs = [[ext for _k, ext in group] for _key, group in itertools.groupby(keyed, key=lambda ke: ke[0])]
    runs_keys = [key for key, _group in itertools.groupby(keyed, key=lambda ke: ke[0])]
    good = [key for key, exts in zip(runs_keys, runs) if len(set(exts)) == len(exts)]
    assert [s["__key__"] for s in ours] == good
    assert policy.local["malformed_sample"] == len(runs) - len(good)
    assert policy.local["ignored_member"] == len(names) - len(keyed)
    with pytest.raises(DataFormatError) if len(good) < len(runs) else contextlib.nullcontext():
        list(group_members(iter(members), "u", ErrorPolicy()))


HOSTILE_NAMES = st.sampled_from(["../x.jpg", "../../etc/passwd", "/etc/passwd", "a/../../b.jpg", "./0001.jpg",
                                 "a/./b.jpg", "..", "C:x.jpg", "\\\\host\\x.jpg", "a\\..\\..\\b.jpg"])
KINDS = st.sampled_from(["file", "file", "file", "symlink", "hardlink", "fifo", "dir"])


@SETTINGS
@given(specs=st.lists(st.tuples(st.one_of(SAFE_NAMES, HOSTILE_NAMES), KINDS, st.sampled_from(
    ["/etc/passwd", "../../x", "0001.jpg", "a/../../../y"])), max_size=12))
def test_tar_members_yielded_are_exactly_the_safe_regular_files_in_order(specs):
    buf = io.BytesIO()
    expected, unsafe = [], 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, (name, kind, target) in enumerate(specs):
            info = tarfile.TarInfo(name)
            data = f"member {i}".encode()
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                segments = name.replace("\\", "/").split("/")
                hostile = name.startswith(("/", "\\")) or name[1:2] == ":" or ".." in segments
                if hostile:
                    unsafe += 1
                else:
                    expected.append((tar.getmembers()[-1].name, data))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                         "dir": tarfile.DIRTYPE}[kind]
            info.linkname = target if kind in ("symlink", "hardlink") else ""
            tar.addfile(info)
            unsafe += kind != "dir"
    policy = ErrorPolicy()
    got = list(iter_tar_members(io.BytesIO(buf.getvalue()), "u", policy))
    assert got == expected
    assert policy.local["unsafe_member"] == unsafe


# --- remote path -> request path and cache path ------------------------------------------------------------------
PATH_TEXT = st.lists(st.sampled_from(["a", "b.jpg", "/", "/", ".", "..", "\\", "\x00", "%2e", "%2F", "?", "#", " ",
                                      "~", "é", ";", "%00"]), max_size=12).map("".join)
SHA = "a" * 40


def _normalised_the_long_way(path: str) -> str:
    """safe_repo_path's rule written out (it answers an already normal path without splitting it)."""
    if "\x00" in path or "\\" in path or path.startswith("/"):
        raise ValueError(path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(path)
    return "/".join(parts)


@SETTINGS
@given(path=st.one_of(PATH_TEXT, st.text(alphabet="ab./\\\x00", max_size=16), st.text(max_size=40)))
def test_the_quick_answer_for_normal_paths_is_the_rule_and_raw_urls_quote_alike(path):
    try:
        expected = _normalised_the_long_way(path)
    except ValueError:
        with pytest.raises(ValueError):
            safe_repo_path(path)
        return
    assert safe_repo_path(path) == expected
    client = DagsHubClient("http://127.0.0.1:9/o/r")
    client.pin(SHA)
    for _twice in range(2):  # the second answer comes from the cached prefix
        assert client.raw_url(path) == RepoRef("http://127.0.0.1:9", "o", "r").api_url("raw", SHA, expected)


@SETTINGS
@given(path=st.one_of(PATH_TEXT, st.text(max_size=40)))
def test_repo_paths_are_normalised_or_refused_and_stay_inside_their_endpoint(path):
    try:
        safe = safe_repo_path(path)
    except ValueError:
        return
    segments = safe.split("/") if safe else []
    assert not safe.startswith("/") and all(s not in ("", ".", "..") for s in segments)
    assert "\x00" not in safe and "\\" not in safe
    assert safe_repo_path(safe) == safe  # idempotent
    assert split_repo_path(f"owner/repo/{path}") == ("owner", "repo", safe)
    local = os.path.normpath(os.path.join(ROOT, safe))
    assert local == ROOT or local.startswith(ROOT + os.sep)
    # the request that path turns into cannot climb out of the raw endpoint, after requests' own normalisation
    ref = RepoRef("http://127.0.0.1:9", "o", "r")
    prepared = requests.Request("GET", ref.api_url("raw", SHA, safe)).prepare()
    request_path = prepared.path_url.split("?", 1)[0]
    assert "?" not in unquote(request_path) or "?" in safe  # a "?" in a name is escaped, not a query
    prefix = f"/api/v1/repos/o/r/raw/{SHA}/"
    assert (request_path + "/").startswith(prefix)
    assert unquote(request_path[len(prefix):]) == safe


@SETTINGS
@given(path=PATH_TEXT, digest=st.text(max_size=70), versioning=st.sampled_from([None, "git", "dvc", "../..", ""]))
def test_listing_entries_map_to_cache_files_inside_the_root(tmp_path_factory, path, digest, versioning):
    try:
        safe = safe_repo_path(path)
    except ValueError:
        return
    assume(safe)
    root = str(tmp_path_factory.getbasetemp() / "prop-cache")
    client = DagsHubClient(RepoRef("http://127.0.0.1:9", "o", "r"), token=False)
    client.pin(SHA)
    repo = RemoteRepo(client, FileCache(root))
    for entry_hash in (digest, None):
        key = repo.cache_key(RemoteEntry(safe, "file", 1, entry_hash or None, versioning))
        target = os.path.realpath(repo.cache.path_for(key))
        assert target.startswith(os.path.realpath(root) + os.sep + "objects" + os.sep)
