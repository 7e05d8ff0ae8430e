"""Tar shard streaming: URL expansion, grouping like webdataset, truncation, traversal members, handlers."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap

import fsspec
import pytest
import webdataset as wds

from streamloader.data.counters import SharedCounters
from streamloader.data.shardgen import write_tar
from streamloader.data.tars import (
    SKIP_REASONS,
    ErrorPolicy,
    expand_urls,
    iter_samples,
    make_synthetic_shards,
    raise_on_error,
    resolve_handler,
    skip_and_count,
    warn_and_continue,
)
from streamloader.errors import DataFormatError


def _samples(n, start=0, prefix=""):
    return [
        {"__key__": f"{prefix}{i:08d}", "jpg": f"img{i}".encode(), "txt": f"cap{i}".encode()}
        for i in range(start, start + n)
    ]


def _strip(sample):
    return {k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}


def _add(tar, name, data=b"x", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def test_expand_urls_keeps_padding_and_accepts_lists(tmp_path):
    assert expand_urls("/d/{0008..0011}.tar") == ["/d/0008.tar", "/d/0009.tar", "/d/0010.tar", "/d/0011.tar"]
    assert expand_urls(["a/{0..1}.tar", tmp_path / "x.tar"]) == ["a/0.tar", "a/1.tar", str(tmp_path / "x.tar")]
    assert expand_urls("https://h/p/s.tar") == ["https://h/p/s.tar"]
    with pytest.raises(ValueError):
        expand_urls([])


def test_groups_tarwriter_shards_exactly_like_webdataset(tmp_path):
    path = str(tmp_path / "0000.tar")
    with wds.TarWriter(path) as writer:
        for i in range(5):
            writer.write(
                {
                    "__key__": f"sub/dir/{i:08d}",
                    "jpg": f"jpeg{i}".encode(),
                    "seg.png": f"mask{i}".encode(),  # a dot inside the extension
                    "txt": f"caption {i}",
                    "JSON": b"{}",  # upper-case extensions are lower-cased by both readers
                }
            )
    ours = [_strip(s) for s in iter_samples(path)]
    theirs = [_strip(s) for s in wds.WebDataset(path, shardshuffle=False)]
    assert ours == theirs
    assert ours[3]["seg.png"] == b"mask3" and ours[3]["__key__"] == "sub/dir/00000003"


def test_stdlib_writer_reads_identically_to_tarwriter(tmp_path):
    samples = _samples(4)
    write_tar(tmp_path / "a.tar", samples)
    with wds.TarWriter(str(tmp_path / "b.tar")) as writer:
        for s in samples:
            writer.write(s)
    a = [_strip(s) for s in iter_samples(str(tmp_path / "a.tar"))]
    b = [_strip(s) for s in iter_samples(str(tmp_path / "b.tar"))]
    assert a == b == [dict(s) for s in samples]


def test_memory_file_and_gzip_urls(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in _samples(3):
            for ext in ("jpg", "txt"):
                _add(tar, f"{s['__key__']}.{ext}", s[ext])
    with fsspec.open("memory://shards/0000.tar", "wb") as f:
        f.write(buf.getvalue())
    (tmp_path / "0001.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    mem = [s["__key__"] for s in iter_samples("memory://shards/0000.tar")]
    gz = [s["__key__"] for s in iter_samples(f"file://{tmp_path}/0001.tar.gz")]
    assert mem == gz == ["00000000", "00000001", "00000002"]


def test_remote_shards_can_go_through_a_disk_cache(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "00000000.jpg", b"cached")
    with fsspec.open("memory://cached/0000.tar", "wb") as f:
        f.write(buf.getvalue())
    cache = tmp_path / "cache"
    first = list(iter_samples("memory://cached/0000.tar", cache_dir=str(cache)))
    assert first[0]["jpg"] == b"cached" and len(os.listdir(cache)) >= 1
    fsspec.filesystem("memory").rm("/cached/0000.tar")
    again = list(iter_samples("memory://cached/0000.tar", cache_dir=str(cache)))  # served from disk
    assert again[0]["jpg"] == b"cached"


@pytest.mark.parametrize("cut", ["mid_member", "at_block_boundary", "inside_header"])
def test_truncated_tar_is_a_typed_error_or_a_counted_skip(tmp_path, cut):
    write_tar(tmp_path / "0000.tar", _samples(6))
    write_tar(tmp_path / "0001.tar", _samples(3, start=100))
    data = (tmp_path / "0000.tar").read_bytes()
    # Members are 512-byte header + one 512-byte data block each; sample i occupies 2 members.
    size = {"mid_member": 4 * 1024 + 600, "at_block_boundary": 4 * 1024, "inside_header": 4 * 1024 + 100}[cut]
    (tmp_path / "0000.tar").write_bytes(data[:size])
    url = str(tmp_path / "{0000..0001}.tar")
    with pytest.raises(DataFormatError, match="truncated or corrupt"):
        list(iter_samples(url))
    counters = SharedCounters(SKIP_REASONS)
    keys = [s["__key__"] for s in iter_samples(url, handler=skip_and_count, counters=counters)]
    # Complete samples before the cut survive, the partial one is dropped, the next shard is read.
    assert keys[:1] == ["00000000"] and "00000002" not in keys
    assert keys[-3:] == ["00000100", "00000101", "00000102"]
    assert counters.get("unreadable_shard") == 1


def test_not_a_tar_and_missing_shard(tmp_path):
    (tmp_path / "0000.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(DataFormatError):
        list(iter_samples(str(tmp_path / "0000.tar")))
    with pytest.raises(FileNotFoundError):
        list(iter_samples(str(tmp_path / "9999.tar")))
    counters = SharedCounters(SKIP_REASONS)
    write_tar(tmp_path / "0001.tar", _samples(2))
    urls = [str(tmp_path / n) for n in ("9999.tar", "0000.tar", "0001.tar")]
    keys = [s["__key__"] for s in iter_samples(urls, handler=warn_and_continue, counters=counters)]
    assert keys == ["00000000", "00000001"]
    assert counters.get("missing_shard") == 1 and counters.get("unreadable_shard") == 1


def test_traversal_links_and_devices_are_never_read(tmp_path):
    path = tmp_path / "0000.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "00000000.jpg", b"good0")
        _add(tar, "../../evil.jpg", b"evil")
        _add(tar, "/etc/evil.jpg", b"evil")
        _add(tar, "a/../../evil.txt", b"evil")
        _add(tar, "00000001.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "00000002.jpg", type=tarfile.LNKTYPE, linkname="00000000.jpg")
        _add(tar, "00000003.jpg", type=tarfile.FIFOTYPE)
        _add(tar, "somedir", type=tarfile.DIRTYPE)
        _add(tar, "README", b"no extension")
        _add(tar, "__meta__", b"webdataset metadata")
        _add(tar, "00000004.jpg", b"good4")
    counters = SharedCounters(SKIP_REASONS)
    # Even the raising handler does not turn these into errors: they are skipped, never extracted.
    samples = list(iter_samples(str(path), handler=raise_on_error, counters=counters))
    assert [(s["__key__"], s["jpg"]) for s in samples] == [("00000000", b"good0"), ("00000004", b"good4")]
    assert counters.get("unsafe_member") == 6
    assert counters.get("ignored_member") == 1
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_duplicate_extension_raises_or_drops_that_sample(tmp_path):
    path = tmp_path / "0000.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "00000000.jpg", b"a")
        _add(tar, "00000001.jpg", b"b")
        _add(tar, "00000001.jpg", b"b-again")
        _add(tar, "00000001.txt", b"cap")
        _add(tar, "00000002.jpg", b"c")
    with pytest.raises(DataFormatError, match="two 'jpg'"):
        list(iter_samples(str(path)))
    counters = SharedCounters(SKIP_REASONS)
    keys = [s["__key__"] for s in iter_samples(str(path), handler=skip_and_count, counters=counters)]
    assert keys == ["00000000", "00000002"]
    assert counters.get("malformed_sample") == 1


def test_a_stop_handler_ends_the_stream(tmp_path):
    write_tar(tmp_path / "0001.tar", _samples(2))
    seen = []

    def stop(exc):
        seen.append(exc)
        return False

    urls = [str(tmp_path / "0000.tar"), str(tmp_path / "0001.tar")]
    assert list(iter_samples(urls, handler=stop)) == []
    assert len(seen) == 1 and isinstance(seen[0], FileNotFoundError)


def test_webdataset_handlers_are_replaced_by_non_sleeping_ones():
    assert resolve_handler(wds.handlers.warn_and_continue) is warn_and_continue
    assert resolve_handler(wds.handlers.reraise_exception) is raise_on_error
    assert resolve_handler(wds.handlers.ignore_and_continue) is skip_and_count
    assert resolve_handler(None) is raise_on_error
    with pytest.raises(TypeError):
        resolve_handler("skip")


def test_shared_counters_pickle_to_a_snapshot_outside_spawning():
    counters = SharedCounters(("a", "b"))
    counters.add("a", 3)
    copy = pickle.loads(pickle.dumps(counters))
    copy.add("b")
    assert copy.as_dict() == {"a": 3, "b": 1}
    assert counters.as_dict() == {"a": 3, "b": 0}
    counters.reset()
    assert counters.get("a") == 0


def test_error_policy_counts_even_when_the_handler_raises():
    policy = ErrorPolicy(raise_on_error)
    with pytest.raises(DataFormatError):
        policy.skip("bad_key", DataFormatError("x"))
    assert policy.counters.get("bad_key") == 0  # a raised error is not a skip
    assert ErrorPolicy(skip_and_count).skip("bad_key", DataFormatError("x")) is True


def test_make_synthetic_shards_layout(tmp_path):
    info = make_synthetic_shards(tmp_path, n_shards=2, per_shard=3, image_size=16, emb_dim=8, external_embeddings=True)
    assert info.tar_url == str(tmp_path / "{0000..0001}.tar")
    assert sorted(os.listdir(info.embeddings_url)) == ["img_emb_0000.npy", "img_emb_0001.npy"]
    samples = list(iter_samples(info.tar_url))
    assert [s["__key__"] for s in samples] == info.keys == ["00000000", "00000001", "00000002",
                                                            "00010000", "00010001", "00010002"]
    assert set(samples[0]) == {"__key__", "__url__", "jpg", "txt", "json"}


def test_streaming_a_large_shard_keeps_memory_flat(tmp_path):
    # 3 MB members in a ~300 MB shard: reading the shard whole would push peak RSS up by ~300 MB.
    path = tmp_path / "big.tar"
    chunk = os.urandom(3 << 20)
    with tarfile.open(path, "w") as tar:
        for i in range(100):
            _add(tar, f"{i:08d}.bin", chunk)
    script = textwrap.dedent(
        f"""
        import resource
        from streamloader.data.tars import iter_samples
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(len(s["bin"]) for s in iter_samples({str(path)!r}))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, (peak - base) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == 100 * len(chunk)
    assert int(out[1]) < 64, f"peak RSS grew by {out[1]} MB while streaming a 300 MB shard"
