"""streamloader.prefetch: concurrent cache warm-up for hooked paths and dagshub:// URLs (hooks/warmup.py)."""
from __future__ import annotations

import os

import pytest

from conftest import TOKEN
from streamloader.hooks import install_hooks
from streamloader import prefetch

IMAGES = [os.path.join("data", f"{i:04d}.jpg") for i in range(4)]


def read_all(paths):
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[path] = f.read()
    return out


def test_after_prefetch_open_makes_no_file_request(hooked, remote, repo_dir):
    paths = IMAGES + ["README.md", os.path.join(str(hooked.root), "data", "labels.tsv")]
    result = prefetch(paths, max_concurrency=4, progress=False)
    assert result.files == 6 and not result.failed
    assert result.bytes == sum(os.path.getsize(repo_dir / os.path.relpath(p, hooked.root)) for p in paths)
    assert remote.request_count(kind="raw") == 6
    remote.reset_counts()
    contents = read_all(paths)
    assert remote.request_count(kind="raw") == 0
    assert contents["README.md"] == b"# test repo\n"
    assert contents[IMAGES[1]] == (repo_dir / "data" / "0001.jpg").read_bytes()


def test_dagshub_urls_warm_the_cache_the_hooks_read(remote, project, repo_dir):
    urls = [f"dagshub://user/repo/data/{i:04d}.jpg" for i in range(4)]
    result = prefetch(urls, progress=False, storage_options={"host": remote.url, "token": TOKEN, "branch": "main"})
    assert result.files == 4 and result.bytes == sum((repo_dir / "data" / f"{i:04d}.jpg").stat().st_size
                                                     for i in range(4))
    with install_hooks(project_root=project, repo_url=remote.repo_url, branch="main"):
        remote.reset_counts()
        assert read_all(IMAGES)[IMAGES[3]] == (repo_dir / "data" / "0003.jpg").read_bytes()
        assert remote.request_count(kind="raw") == 0


def test_failures_are_skipped_or_raised_per_on_error(hooked, remote, tmp_path):
    unhooked = str(tmp_path / "elsewhere.jpg")
    result = prefetch(IMAGES[:2] + ["data/missing.jpg", unhooked], progress=False, on_error="skip")
    assert result.files == 2 and set(result.failed) == {"data/missing.jpg", unhooked}
    assert isinstance(result.failed["data/missing.jpg"], FileNotFoundError)
    assert isinstance(result.failed[unhooked], ValueError)
    with pytest.raises(FileNotFoundError):
        prefetch(["data/missing.jpg", IMAGES[2]], progress=False)
    remote.reset_counts()
    read_all([IMAGES[2]])  # fetched although another path failed
    assert remote.request_count(kind="raw") == 0
    with pytest.raises(ValueError, match="neither under a hooked project root"):
        prefetch([IMAGES[3], unhooked], progress=False)
    assert remote.request_count(kind="raw") == 0  # bad input is refused before any download
    with pytest.raises(ValueError, match="on_error"):
        prefetch(IMAGES, on_error="ignore")


def test_local_and_excluded_paths(remote, project):
    (project / "data").mkdir()
    (project / "data" / "0000.jpg").write_bytes(b"local")
    with install_hooks(project_root=project, repo_url=remote.repo_url, exclude_globs=["*.npy"]) as handle:
        remote.reset_counts()
        result = handle.prefetch(["data/0000.jpg", "data/0001.jpg"], progress=False)
        assert result.files == 1 and remote.request_count(kind="raw") == 1  # the local file needs no download
        with pytest.raises(ValueError, match="exclude_globs"):
            prefetch(["data/emb/img_emb_0.npy"], progress=False)


def test_a_handle_prefetches_its_own_root_only(remote, project, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with install_hooks(project_root=project, repo_url=remote.repo_url, exclude_globs=["*.npy"]) as handle, \
            install_hooks(project_root=other, repo_url=remote.repo_url):
        remote.reset_counts()
        outside = str(other / "data" / "0002.jpg")  # hooked, but by the other handle
        with pytest.raises(ValueError, match="not under the hooked project root"):
            handle.prefetch(["data/0000.jpg", outside], progress=False)
        assert remote.request_count(kind="raw") == 0  # refused before any download
        given = [str(project / "data" / "0000.jpg"), "data/../data/0001.jpg", outside, "data/emb/img_emb_0.npy"]
        job = handle.prefetch(given, progress=False, on_error="skip", wait=False)
        result = job.result(timeout=60)
        assert result.files == 2 and sorted(result.failed) == sorted(given[2:]), result
        assert "exclude_globs" in str(result.failed["data/emb/img_emb_0.npy"])
        assert remote.request_count(kind="raw") == 2
        assert handle.relative(project) == "" and handle.relative(outside) is None
        assert handle.relative(b"data/x.jpg") == "data/x.jpg" and handle.relative(3) is None


def test_the_package_name_is_the_function(hooked, remote):
    import inspect

    import streamloader
    from streamloader.hooks.warmup import prefetch as warm

    assert inspect.isfunction(streamloader.prefetch) and streamloader.prefetch is warm is prefetch
    assert streamloader.prefetch([IMAGES[0]], progress=False).files == 1
    assert prefetch([IMAGES[1]], progress=False).files == 1
