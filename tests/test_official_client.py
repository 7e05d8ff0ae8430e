"""Acceptance: the OFFICIAL dagshub client (0.7.x) works against our local server, which is how we know the
server is faithful to DagsHub.

The official client reads DAGSHUB_CLIENT_HOST / DAGSHUB_USER_TOKEN / DAGSHUB_CLIENT_TOKENS_CACHE once, at import,
keeps process-wide token caches and monkey-patches builtins; so every scenario runs in a fresh subprocess, which
writes its observations to a JSON file that the test then checks against the server's request log.
"""
from __future__ import annotations

import hashlib
import os
import textwrap

import pytest

pytest.importorskip("dagshub")

from conftest import TOKEN, run_official  # noqa: E402

STREAMING_SCRIPT = textwrap.dedent(
    """
    import builtins, hashlib, json, os, stat, sys
    repo_url, mount_a, mount_b, out_path = sys.argv[1:5]
    from dagshub.streaming import DagsHubFilesystem, install_hooks, uninstall_hooks
    res = {}
    J = os.path.join

    fs = DagsHubFilesystem(project_root=mount_a, repo_url=repo_url, branch="main")
    res["root"] = sorted(fs.listdir(mount_a))
    res["data"] = sorted(fs.listdir(J(mount_a, "data")))
    res["scandir"] = sorted(e.name for e in fs.scandir(J(mount_a, "data")))
    res["stat_size_before_open"] = fs.stat(J(mount_a, "data", "labels.tsv")).st_size
    res["nested_is_dir"] = stat.S_ISDIR(fs.stat(J(mount_a, "data", "nested")).st_mode)
    with fs.open(J(mount_a, "data", "labels.tsv")) as f:
        res["tsv"] = f.read()
    with fs.open(J(mount_a, "data", "0001.jpg"), "rb") as f:
        res["jpg_sha256"] = hashlib.sha256(f.read()).hexdigest()
    res["stat_size_after_open"] = fs.stat(J(mount_a, "data", "labels.tsv")).st_size
    try:
        fs.open(J(mount_a, "data", "missing.jpg"))
        res["missing"] = "opened?!"
    except FileNotFoundError:
        res["missing"] = "FileNotFoundError"
    fs.cleanup()

    originals = (builtins.open, os.listdir, os.stat)
    install_hooks(project_root=mount_b, repo_url=repo_url, branch="main")
    try:
        res["hooked_root"] = sorted(os.listdir(mount_b))
        res["hooked_nested"] = sorted(os.listdir(J(mount_b, "data", "nested", "deeper")))
        with open(J(mount_b, "data", "labels.tsv")) as f:
            res["hooked_tsv"] = f.read()
        with open(J(mount_b, "data", "emb", "img_emb_0.npy"), "rb") as f:
            res["hooked_npy_sha256"] = hashlib.sha256(f.read()).hexdigest()
        res["hooked_exists"] = os.path.exists(J(mount_b, "data", "0002.jpg"))
    finally:
        uninstall_hooks()
    res["unhooked"] = (builtins.open, os.listdir, os.stat) == originals

    with open(out_path, "w") as f:
        json.dump(res, f)
    """
)

REPO_API_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    host, download_dir, out_path = sys.argv[1:4]
    from dagshub.common.api.repo import RepoAPI
    api = RepoAPI("user/repo", host=host)
    info = api.get_repo_info()  # dacite: fails if any required key is missing or mistyped
    branch = api.get_branch_info("main")
    commit = api.get_commit_info(branch.commit.id)
    listing = api.list_path("data", include_size=True)
    api.download("data/nested", download_dir)
    res = {
        "default_branch": info.default_branch, "full_name": info.full_name, "owner": info.owner.login,
        "sha": branch.commit.id, "commit_sha": commit.id,
        "listing": [[e.path, e.type, e.size, e.hash, e.versioning] for e in listing],
        "file": api.get_file("README.md").decode(),
        "storages": [s.name for s in api.get_connected_storages()],
        "downloaded": sorted(os.path.relpath(os.path.join(d, f), download_dir)
                             for d, _, fs in os.walk(download_dir) for f in fs),
    }
    with open(out_path, "w") as f:
        json.dump(res, f)
    """
)

OAUTH_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, urllib.request, webbrowser
    repo_url, mount, allow_browser, out_path = sys.argv[1:5]
    opened = []

    def fake_browser(url, *args, **kwargs):
        # a headless "user" who clicks Authorize: GET the page, which approves the middleman request
        opened.append(url)
        if allow_browser != "yes":
            raise RuntimeError("the browser must not be needed")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(url, timeout=10).read()
        return True

    webbrowser.open = fake_browser
    from dagshub.streaming import DagsHubFilesystem
    fs = DagsHubFilesystem(project_root=mount, repo_url=repo_url, branch="main")
    res = {"opened": opened, "root": sorted(fs.listdir(mount))}
    with fs.open(os.path.join(mount, "README.md")) as f:
        res["readme"] = f.read()
    with open(out_path, "w") as f:
        json.dump(res, f)
    """
)


def api_requests(srv):
    return [e for e in srv.request_log if e["kind"] != "oauth"]


def test_official_streaming_filesystem_and_hooks(server, repo_dir, tmp_path):
    (tmp_path / "mount_a").mkdir()
    (tmp_path / "mount_b").mkdir()
    env = {"DAGSHUB_CLIENT_HOST": server.url, "DAGSHUB_USER_TOKEN": TOKEN}
    res = run_official(STREAMING_SCRIPT, [server.repo_url, tmp_path / "mount_a", tmp_path / "mount_b"], env,
                       tmp_path, "streaming")
    tsv = (repo_dir / "data" / "labels.tsv").read_text()
    jpg = hashlib.sha256((repo_dir / "data" / "0001.jpg").read_bytes()).hexdigest()
    npy = hashlib.sha256((repo_dir / "data" / "emb" / "img_emb_0.npy").read_bytes()).hexdigest()
    data_names = ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "emb", "labels.tsv", "nested"]
    assert {"README.md", "data"} <= set(res["root"])  # plus the client's own ".dagshub-streaming" marker
    assert res["data"] == data_names and res["scandir"] == data_names
    assert res["nested_is_dir"] and res["missing"] == "FileNotFoundError"
    assert res["tsv"] == tsv and res["jpg_sha256"] == jpg
    assert res["stat_size_after_open"] == len(tsv.encode())
    # the official client reports a fake size before a file is downloaded (a weak point streamloader avoids)
    assert res["stat_size_before_open"] == 1100
    assert {"README.md", "data"} <= set(res["hooked_root"]) and res["hooked_nested"] == ["note.txt"]
    assert res["hooked_tsv"] == tsv and res["hooked_npy_sha256"] == npy and res["hooked_exists"]
    assert res["unhooked"]
    # what it asked for: only endpoints we know, always with the token
    log = api_requests(server)
    assert {e["kind"] for e in log} == {"user", "branches", "content", "storage", "raw"}
    assert all(e["auth"] == f"Bearer {TOKEN}" for e in log)
    assert all(e["status"] in (200, 404) for e in log)
    assert server.request_count("data/0001.jpg", kind="raw") == 1


def test_official_repo_api_parses_every_record(server, tmp_path):
    env = {"DAGSHUB_CLIENT_HOST": server.url, "DAGSHUB_USER_TOKEN": TOKEN}
    res = run_official(REPO_API_SCRIPT, [server.url, tmp_path / "dl"], env, tmp_path, "repo_api")
    assert (res["default_branch"], res["full_name"], res["owner"]) == ("main", "user/repo", "user")
    assert res["sha"] == res["commit_sha"] == server.head_sha()
    listing = {row[0]: row for row in res["listing"]}
    assert listing["data/labels.tsv"][1:3] == ["file", len(open(server.folder.root + "/data/labels.tsv",
                                                                "rb").read())]
    assert listing["data/nested"][1] == "dir" and all(row[4] == "git" for row in res["listing"])
    assert res["file"] == "# test repo\n" and res["storages"] == []
    assert res["downloaded"] == [os.path.join("deeper", "note.txt")]
    assert (tmp_path / "dl" / "deeper" / "note.txt").read_bytes() == b"nested file\n"


def test_official_oauth_flow_headless(make_server, repo_dir, tmp_path):
    srv = make_server(repo_dir, token=TOKEN, oauth_wait=20)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    env = {"DAGSHUB_CLIENT_HOST": srv.url}  # no token anywhere: the client must go through OAuth
    res = run_official(OAUTH_SCRIPT, [srv.repo_url, tmp_path / "m1", "yes"], env, tmp_path, "oauth")
    assert len(res["opened"]) == 1 and res["opened"][0].startswith(f"{srv.url}/login/oauth/authorize?")
    assert res["readme"] == "# test repo\n" and "data" in res["root"]
    oauth_calls = [(e["method"], e["status"]) for e in srv.request_log if e["kind"] == "oauth"]
    assert oauth_calls == [("GET", 200), ("POST", 200), ("POST", 200)]
    assert all(e["auth"] == f"Bearer {TOKEN}" for e in api_requests(srv))  # it uses the token OAuth gave it
    # the token landed in the official cache, so a second run needs no browser
    cache = (tmp_path / "tokens.yaml").read_text()
    assert srv.url in cache and TOKEN in cache
    again = run_official(OAUTH_SCRIPT, [srv.repo_url, tmp_path / "m2", "no"], env, tmp_path, "oauth_again")
    assert again["opened"] == [] and again["readme"] == "# test repo\n"
