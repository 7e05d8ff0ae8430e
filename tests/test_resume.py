"""Mid-epoch resume (torchdata StatefulDataLoader): kill -9 a real job after k batches, resume it in a new process.

Checked every time: the two runs together deliver one epoch exactly (as multisets), and the resumed run reads
only what was left: its tar member count is exactly the undelivered samples' members, and, on a fresh cache (a
job restarted on another node), it downloads no shard whose samples were all delivered before the kill.
In-process tests cover the order (a resumed pass continues the uninterrupted sequence), every kind of state and
the mismatch errors.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("torchdata.stateful_dataloader")

from _helpers import finish_job, free_port, job_env, kill_job, rank_reports, start_job  # noqa: E402
from conftest import TOKEN  # noqa: E402
from streamloader.data.tar_embeddings import ImageEmbeddingDataset  # noqa: E402
from streamloader.data.shardgen import make_synthetic_shards  # noqa: E402

JOB = Path(__file__).with_name("resume_job.py")
MEMBERS_PER_SAMPLE = 3  # make_synthetic_shards: jpg, txt, json (embeddings outside the tars)


def _shards(root, n_shards=6, per_shard=5):
    return make_synthetic_shards(root, n_shards, per_shard, image_size=8, emb_dim=4, external_embeddings=True)


def _job(config: dict, tmp_path: Path, name: str, cache: Path) -> subprocess.Popen:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return start_job([JOB, path], job_env(cache, TOKEN))


def _kill_when_ready(proc: subprocess.Popen, ready: int, timeout: float = 90) -> None:
    """Wait for ``ready`` READY lines (one per rank), then SIGKILL the job's whole process group."""
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        while seen < ready:
            if time.monotonic() > deadline:
                raise AssertionError("the job never got to its kill point")
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the job ended before its kill point: {proc.stderr.read()[-3000:]}")
            seen += line.strip() == "READY"
    finally:
        kill_job(proc)
    assert proc.returncode == -signal.SIGKILL


def _kill_and_resume(tmp_path, srv, base: dict, ranks: int = 1):
    """Run the job, kill it after ``stop_after`` batches, resume it on a fresh cache; per-rank reports."""
    out = tmp_path / "out"
    out.mkdir()
    config = {**base, "ranks": ranks, "host": srv.url, "ckpt": str(tmp_path / "ckpt"), "out": str(out)}
    if ranks > 1:
        config["port"] = free_port()
    _kill_when_ready(_job({**config, "phase": "first"}, tmp_path, "first", tmp_path / "cache-a"), ranks)
    srv.reset_counts()
    if ranks > 1:
        config["port"] = free_port()
    finish_job(_job({**config, "phase": "resume"}, tmp_path, "resume", tmp_path / "cache-b"), timeout=120)
    return rank_reports(out, ranks)


def _check_exactly_once(reports, epoch_keys):
    before = [k for r in reports for k in r["before"]]
    after = [k for r in reports for k in r["after"]]
    assert before and after, "the kill must fall inside the epoch"
    assert collections.Counter(before + after) == collections.Counter(epoch_keys)
    return before, after


@pytest.fixture
def tar_server(tmp_path, make_server, monkeypatch):
    info = _shards(tmp_path / "repo" / "shards")
    srv = make_server(tmp_path / "repo", token=TOKEN)
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", srv.url)
    base = {"kind": "tar", "tar_url": "dagshub://user/repo/shards/{0000..0005}.tar",
            "emb_url": "dagshub://user/repo/shards/img_emb", "batch_size": 2}
    return info, srv, base


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers, shuffle_num", [(0, 4), (2, 0)])
def test_kill_then_resume_finishes_the_epoch_reading_only_what_is_left(tmp_path, tar_server, workers, shuffle_num):
    info, srv, base = tar_server
    reports = _kill_and_resume(tmp_path, srv, {**base, "workers": workers, "stop_after": 4,
                                               "shuffle_num": shuffle_num})
    before, after = _check_exactly_once(reports, info.keys)
    assert reports[0]["io"]["members_read"] == len(after) * MEMBERS_PER_SAMPLE
    left = {key[:4] for key in after}
    fetched = {p for p in srv.get_counts(kind="raw") if p.endswith(".tar")}
    assert fetched and fetched <= {f"shards/{shard}.tar" for shard in left}


@pytest.mark.timeout(240)
def test_two_ranks_two_workers_resume(tmp_path, tar_server):
    info, srv, base = tar_server
    reports = _kill_and_resume(tmp_path, srv, {**base, "workers": 2, "stop_after": 2, "shuffle_num": 3}, ranks=2)
    before, after = _check_exactly_once(reports, info.keys)
    assert sum(r["io"]["members_read"] for r in reports) == len(after) * MEMBERS_PER_SAMPLE
    by_rank = [{k[:4] for k in r["before"] + r["after"]} for r in reports]
    assert not by_rank[0] & by_rank[1]  # each rank kept its own shards across the restart


@pytest.mark.timeout(240)
def test_laion_dataset_resume_with_two_workers(tmp_path, make_server):
    from streamloader.synthetic import make_laion_repo

    repo = make_laion_repo(tmp_path / "laion", n_images=20, n_squirrel=0, image_size=(8, 8), seed=1)
    srv = make_server(repo.root, token=TOKEN)
    reports = _kill_and_resume(tmp_path, srv, {"kind": "laion", "workers": 2, "batch_size": 2, "stop_after": 3})
    before, after = _check_exactly_once(reports, repo.files)
    fetched = {p.rsplit("/", 1)[-1] for p in srv.get_counts(kind="raw") if p.endswith(".jpg")}
    assert fetched == set(after)  # the resumed run downloads exactly the images it still had to deliver


# -- in process: order, state shapes, errors ----------------------------------------------------------------------
def _make(info, **kw):
    return ImageEmbeddingDataset(info.tar_url, info.embeddings_url, extra_keys=("__key__",), seed=1, **kw)


@pytest.mark.parametrize("options", [{}, {"shuffle_num": 4}, {"shuffle_num": 50}, {"epoch_length": 17},
                                     {"resample": True, "epoch_length": 9, "shuffle_num": 3}])
def test_resumed_pass_continues_the_uninterrupted_order(tmp_path, options):
    info = _shards(tmp_path, n_shards=3, per_shard=5)
    full = [item[-1] for item in _make(info, **options)]
    for k in range(len(full) + 1):
        ds = _make(info, **options)
        it = iter(ds)
        head = [next(it)[-1] for _ in range(k)]
        state = json.loads(json.dumps(ds.state_dict()))  # JSON-serializable, as a checkpoint needs
        resumed = _make(info, **options)
        resumed.load_state_dict(state)
        assert head + [item[-1] for item in resumed] == full, k
        if "epoch_length" not in options:  # (with a length, the buffer holds samples that are never yielded)
            assert resumed.io_stats["members_read"] == (len(full) - k) * MEMBERS_PER_SAMPLE
        assert [item[-1] for item in resumed] == full  # the next pass is a fresh epoch again


def test_a_state_belongs_to_one_reader_and_one_configuration(tmp_path):
    info = _shards(tmp_path, n_shards=4, per_shard=3)
    ds = _make(info, shuffle_num=4, rank=0, world_size=2)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    with pytest.raises(ValueError, match="seed"):
        ImageEmbeddingDataset(info.tar_url, info.embeddings_url, seed=2, shuffle_num=4).load_state_dict(state)
    other_rank = _make(info, shuffle_num=4, rank=1, world_size=2)
    other_rank.load_state_dict(state)
    with pytest.raises(ValueError, match="same world size"):
        next(iter(other_rank))
    with pytest.raises(ValueError, match="not an ImageEmbeddingDataset state"):
        ds.load_state_dict({"version": 99})
    fresh = _make(info, shuffle_num=4, rank=0, world_size=2)
    assert fresh.state_dict()["pass"] is None
    fresh.load_state_dict(fresh.state_dict())  # "not started" resumes as a fresh epoch
    assert len(list(fresh)) == 6


def test_skips_before_the_interruption_stay_counted(tmp_path):
    import numpy as np

    from streamloader.data.tars import skip_and_count

    info = _shards(tmp_path, n_shards=2, per_shard=4)
    path = os.path.join(info.embeddings_url, "img_emb_0000.npy")
    rows = np.load(path)
    rows[1] = 0  # an all-zero row marks a missing sample: always skipped and counted
    np.save(path, rows)
    ds = _make(info, handler=skip_and_count, shuffle_shards=False)
    it = iter(ds)
    [next(it) for _ in range(3)]
    resumed = _make(info, handler=skip_and_count, shuffle_shards=False)
    resumed.load_state_dict(ds.state_dict())
    assert len(list(resumed)) == 4 and resumed.stats["missing_embedding"] == 1


def test_compressed_shards_resume_by_reading_through(tmp_path):
    import gzip

    info = _shards(tmp_path, n_shards=2, per_shard=4)
    urls = []
    for path in info.tar_paths:
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            dst.write(src.read())
        urls.append(path + ".gz")
    make = lambda: ImageEmbeddingDataset(urls, info.embeddings_url, extra_keys=("__key__",), shuffle_num=3)  # noqa
    full = [item[-1] for item in make()]
    ds = make()
    it = iter(ds)
    head = [next(it)[-1] for _ in range(5)]
    resumed = make()
    resumed.load_state_dict(ds.state_dict())
    assert head + [item[-1] for item in resumed] == full


def test_laion_state_keeps_unreadable_items_from_being_fetched_again(server, repo_dir, tmp_path):
    from streamloader.data.laion import LaionAestheticsDataset

    (repo_dir / "data" / "0001.jpg").write_bytes(b"not a jpeg")

    def make(cache):
        options = {"host": server.url, "cache_dir": str(tmp_path / cache), "skip_instance_cache": True}
        return LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                      on_error="skip", storage_options=options)

    ds = make("cache-a")
    ds[1]  # served by item 2; item 1 is known to be undecodable
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = make("cache-b")  # restarted elsewhere: nothing cached
    resumed.load_state_dict(state)
    server.reset_counts()
    resumed[1]
    assert server.request_count(path="data/0001.jpg", kind="raw") == 0 and resumed.stats["decode_error"] == 1
    with pytest.raises(ValueError, match="rows"):
        LaionAestheticsDataset(ds.rows[:2], "dagshub://user/repo/data").load_state_dict(state)


@pytest.mark.parametrize("shuffle_num", [0, 4])
def test_a_shard_rewritten_since_the_state_was_saved_refuses_the_resume(tmp_path, shuffle_num):
    import tarfile

    info = _shards(tmp_path, n_shards=2, per_shard=5)
    ds = _make(info, shuffle_num=shuffle_num, shuffle_shards=False)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))
    first = sorted(Path(tmp_path).rglob("*.tar"))[0]
    with tarfile.open(first) as tar:  # the same members, in another order: every saved offset names another one
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    import io

    with tarfile.open(first, "w") as tar:
        for member, data in reversed(members):
            tar.addfile(member, io.BytesIO(data))
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # (a rewrite within the same clock tick)
    resumed = _make(info, shuffle_num=shuffle_num, shuffle_shards=False)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="changed since the state was saved"):
        next(iter(resumed))


def test_a_laion_state_is_for_its_rows_and_well_formed(server, repo_dir, tmp_path):
    from streamloader.data.laion import LaionAestheticsDataset

    options = {"host": server.url, "cache_dir": str(tmp_path / "c"), "skip_instance_cache": True}
    ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                on_error="skip", storage_options=options)
    state = json.loads(json.dumps(ds.state_dict()))
    reordered = LaionAestheticsDataset(list(reversed(ds.rows)), "dagshub://user/repo/data", storage_options=options)
    with pytest.raises(ValueError, match="other rows"):  # same count, other rows: item numbers name other images
        reordered.load_state_dict(state)
    for bad in ({"0": "whatever"}, {"-1": "missing_image"}, {str(len(ds)): "decode_error"}, {"x": "decode_error"}):
        with pytest.raises(ValueError, match="malformed"):
            ds.load_state_dict({**state, "bad": bad})
    ds.load_state_dict({**state, "bad": {"1": "missing_image"}})  # well formed: taken
