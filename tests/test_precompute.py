"""precompute_features: batched extraction into the cache, workers, dagshub:// URLs, resume after an interrupt or
a kill, bad images, and two ranks sharing one cache giving exactly the single-process result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from streamloader.data.features import tiny_cnn_extractor
from streamloader.data.laion import LaionAestheticsDataset
from streamloader.data.precompute import precompute_features
from streamloader.synthetic import make_laion_repo


@pytest.fixture
def laion(tmp_path):
    return make_laion_repo(tmp_path / "laion", n_images=10, n_squirrel=2, image_size=(16, 16), seed=1)


def _dataset(repo, cache_dir, extractor=None, **kwargs):
    extractor = extractor or tiny_cnn_extractor(input_size=16)
    return LaionAestheticsDataset(str(repo.labels_path), str(repo.root / "data"), extractor, cache_dir=str(cache_dir),
                                  **kwargs)


def _count_calls(extractor):
    calls = []
    extractor.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def _entries(cache):
    """{relative entry path: vector} of everything in a feature cache."""
    out = {}
    for sub in sorted(os.listdir(cache.dir)):
        folder = os.path.join(cache.dir, sub)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                out[f"{sub}/{name}"] = np.load(os.path.join(folder, name))
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_precompute_fills_the_cache_in_batches(laion, tmp_path, num_workers):
    ds = _dataset(laion, tmp_path / "cache")
    calls = _count_calls(ds.feature_extractor)
    result = precompute_features(ds, batch_size=4, num_workers=num_workers, progress=False)
    assert (result.items, result.unique, result.computed, result.cached, result.failed) == (10, 10, 10, 0, {})
    assert calls == [4, 4, 2] and result.device == "cpu"
    for i in (0, 9):  # batched features equal one-by-one extraction
        expected = ds.feature_extractor.extract(ds.paths[i])
        assert torch.allclose(torch.from_numpy(ds.feature_cache.get(_identity(ds, i))), expected, atol=1e-5)
    calls.clear()
    ds.reset_stats()
    features = [ds[i][0] for i in range(len(ds))]
    assert calls == [] and ds.stats["features_cached"] == 10 and features[0].shape == (32,)
    again = precompute_features(ds, batch_size=4, num_workers=num_workers, progress=False)
    assert (again.computed, again.cached) == (0, 10) and calls == []


def _identity(ds, i):
    from streamloader.data.feature_cache import content_identity

    return content_identity(ds.paths[i], ds.filesystem)


def test_duplicate_images_are_computed_once(laion, tmp_path):
    ds = _dataset(laion, tmp_path / "cache", limit=3)
    ds.rows = ds.rows + ds.rows  # the same image listed twice
    ds.paths = ds.paths + ds.paths
    result = precompute_features(ds, batch_size=8, num_workers=0, progress=False)
    assert (result.items, result.unique, result.computed) == (6, 3, 3)


def test_remote_precompute_with_workers_then_no_downloads(server, tmp_path):
    options = {"host": server.url, "skip_instance_cache": True}
    ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                tiny_cnn_extractor(input_size=16), cache_dir=str(tmp_path / "c"),
                                storage_options=options)
    result = precompute_features(ds, batch_size=3, num_workers=2, progress=False)
    assert result.computed == 4
    server.reset_counts()
    assert precompute_features(ds, batch_size=3, num_workers=2, progress=False).cached == 4
    assert [ds[i][0].shape for i in range(4)] == [(32,)] * 4
    assert ds.prefetch(progress=False).files == 0  # nothing left to download: the features are all cached
    assert server.request_count(kind="raw") == 0


def test_bad_images_follow_on_error(laion, tmp_path):
    laion.image_path(laion.files[3]).unlink()
    laion.image_path(laion.files[6]).write_bytes(b"\xff\xd8 broken")
    with pytest.raises(FileNotFoundError, match=laion.files[3]):
        precompute_features(_dataset(laion, tmp_path / "a"), batch_size=4, num_workers=0, progress=False)
    result = precompute_features(_dataset(laion, tmp_path / "b", on_error="skip"), batch_size=4, num_workers=2,
                                 progress=False)
    assert result.computed == 8
    assert sorted(os.path.basename(p) for p in result.failed) == [laion.files[3], laion.files[6]]
    assert "FileNotFoundError" in result.failed[str(laion.image_path(laion.files[3]))]


def test_resume_after_an_interrupt(laion, tmp_path):
    ds = _dataset(laion, tmp_path / "cache")
    calls = _count_calls(ds.feature_extractor)

    def interrupt(module, args):
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = ds.feature_extractor.model.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        precompute_features(ds, batch_size=3, num_workers=0, progress=False)
    handle.remove()
    assert ds.feature_cache.count() == 6  # two whole batches were stored before the interrupt
    calls.clear()
    result = precompute_features(ds, batch_size=3, num_workers=0, progress=False)
    assert (result.cached, result.computed) == (6, 4) and calls == [3, 1]


_KILLED_RUN = textwrap.dedent(
    """
    import os, sys
    from streamloader.data.features import tiny_cnn_extractor
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.data.precompute import precompute_features
    extractor = tiny_cnn_extractor(input_size=16)
    calls = []
    def die(module, args):
        calls.append(1)
        if len(calls) == 3:
            os._exit(9)   # a hard kill: no cleanup, no finally blocks
    extractor.model.register_forward_pre_hook(die)
    ds = LaionAestheticsDataset(sys.argv[1], sys.argv[2], extractor, cache_dir=sys.argv[3])
    precompute_features(ds, batch_size=4, num_workers=0, progress=False)
    """
)


def test_resume_after_a_kill(laion, tmp_path):
    cache_dir = tmp_path / "cache"
    args = [str(laion.labels_path), str(laion.root / "data"), str(cache_dir)]
    run = subprocess.run([sys.executable, "-c", _KILLED_RUN, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 9, run.stderr
    ds = _dataset(laion, cache_dir)
    assert ds.feature_cache.count() == 8
    assert all(vector.shape == (32,) for vector in _entries(ds.feature_cache).values())  # no torn entries
    calls = _count_calls(ds.feature_extractor)
    result = precompute_features(ds, batch_size=4, num_workers=0, progress=False)
    assert (result.cached, result.computed) == (8, 2) and calls == [2]


_RANK_RUN = textwrap.dedent(
    """
    import json, sys
    from streamloader.data.features import tiny_cnn_extractor
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.data.precompute import precompute_features
    ds = LaionAestheticsDataset(sys.argv[1], sys.argv[2], tiny_cnn_extractor(input_size=16), cache_dir=sys.argv[3])
    r = precompute_features(ds, batch_size=3, num_workers=0, progress=True)
    print(json.dumps({"rank": r.rank, "world": r.world_size, "computed": r.computed, "other": r.other_ranks}))
    """
)


def test_two_ranks_write_what_one_process_writes(laion, tmp_path):
    shared = tmp_path / "shared"
    args = [str(laion.labels_path), str(laion.root / "data"), str(shared)]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_RUN, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    reports, bars = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
        bars.append("features:" in err)  # tqdm's bar, drawn on stderr
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]
    assert bars == [True, False]  # one progress bar for the job (rank 0), not one per rank
    assert reports[0]["computed"] + reports[1]["computed"] == 10
    assert reports[0]["computed"] == reports[1]["other"] and reports[1]["computed"] == reports[0]["other"]
    assert 0 < reports[0]["computed"] < 10  # both ranks did a share

    single = _dataset(laion, tmp_path / "single")
    assert precompute_features(single, batch_size=4, num_workers=0, progress=False).computed == 10
    both = _dataset(laion, shared)
    mine, theirs = _entries(both.feature_cache), _entries(single.feature_cache)
    assert sorted(mine) == sorted(theirs) and len(mine) == 10
    for name in mine:
        assert np.allclose(mine[name], theirs[name], atol=1e-5)
    assert precompute_features(both, num_workers=0, progress=False).computed == 0


def test_explicit_rank_arguments_split_disjointly(laion, tmp_path):
    shares = []
    for rank in range(3):
        ds = _dataset(laion, tmp_path / "cache")
        shares.append(precompute_features(ds, rank=rank, world_size=3, num_workers=0, progress=False).computed)
    assert sum(shares) == 10
    with pytest.raises(ValueError):
        precompute_features(_dataset(laion, tmp_path / "x"), rank=2, world_size=2, progress=False)


def test_needs_an_extractor_with_a_fingerprint(laion, tmp_path):
    ds = LaionAestheticsDataset(str(laion.labels_path), str(laion.root / "data"))
    with pytest.raises(ValueError, match="fingerprint"):
        precompute_features(ds, progress=False)
