"""Two torchrun agents on 127.0.0.1 (``--nnodes 2 --node_rank 0|1``, 2 ranks each) stand in for two machines.

Each "node" has its own cache directory and talks to its own server (two servers on one repo), so the server
counts are per node. precompute_features, the tar loader and make_splits must give every sample exactly once over
the four ranks, and a node must download each file it needs once (its two ranks share its cache).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from _helpers import finish_job, free_port, job_env, kill_job, rank_reports, start_job
from conftest import TOKEN
from streamloader.data.feature_cache import FeatureCache
from streamloader.data.features import tiny_cnn_extractor
from streamloader.data.shardgen import make_synthetic_shards
from streamloader.synthetic import make_laion_repo

JOB = Path(__file__).with_name("multinode_job.py")
N_IMAGES, N_SHARDS, PER_SHARD, N_ROWS = 24, 8, 3, 60


def _repo(root: Path):
    laion = make_laion_repo(root / "laion", n_images=N_IMAGES, n_squirrel=0, image_size=(16, 16), seed=2)
    shards = make_synthetic_shards(root / "shards", N_SHARDS, PER_SHARD, image_size=8, emb_dim=4,
                                   external_embeddings=True)
    for kind, sizes in (("img_emb", (25, 20, 15)), ("text_emb", (25, 20, 15))):
        (root / "prior" / kind).mkdir(parents=True)
        start = 0
        for number, n in enumerate(sizes):
            rows = np.arange(start, start + n, dtype=np.float32)[:, None] + np.zeros((1, 8), np.float32)
            np.save(root / "prior" / kind / f"{kind}_{number}.npy", rows + (0 if kind == "img_emb" else 0.5))
            start += n
    return laion, shards


def _downloads(srv, suffix):
    """Whole-file GETs of files ending in ``suffix`` (ranged reads of a header are not downloads)."""
    return collections.Counter(e["path"] for e in srv.request_log
                               if e["kind"] == "raw" and not e.get("range") and e["path"].endswith(suffix))


@pytest.mark.timeout(300)
def test_two_nodes_each_sample_once_and_each_file_once_per_node(tmp_path, make_server):
    laion, shards = _repo(tmp_path / "repo")
    servers = [make_server(tmp_path / "repo", token=TOKEN) for _ in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    agents = []
    try:
        for node in range(2):
            env = job_env(tmp_path / f"node{node}-cache", TOKEN, DAGSHUB_CLIENT_HOST=servers[node].url)
            agents.append(start_job(["-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", node,
                                     "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port,
                                     JOB, out], env, merge_stderr=True))
        for agent in agents:
            finish_job(agent, timeout=240)
    finally:
        for agent in agents:  # one failed: the other would wait for it until its rendezvous timeout
            if agent.poll() is None:
                kill_job(agent)
    reports = rank_reports(out, 4)
    assert [(r["rank"], r["node"]) for r in reports] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    ranks_of = {0: (0, 1), 1: (2, 3)}

    # precompute over all ranks: each image computed once in the cluster, each node holds its ranks' share
    assert sum(r["global_computed"] for r in reports) == N_IMAGES and all(r["global_computed"] for r in reports)
    caches = [_entries(tmp_path / f"node{node}-cache", seed=0) for node in range(2)]
    assert not caches[0] & caches[1] and len(caches[0] | caches[1]) == N_IMAGES
    # precompute per node (rank=LOCAL_RANK): every node's own cache is complete, each image once per node
    for node in range(2):
        assert sum(reports[r]["local_computed"] for r in ranks_of[node]) == N_IMAGES
        assert len(_entries(tmp_path / f"node{node}-cache", seed=1)) == N_IMAGES
        images = _downloads(servers[node], ".jpg")
        assert len(images) == N_IMAGES and max(images.values()) == 1

    # the tar loader: every sample once over the 4 ranks x 2 workers; each shard downloaded by one node, once
    keys = [k for r in reports for k in r["tar_keys"]]
    assert collections.Counter(keys) == collections.Counter(shards.keys)
    tars = [_downloads(servers[node], ".tar") for node in range(2)]
    assert all(max(t.values()) == 1 for t in tars) and not set(tars[0]) & set(tars[1])
    assert len(tars[0]) + len(tars[1]) == N_SHARDS
    for node in range(2):
        node_keys = {k for r in ranks_of[node] for k in reports[r]["tar_keys"]}
        assert {f"shards/{k[:4]}.tar" for k in node_keys} == set(tars[node])

    # make_splits: every row once over the ranks, equal batch counts; each .npy at most once per node
    rows = [v for r in reports for batch in r["prior_rows"] for v in batch]
    assert sorted(rows) == list(range(N_ROWS))
    assert len({tuple(r["prior_batches"]) for r in reports}) == 1
    for node in range(2):
        npys = _downloads(servers[node], ".npy")
        assert npys and max(npys.values()) == 1


def _entries(cache_root: Path, seed: int) -> set:
    fingerprint = tiny_cnn_extractor(input_size=16, seed=seed).fingerprint
    cache = FeatureCache(str(cache_root / "features"), fingerprint)
    return {p.name for p in Path(cache.dir).glob("*/*.npy")}
