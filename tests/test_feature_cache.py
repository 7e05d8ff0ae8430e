"""FeatureCache and content identities: atomic entries, damaged entries, concurrent writers, and features served
in a new process with no image download and no model call."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import mkdir_on_disk, rewrite_file
from streamloader.data.feature_cache import FeatureCache, content_identity
from streamloader.data.features import tiny_cnn_extractor
from streamloader.data.laion import LaionAestheticsDataset

FP = "ab" * 32


def test_put_get_roundtrip_is_a_plain_npy(tmp_path):
    cache = FeatureCache(str(tmp_path), FP, {"name": "test"})
    assert cache.get("local:/x:1:2") is None and "local:/x:1:2" not in cache
    vector = np.arange(5, dtype=np.float64) / 3
    path = cache.put("local:/x:1:2", vector)
    got = cache.get("local:/x:1:2")
    assert got.dtype == np.float32 and np.array_equal(got, vector.astype(np.float32))
    assert np.array_equal(np.load(path), got) and "local:/x:1:2" in cache
    got[0] = 42  # a fresh, writable array every time
    assert cache.get("local:/x:1:2")[0] == 0
    cache.put("local:/x:1:2", torch.ones(5))  # a CPU tensor works too, and replaces the entry
    assert cache.get("local:/x:1:2").tolist() == [1.0] * 5
    meta = json.loads((tmp_path / FP[:24] / "extractor.json").read_text())
    assert meta == {"fingerprint": FP, "name": "test"}
    assert cache.count() == 1 and os.listdir(tmp_path / "tmp") == []
    with pytest.raises(ValueError):
        FeatureCache(str(tmp_path), "not hex")


def test_damaged_entries_read_as_absent(tmp_path, caplog):
    cache = FeatureCache(str(tmp_path), FP)
    path = cache.put("a", np.ones(16, dtype=np.float32))
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 3)  # a torn write after a power loss
    with caplog.at_level(logging.WARNING):
        assert cache.get("a") is None
    assert "damaged" in caplog.text
    for name in "bc":
        os.makedirs(os.path.dirname(cache.path(name)), exist_ok=True)
    with open(cache.path("b"), "wb") as handle:
        handle.write(b"garbage")
    assert cache.get("b") is None
    np.save(cache.path("c"), np.arange(16, dtype=np.float64))  # any 1-D float .npy of the right length is accepted
    assert cache.get("c").tolist() == list(map(float, range(16)))
    np.save(cache.path("c"), np.arange(3, dtype=np.float32))  # another length than the extractor's: damaged
    assert cache.get("c") is None and not cache.holds("c") and cache.holds("a") is False  # ("a" was cut above)
    from numpy.lib import format as npformat

    with open(cache.path("b"), "wb") as handle:  # a header claiming far more than the bytes there
        npformat.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 13,)})
        handle.write(b"\0" * 64)
    assert cache.get("b") is None  # (np.load tried to allocate 36 TiB: a MemoryError)


def test_sweep_removes_only_stale_temp_files(tmp_path):
    cache = FeatureCache(str(tmp_path), FP)
    cache.put("a", np.ones(2))
    old, new = tmp_path / "tmp" / "x.npy.1.ab.part", tmp_path / "tmp" / "y.npy.1.cd.part"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cache.sweep_temp() == 1
    assert not old.exists() and new.exists()


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from streamloader.data.feature_cache import FeatureCache
    cache = FeatureCache(sys.argv[1], "ab" * 32)
    for round in range(5):
        for i in range(40):
            cache.put(f"id-{i}", np.full(64, i, dtype=np.float32))
            got = cache.get(f"id-{(i * 7) % 40}")
            if round == 0 and got is None:
                continue  # not written yet; from round 1 on every entry exists, so a reader must see a whole one
            assert got is not None and got.shape == (64,) and (got == (i * 7) % 40).all(), got
    """
)


def test_many_processes_writing_the_same_entries(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    cache = FeatureCache(str(tmp_path), FP)
    assert cache.count() == 40
    for i in range(40):
        assert np.array_equal(cache.get(f"id-{i}"), np.full(64, i, dtype=np.float32))
    assert os.listdir(tmp_path / "tmp") == []


def test_local_identity_follows_content(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"one")
    first = content_identity(str(path))
    assert first.startswith("local:") and str(tmp_path.resolve()) in first
    assert content_identity(str(path)) == first
    rewrite_file(path, b"two")
    assert content_identity(str(path)) != first
    monkeypatch.chdir(tmp_path)
    assert content_identity("a.jpg") == content_identity(str(path))
    with pytest.raises(FileNotFoundError):
        content_identity(str(tmp_path / "missing.jpg"))
    assert content_identity(str(tmp_path / "missing.jpg"), read_bytes=False) is None


def test_dagshub_identity_is_the_listing_hash_without_downloading(server, tmp_path):
    import fsspec

    fs = fsspec.filesystem("dagshub", host=server.url, cache_dir=str(tmp_path / "c"), skip_instance_cache=True)
    server.reset_counts()
    url = "dagshub://user/repo/data/0001.jpg"
    identity = content_identity(url, fs)
    assert identity.endswith(":" + fs.info(url)["hash"])
    assert content_identity("dagshub://user/repo/data/0002.jpg", fs) != identity
    assert server.request_count(kind="raw") == 0
    with pytest.raises(FileNotFoundError):
        content_identity("dagshub://user/repo/data/nope.jpg", fs)


def test_hooked_path_has_the_same_identity_as_its_url(server, tmp_path, monkeypatch):
    import fsspec

    from streamloader import hooks

    fs = fsspec.filesystem("dagshub", host=server.url, cache_dir=str(tmp_path / "c"), skip_instance_cache=True)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    with hooks.install_hooks(project_root=str(project), repo_url=server.repo_url, branch="main",
                             cache_dir=str(tmp_path / "hc")):
        server.reset_counts()
        assert content_identity("data/0003.jpg") == content_identity("dagshub://user/repo/data/0003.jpg", fs)
        assert server.request_count(kind="raw") == 0
        mkdir_on_disk(project / "data")  # a local folder by the repo's name, to shadow one file
        (project / "data" / "0003.jpg").write_bytes(b"a local file shadows the remote one")
        assert content_identity("data/0003.jpg").startswith("local:")


# A new process: same cache dir, same extractor (same seed), counts model calls with a forward hook.
_SECOND_RUN = textwrap.dedent(
    """
    import json, sys
    from streamloader.data.features import tiny_cnn_extractor
    from streamloader.data.laion import LaionAestheticsDataset
    calls = []
    extractor = tiny_cnn_extractor(input_size=16)
    extractor.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data", extractor,
                                cache_dir=sys.argv[2], storage_options={"host": sys.argv[1]})
    features = [ds[i][0].tolist() for i in range(len(ds))]
    print(json.dumps({"calls": len(calls), "stats": ds.stats, "features": features}))
    """
)


def test_second_process_reads_features_without_network_or_model(server, tmp_path):
    cache_dir = str(tmp_path / "cache")
    calls = []
    extractor = tiny_cnn_extractor(input_size=16)
    extractor.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data", extractor,
                                cache_dir=cache_dir, storage_options={"host": server.url})
    first = [ds[i][0] for i in range(len(ds))]
    assert len(calls) == 4 and ds.stats["features_computed"] == 4
    assert server.request_count(kind="raw") == 5  # labels.tsv + 4 images
    second_epoch = [ds[i][0] for i in range(len(ds))]
    assert len(calls) == 4 and ds.stats["features_cached"] == 4
    assert all(torch.equal(a, b) for a, b in zip(first, second_epoch))

    server.reset_counts()
    run = subprocess.run([sys.executable, "-c", _SECOND_RUN, server.url, cache_dir], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["calls"] == 0
    assert report["stats"]["features_cached"] == 4 and report["stats"]["features_computed"] == 0
    assert server.request_count(kind="raw") == 0
    for got, expected in zip(report["features"], first):
        assert torch.allclose(torch.tensor(got), expected)
