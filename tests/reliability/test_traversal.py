"""Issue 8.5 — traversal: ``../../x``, ``/etc/passwd``, ``a/../../b`` in labels.tsv, in listing entries (from a
lying server), in commit ids, and in tar members, plus tar symlinks and hardlinks.

The server runs in its own process, so a file audit hook (``hostile.FileAudit``) sees only what the client side
does: every path it opens, writes, renames or creates must stay inside the cache root (or the caller's own
output directory), and the canary files placed where the traversals point are never opened. Unit-level checks:
tests/test_client.py (``parse_entries``), tests/test_tars.py (unsafe members), tests/test_server.py (server side).
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from conftest import TOKEN, make_jpeg
from reliability.hostile import FileAudit, HostileProxy
from streamloader.errors import DataFormatError, RemoteError
from streamloader.remote.filesystem import DagsHubFileSystem

EVIL_NAMES = ("../../x", "/etc/passwd", "a/../../b", "..\\..\\x", "C:\\x", "data/../../b")


@pytest.fixture
def world(tmp_path):
    """repo/ (served), outside/ with canaries next to it, and the cache root; returns a dict of paths."""
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    (repo / "data" / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "canary.txt").write_bytes(b"must never be read\n")
    (tmp_path / "x").write_bytes(b"canary next to the repo\n")
    (repo / "data" / "ok.bin").write_bytes(b"legit bytes\n")
    (repo / "data" / "sub" / "deep.bin").write_bytes(b"deep bytes\n")
    rows = ["0000.jpg\tfine\t6.5\thttp://x/0"] + [f"{name}\tevil\t7.0\thttp://x/e" for name in EVIL_NAMES]
    (repo / "data" / "labels.tsv").write_text("\n".join(rows) + "\n")
    make_jpeg(repo / "data" / "0000.jpg", seed=0)
    return {"tmp": tmp_path, "repo": repo, "outside": outside}


@pytest.fixture
def srv(world, make_server_process):
    return make_server_process(world["repo"], token=TOKEN)


def _no_dotdot_requests(paths):
    bad = [p for p in paths if ".." in p or "%2e%2e" in p.lower() or "%2E" in p]
    assert not bad, bad


def test_traversal_names_in_labels_and_urls_are_refused_before_any_request(world, srv, isolated_env, served_env,
                                                                           figures):
    from streamloader.data.filters import filter_labels

    served_env(srv, TOKEN)
    cache = str(isolated_env / "streamloader-cache")
    fs = DagsHubFileSystem(host=srv.url, token=TOKEN, skip_instance_cache=True)
    with FileAudit() as audit:
        result = filter_labels("dagshub://user/repo/data/labels.tsv", on_error="skip")
        assert [row.file for row in result.rows] == ["0000.jpg"]
        assert result.skipped == len(EVIL_NAMES)
        for evil in ("user/repo/../../etc/passwd", "user/repo/data/../../../x", "user/repo//etc/passwd/../..",
                     "user/repo/data/..\\..\\x"):
            with pytest.raises(ValueError):
                fs.cat_file(evil)
    reads, writes = audit.outside(cache)
    assert reads == [] and writes == [], (reads, writes)
    _no_dotdot_requests([e["path"] for e in srv.request_log])
    figures.update(evil_rows=result.skipped, evil_urls=4, files_audited=len(audit.reads | audit.writes))


def _evil_listing(path: str, body: bytes) -> bytes:
    if "/content/" not in path or not path.split("?")[0].rstrip("/").endswith("/data"):
        return body
    data = json.loads(body)
    items = data["entries"] if isinstance(data, dict) else data
    for name in ("../../outside/evil.bin", "/etc/passwd", "data/../../outside/b.bin", "data/sub/../../../x",
                 "data/..", "data/.", "data/sub/../../../../outside/canary.txt"):
        items.append({"path": name, "type": "file", "size": 5, "hash": "0" * 40, "versioning": "git"})
    for item in items:
        if item.get("path") == "data/ok.bin":
            item["hash"] = "../../../../outside/pwned"  # a lying content hash must not become a path
    return json.dumps(data).encode()


def test_lying_listing_entries_never_lead_outside_the_cache_or_the_target(world, srv, isolated_env, figures):
    cache = str(isolated_env / "streamloader-cache")
    target = str(world["tmp"] / "download")
    with HostileProxy(srv.url, _evil_listing) as proxy, FileAudit() as audit:
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, skip_instance_cache=True)
        names = sorted(info["name"] for info in fs.ls("user/repo/data"))
        assert names == ["user/repo/data/0000.jpg", "user/repo/data/labels.tsv", "user/repo/data/ok.bin",
                         "user/repo/data/sub"]
        found = fs.find("user/repo/data")
        assert all(p.startswith("user/repo/data/") and ".." not in p.split("/") for p in found)
        fs.get("user/repo/data", target, recursive=True)
        result = fs.prefetch(found, progress=False)
        assert fs.cat_file("user/repo/data/ok.bin") == b"legit bytes\n"
    assert not result.failed
    reads, writes = audit.outside(cache, target)
    assert reads == [] and writes == [], (reads, writes)
    assert sorted(os.listdir(world["outside"])) == ["canary.txt"]
    _no_dotdot_requests(proxy.paths)
    figures.update(evil_entries=7, files_fetched=result.files, requests=len(proxy.paths))


def _evil_commit(path: str, body: bytes) -> bytes:
    if "/branches/" not in path and "/commits/" not in path:
        return body
    data = json.loads(body)
    record = data.get("commit", data)
    record["id"] = "../../../../../outside/pwned"
    return json.dumps(data).encode()


def test_a_lying_commit_id_is_refused_and_never_becomes_a_path(world, srv, isolated_env, figures):
    cache = str(isolated_env / "streamloader-cache")
    with HostileProxy(srv.url, _evil_commit) as proxy, FileAudit() as audit:
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, branch="main", skip_instance_cache=True)
        with pytest.raises(RemoteError, match="commit"):
            fs.ls("user/repo/data")
        fs2 = DagsHubFileSystem(host=proxy.url, token=TOKEN, revision="main", skip_instance_cache=True)
        with pytest.raises(RemoteError, match="commit"):
            fs2.cat_file("user/repo/data/ok.bin")
    reads, writes = audit.outside(cache)
    assert reads == [] and writes == [], (reads, writes)
    assert sorted(os.listdir(world["outside"])) == ["canary.txt"]
    _no_dotdot_requests(proxy.paths)
    figures.update(requests=len(proxy.paths))


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def test_tar_members_escaping_or_linking_out_are_never_read_or_extracted(world, make_server_process, isolated_env,
                                                                         served_env, figures):
    from streamloader.data.tar_embeddings import ImageEmbeddingDataset

    jpeg = make_jpeg(world["tmp"] / "j.jpg", seed=2)
    buf = io.BytesIO()
    np.save(buf, np.ones(4, np.float32))
    npy = buf.getvalue()
    canary = str(world["outside"] / "canary.txt")
    shards = world["repo"] / "shards"
    shards.mkdir()
    with tarfile.open(shards / "0000.tar", "w") as tar:
        _add(tar, "00000000.jpg", jpeg)
        _add(tar, "00000000.npy", npy)
        _add(tar, "../../outside/evil.jpg", jpeg)
        _add(tar, "/etc/evil.npy", npy)
        _add(tar, "a/../../b.jpg", jpeg)
        _add(tar, "00000001.jpg", type=tarfile.SYMTYPE, linkname=canary)
        _add(tar, "00000001.npy", npy)
        _add(tar, "00000002.jpg", type=tarfile.LNKTYPE, linkname="../../outside/canary.txt")
        _add(tar, "00000002.npy", npy)
        _add(tar, "00000003.jpg", type=tarfile.SYMTYPE, linkname="../../../x")
        _add(tar, "00000004.jpg", jpeg)
        _add(tar, "00000004.npy", npy)
    srv = make_server_process(world["repo"], token=TOKEN)
    served_env(srv, TOKEN)
    cache = str(isolated_env / "streamloader-cache")
    ds = ImageEmbeddingDataset("dagshub://user/repo/shards/0000.tar", extra_keys=("__key__",),
                               handler=lambda exc: True)
    with FileAudit() as audit:
        keys = [key for _img, _emb, key in ds]  # in this process, so the audit sees every file operation
    assert keys == ["00000000", "00000004"]
    stats = ds.stats
    assert stats["unsafe_member"] == 6  # 3 escaping names, 2 symlinks, 1 hardlink: never extracted
    assert stats["incomplete_sample"] == 2  # 00000001/00000002 lost their (link) images; counted, not read
    reads, writes = audit.outside(cache)
    assert reads == [] and writes == [], (reads, writes)
    assert canary not in audit.reads
    assert sorted(os.listdir(world["outside"])) == ["canary.txt"]
    assert not os.path.exists(world["tmp"] / "b.jpg")
    figures.update(members=12, unsafe_skipped=stats["unsafe_member"], samples=len(keys),
                   files_audited=len(audit.reads | audit.writes))


def test_laion_dataset_skips_traversal_rows_of_a_remote_labels_file(world, srv, isolated_env, served_env, figures):
    from streamloader.data.laion import LaionAestheticsDataset

    served_env(srv, TOKEN)
    cache = str(isolated_env / "streamloader-cache")
    with FileAudit() as audit:
        ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                    on_error="skip")
        assert ds.files == ["0000.jpg"] and ds.stats["malformed_rows"] == len(EVIL_NAMES)
        image, _score = ds[0]
        assert image.shape == (3, 32, 32)
    reads, writes = audit.outside(cache)
    assert reads == [] and writes == [], (reads, writes)
    _no_dotdot_requests([e["path"] for e in srv.request_log])
    figures.update(evil_rows=ds.stats["malformed_rows"], items=len(ds))


def test_laion_dataset_refuses_traversal_names_in_in_memory_rows(world):
    from streamloader.data.labels import LabelRow
    from streamloader.data.laion import LaionAestheticsDataset

    canary = str(world["outside"] / "canary.txt")
    rows = [LabelRow("0000.jpg", "fine", 7.0, "u"), LabelRow("../../outside/canary.txt", "evil", 7.0, "u"),
            LabelRow(canary, "evil", 7.0, "u")]
    img_dir = str(world["repo"] / "data")
    with FileAudit() as audit:
        ds = LaionAestheticsDataset(rows, img_dir, on_error="skip")
        for i in range(len(ds)):
            ds[i]
    assert canary not in audit.reads  # never opened, whatever the policy
    assert ds.files == ["0000.jpg"]  # the unsafe rows are skipped like the label reader skips them
    with pytest.raises(DataFormatError):
        LaionAestheticsDataset(rows, img_dir, on_error="raise")
