"""Issue 8.4 — bad input over the real server: each case is a clear typed error or a counted skip, never a hang
or a silent wrong answer (one corrupt shard must not kill a skipping run: mosaicml/streaming #759).

Local, unit-level versions: tests/test_labels.py (TSV policies), tests/test_tars.py (truncation), tests/
test_tar_embeddings.py (embeddings), tests/test_client.py (status codes). Here everything is read through ``dagshub://``
URLs from a served repo, with DataLoader workers where the loader has them.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from conftest import TOKEN, make_jpeg
from streamloader.data.shardgen import write_tar
from streamloader.errors import (AuthenticationError, DataFormatError, RemoteError, RemoteFileNotFoundError,
                                 RevisionNotFoundError)
from streamloader.remote.client import DagsHubClient, RetryPolicy
from streamloader.remote.filesystem import DagsHubFileSystem

GOOD_ROWS = [("0000.jpg", "a cat", "6.5", "http://x/0"), ("0001.jpg", "a\tdog", "7.0", "http://x/1")]
EMB_DIM = 8


def _npy(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vector)
    return buf.getvalue()


def _sample(key: str, jpeg: bytes, **extra: bytes) -> dict:
    return {"__key__": key, "jpg": jpeg, "txt": f"caption {key}".encode(), **extra}


@pytest.fixture
def bad_repo(tmp_path):
    """A repo of broken inputs next to good ones (see each test for what it expects)."""
    root = tmp_path / "repo"
    data = root / "data"
    data.mkdir(parents=True)
    good = "".join("\t".join(r) + "\n" for r in GOOD_ROWS).encode()
    (data / "labels.tsv").write_bytes(
        good
        + b"only-two\tfields\n"                       # too few fields
        + b"0002.jpg\tcaption\tnot-a-number\thttp://x/2\n"  # non-numeric score
        + b"0003.jpg\tcaption\tnan\thttp://x/3\n"      # NaN score
        + b"0004.jpg\tcaf\xe9 latin-1\t6.6\thttp://x/4\n"  # not UTF-8
        + b"../../etc/passwd\tescape\t7.7\thttp://x/5\n"  # unsafe file name
        + b"0005.jpg\tlast good row\t6.9\thttp://x/6"  # no final newline
    )
    (data / "empty.tsv").write_bytes(b"")

    jpeg = make_jpeg(tmp_path / "tmp.jpg", seed=1)
    shards = root / "shards"
    emb = shards / "img_emb"
    emb.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(4):  # 0004 has no embedding file on purpose
        np.save(emb / f"img_emb_{shard:04d}.npy", (rng.standard_normal((4, EMB_DIM)) + 0.1).astype(np.float32))

    def keys(shard: int, n: int = 4):
        return [f"{shard:04d}{i:04d}" for i in range(n)]

    write_tar(shards / "0000.tar", [_sample(k, jpeg) for k in keys(0)])
    corrupt = jpeg[: len(jpeg) // 3] + b"\x00garbage"  # starts like a JPEG, cannot be decoded
    write_tar(shards / "0001.tar", [_sample(k, corrupt if k == "00010002" else jpeg) for k in keys(1)])
    write_tar(shards / "0002.tar", [_sample(k, jpeg) for k in keys(2)])
    whole = (shards / "0002.tar").read_bytes()
    (shards / "0002.tar").write_bytes(whole[: int(len(whole) * 0.6)])  # truncated mid-archive
    write_tar(shards / "0003.tar", [_sample(k, jpeg) for k in keys(3)[:3]] + [_sample("00030009", jpeg)])
    write_tar(shards / "0004.tar", [_sample(k, jpeg) for k in keys(4)])
    # in-tar embeddings, one sample without its .npy member
    (root / "intar").mkdir()
    write_tar(root / "intar" / "0000.tar",
              [_sample(k, jpeg, npy=_npy(np.ones(EMB_DIM, np.float32))) for k in keys(0, 3)]
              + [_sample("00000003", jpeg)])
    return root


@pytest.fixture
def srv(bad_repo, make_server, served_env):
    server = make_server(bad_repo, token=TOKEN)
    served_env(server, TOKEN)
    return server


def test_malformed_tsv_rows_raise_with_the_line_or_are_counted(srv, figures):
    from streamloader.data.labels import read_labels

    url = "dagshub://user/repo/data/labels.tsv"
    with pytest.raises(DataFormatError, match=r"line 3: too few fields"):
        list(read_labels(url))
    reader = read_labels(url, on_error="skip")
    rows = list(reader)
    assert [r.file for r in rows] == ["0000.jpg", "0001.jpg", "0005.jpg"]
    assert rows[1].caption == "a\tdog" and rows[2].score == 6.9
    reasons = reader.stats["reasons"]
    assert reader.stats["skipped"] == 5 and reasons["too few fields"] == 1 and reasons["nan score"] == 1
    assert reasons["non-numeric score"] == 1 and reasons["'..' in file name"] == 1
    assert reasons["undecodable bytes (utf-8)"] == 1
    empty = read_labels("dagshub://user/repo/data/empty.tsv", on_error="raise")
    assert list(empty) == [] and empty.stats["rows"] == 0 and empty.stats["skipped"] == 0
    figures.update(rows_checked=8, skipped=reader.stats["skipped"], reasons=len(reasons))


@pytest.mark.timeout(120)
def test_bad_shards_are_typed_errors_or_counted_skips_across_workers(srv, figures):
    from torch.utils.data import DataLoader

    from streamloader.data.tar_embeddings import ImageEmbeddingDataset
    from streamloader.data.tars import skip_and_count

    tars = "dagshub://user/repo/shards/{0000..0004}.tar"
    emb = "dagshub://user/repo/shards/img_emb"

    def dataset(urls, handler=None):
        kwargs = {"handler": handler} if handler else {}
        return ImageEmbeddingDataset(urls, embedding_folder_url=emb, shard_width=4, extra_keys=("__key__",),
                                     shuffle_shards=False, **kwargs)

    # the default policy: each broken shard alone stops the run with a typed error that names the problem
    expectations = {
        "0001": (DataFormatError, r"00010002.*could not be decoded"),
        "0002": (DataFormatError, r"shards/0002\.tar: truncated or corrupt tar"),
        "0003": (DataFormatError, r"embedding index 9 out of range"),
        "0004": (FileNotFoundError, r"img_emb_0004\.npy"),
    }
    for shard, (error, pattern) in expectations.items():
        with pytest.raises(error, match=pattern):
            list(dataset(f"dagshub://user/repo/shards/{shard}.tar"))
    # the skipping policy: one epoch over all five shards with two workers delivers every good sample once
    ds = dataset(tars, skip_and_count)
    keys = sorted(key for _img, _emb, key in DataLoader(ds, batch_size=None, num_workers=2))
    truncated_survivors = [k for k in keys if k.startswith("0002")]
    assert truncated_survivors == [f"0002{i:04d}" for i in range(len(truncated_survivors))]  # a prefix...
    assert len(truncated_survivors) < 4  # ...and not the whole shard
    expected = ([f"0000{i:04d}" for i in range(4)] + ["00010000", "00010001", "00010003"] + truncated_survivors
                + ["00030000", "00030001", "00030002"])
    assert keys == sorted(expected)
    stats = ds.stats
    assert stats["decode_error"] == 1 and stats["unreadable_shard"] == 1
    assert stats["bad_embedding"] == 1 and stats["missing_embedding_file"] == 1
    # in-tar embeddings: a sample without its .npy member is an incomplete sample, counted
    intar = ImageEmbeddingDataset("dagshub://user/repo/intar/0000.tar", extra_keys=("__key__",),
                                  handler=skip_and_count)
    assert [k for _i, _e, k in intar] == ["00000000", "00000001", "00000002"]
    assert intar.stats["incomplete_sample"] == 1
    with pytest.raises(DataFormatError, match="00000003.*no .npy embedding"):
        list(ImageEmbeddingDataset("dagshub://user/repo/intar/0000.tar"))
    figures.update(samples_checked=len(keys) + 3, skips=sum(stats.values()) + 1, processes=3)


def test_missing_path_unknown_branch_and_bad_token_are_typed_and_not_retried(srv, bad_repo, figures):
    with pytest.raises(FileNotFoundError) as missing:
        fsspec.open("dagshub://user/repo/data/nope.jpg", "rb").open()
    assert isinstance(missing.value, RemoteFileNotFoundError) and "data/nope.jpg" in str(missing.value)
    with pytest.raises(FileNotFoundError):
        DagsHubFileSystem(host=srv.url, token=TOKEN, skip_instance_cache=True).cat_file("user/repo/no/such/dir/x")

    fs = DagsHubFileSystem(host=srv.url, token=TOKEN, branch="no-such-branch", skip_instance_cache=True)
    with pytest.raises(RevisionNotFoundError, match="no-such-branch"):
        fs.ls("user/repo/data")
    with pytest.raises(RevisionNotFoundError):
        DagsHubClient(srv.repo_url, token=TOKEN, revision="0" * 40, retry=RetryPolicy(attempts=2)).list_dir("data")

    srv.reset_counts()
    wrong = DagsHubFileSystem(host=srv.url, token="not-the-token", skip_instance_cache=True)
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        wrong.cat_file("user/repo/data/labels.tsv")
    assert srv.request_count() == 1  # a rejected token is final: no retry storm against the server
    # and a bad token is never a "bad data" skip: the skipping tar policy still raises it
    from streamloader.data.tars import iter_samples, skip_and_count

    os.environ["DAGSHUB_TOKEN"] = "not-the-token"  # restored by monkeypatch (served_env set it)
    DagsHubFileSystem.clear_instance_cache()  # the cached instance resolved the good token already
    with pytest.raises(AuthenticationError):
        list(iter_samples("dagshub://user/repo/shards/0000.tar", handler=skip_and_count))
    figures.update(cases=6, requests_for_401=1)


@pytest.mark.timeout(60)
def test_server_down_fails_within_the_retry_budget_never_hangs(make_server, bad_repo, tmp_path, figures):
    dead = make_server(bad_repo, token=TOKEN)
    url = dead.url
    dead.stop()  # nothing listens on that port any more: connection refused
    policy = RetryPolicy(attempts=4, max_time=5, initial_backoff=0.01, max_backoff=0.05)
    started = time.monotonic()
    with pytest.raises(RemoteError, match="ConnectionError") as excinfo:
        DagsHubClient(f"{url}/user/repo", token=TOKEN, retry=policy).list_dir("data")
    assert excinfo.value.url and excinfo.value.url.startswith(url)
    client_s = time.monotonic() - started
    # the CLI with the default policy, in its own process: one line, exit 1, no hang (the timeout would fail it)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streamloader", "ls", "dagshub://user/repo/data", "--host", url],
                          env={**os.environ, "DAGSHUB_TOKEN": TOKEN, "STREAMLOADER_CACHE": str(tmp_path / "c")},
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # the retries give up, or the circuit breaker stops them first
    assert "Traceback" not in proc.stderr and ("failed after retries" in last or f"{url} is unreachable" in last), \
        proc.stderr  # one clear line, not a stack dump
    figures.update(client_error_s=round(client_s, 2), cli_error_s=round(time.monotonic() - started, 1), processes=2)


def test_laion_corrupt_and_missing_images_raise_naming_the_file_or_are_counted(tmp_path, make_server, served_env,
                                                                            figures):
    from torch.utils.data import DataLoader

    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.synthetic import make_laion_repo

    laion = make_laion_repo(tmp_path / "laion", n_images=16, n_squirrel=2, image_size=(16, 16), seed=4)
    corrupt, missing = laion.files[3], laion.files[9]
    path = laion.image_path(corrupt)
    path.write_bytes(path.read_bytes()[:200])  # a cut-off JPEG, served whole: bad data, not a network error
    laion.image_path(missing).unlink()
    srv = make_server(laion.root, token=TOKEN)
    served_env(srv, TOKEN)
    urls = ("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data")
    strict = LaionAestheticsDataset(*urls)
    with pytest.raises(DataFormatError, match=corrupt):
        strict[3]
    with pytest.raises(FileNotFoundError, match=missing):
        strict[9]
    lenient = LaionAestheticsDataset(*urls, on_error="skip")
    batches = list(DataLoader(lenient, batch_size=4, num_workers=2))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 4]  # full, valid batches: neighbours stand in
    assert lenient.stats["decode_error"] == 1 and lenient.stats["missing_image"] == 1
    figures.update(items=16, skipped=lenient.stats["skipped"], processes=3)
