"""install_hooks / uninstall_hooks themselves, and writes under a hooked root (streamloader/hooks/)."""
from __future__ import annotations

import builtins
import bz2
import io
import json
import multiprocessing.spawn
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import threading
import tokenize

import pytest

from conftest import TOKEN, mkdir_on_disk, on_disk
from streamloader.errors import AuthenticationError, RepositoryNotFoundError, RevisionNotFoundError
from streamloader.hooks import ENV_VAR, hooked_roots, install_hooks, uninstall_hooks

ORIGINALS = {
    (builtins, "open"): builtins.open, (io, "open"): io.open, (os, "stat"): os.stat, (os, "lstat"): os.lstat,
    (os, "listdir"): os.listdir, (os, "scandir"): os.scandir, (os, "mkdir"): os.mkdir,
    (tarfile, "bltn_open"): tarfile.bltn_open, (bz2, "_builtin_open"): bz2._builtin_open,
    (tokenize, "_builtin_open"): tokenize._builtin_open,
    (multiprocessing.spawn, "get_preparation_data"): multiprocessing.spawn.get_preparation_data,
    (os, "open"): os.open, (os, "utime"): os.utime, (os, "access"): os.access, (os, "listxattr"): os.listxattr,
}


# --- writes ---------------------------------------------------------------------------------------------------------
def test_writes_create_local_files_and_never_touch_the_repo(hooked, project, repo_dir, remote):
    with open("data/new.txt", "w") as f:  # "data" exists only in the repo: created locally first
        f.write("written\n")
    assert (project / "data" / "new.txt").read_text() == "written\n"
    assert not (repo_dir / "data" / "new.txt").exists()
    assert "new.txt" in os.listdir("data") and "0000.jpg" in os.listdir("data")
    assert {entry["method"] for entry in remote.request_log} == {"GET"}
    with pytest.raises(FileNotFoundError):
        open("nowhere/new.txt", "w")  # a parent that exists nowhere is not invented


def test_append_and_exclusive_modes_respect_the_repo_file(hooked, project):
    with open("README.md", "a") as f:
        f.write("appended\n")
    assert (project / "README.md").read_text() == "# test repo\nappended\n"
    with pytest.raises(FileExistsError):
        open("data/labels.tsv", "x")
    with open("data/fresh.txt", "x") as f:
        f.write("ok")
    assert (project / "data" / "fresh.txt").read_text() == "ok"


def test_update_mode_on_a_missing_file_creates_nothing(hooked, project):
    with pytest.raises(FileNotFoundError):
        open("data/nested/none.txt", "r+")
    assert not on_disk(project / "data")
    with open("data/labels.tsv", "r+b") as f:  # a repo file is copied locally first, then updated in place
        f.write(b"XXXX")
    assert (project / "data" / "labels.tsv").read_bytes().startswith(b"XXXX.jpg\t")


def test_makedirs_below_a_remote_directory(hooked, project):
    os.makedirs("data/nested/outputs/run1", exist_ok=True)
    assert on_disk(project / "data" / "nested" / "outputs" / "run1")
    pathlib.Path("data/emb/extra").mkdir()
    assert on_disk(project / "data" / "emb" / "extra") and not on_disk(project / "data" / "0000.jpg")


def test_touch_keeps_a_repo_files_content_and_os_open_follows_the_write_rules(hooked, project, repo_dir):
    mkdir_on_disk(project / "data")  # data/ is here too now (as once a file was written into it)
    labels = (repo_dir / "data" / "labels.tsv").read_bytes()
    pathlib.Path("data/labels.tsv").touch()  # (os.utime, then os.open(O_CREAT | O_WRONLY))
    assert (project / "data" / "labels.tsv").read_bytes() == labels  # copied here, not an empty file hiding it
    fd = os.open("README.md", os.O_RDONLY)  # a read: the cached copy's descriptor
    try:
        assert os.read(fd, 100) == b"# test repo\n"
    finally:
        os.close(fd)
    with pytest.raises(FileExistsError):
        os.open("data/0000.jpg", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with pytest.raises(IsADirectoryError):
        os.open("data/nested", os.O_WRONLY | os.O_CREAT)
    os.close(os.open("data/0001.jpg", os.O_WRONLY | os.O_TRUNC))  # truncated on purpose: an empty local file
    assert (project / "data" / "0001.jpg").read_bytes() == b""
    fd = os.open("data/0002.jpg", os.O_WRONLY | os.O_APPEND)  # appended to: the repo's bytes first
    try:
        os.write(fd, b"!")
    finally:
        os.close(fd)
    assert (project / "data" / "0002.jpg").read_bytes() == (repo_dir / "data" / "0002.jpg").read_bytes() + b"!"


def test_a_repo_folder_is_neither_a_file_to_write_nor_a_folder_to_make_again(hooked, project):
    with pytest.raises(IsADirectoryError):
        open("data/nested", "w")
    with pytest.raises(FileExistsError):
        os.mkdir("data/nested")
    with pytest.raises(FileExistsError):
        os.mkdir("README.md")
    os.makedirs("data/nested", exist_ok=True)  # there already: nothing to do
    assert not on_disk(project / "data")
    os.makedirs("data/nested/outputs", exist_ok=True)  # not in the repo: made here, its parents with it
    assert on_disk(project / "data" / "nested" / "outputs")


def test_access_xattrs_and_copy2_treat_repo_entries_as_files_of_a_checkout(hooked, repo_dir, tmp_path):
    import shutil

    assert os.access("README.md", os.R_OK) and os.access("README.md", os.W_OK | os.R_OK)
    assert not os.access("README.md", os.X_OK) and os.access("data/nested", os.R_OK | os.X_OK)
    assert not os.access("nope.txt", os.F_OK) and not os.access("README.md/", os.F_OK)
    assert os.listxattr("README.md") == []
    with pytest.raises(FileNotFoundError):
        os.listxattr("nope.txt")
    shutil.copy2("README.md", tmp_path / "copy.md")
    assert (tmp_path / "copy.md").read_bytes() == b"# test repo\n"
    shutil.copytree("data/nested", tmp_path / "tree")
    assert (tmp_path / "tree" / "deeper" / "note.txt").read_text() == "nested file\n"


def test_a_path_ending_with_a_slash_names_a_folder(hooked):
    for name in ("README.md/", "README.md/."):
        with pytest.raises(NotADirectoryError):
            open(name)
        with pytest.raises(NotADirectoryError):
            os.stat(name)
        assert not os.path.exists(name) and not os.path.isfile(name)
    assert os.path.isdir("data/") and os.path.isdir("data/.") and os.listdir("data/nested/") == ["deeper"]


# --- install / uninstall --------------------------------------------------------------------------------------------
def test_uninstall_restores_every_original(remote, project):
    install_hooks(project_root=str(project), repo_url=remote.repo_url)
    for (owner, name), original in ORIGINALS.items():
        assert getattr(owner, name) is not original, f"{owner.__name__}.{name} not hooked"
    assert tarfile.bltn_open is builtins.open is io.open and ENV_VAR in os.environ
    uninstall_hooks()
    for (owner, name), original in ORIGINALS.items():
        assert getattr(owner, name) is original, f"{owner.__name__}.{name} not restored"
    assert ENV_VAR not in os.environ
    assert not os.path.exists("data/labels.tsv")


def test_concurrent_installs_of_one_root_let_exactly_one_win(remote, project):
    outcomes, barrier = [], threading.Barrier(4)

    def install():
        barrier.wait()
        try:
            outcomes.append(install_hooks(project_root=project, repo_url=remote.repo_url))
        except ValueError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(o, ValueError) for o in outcomes) == 1 and len(outcomes) == 4
    assert list(hooked_roots()) == [str(project)]


def test_notebook_open_goes_through_the_hooks(remote, project):
    pytest.importorskip("IPython")
    code = textwrap.dedent(f"""
        from IPython.core.interactiveshell import InteractiveShell
        from streamloader.hooks import install_hooks, uninstall_hooks
        shell = InteractiveShell.instance()
        install_hooks(project_root='.', repo_url={remote.repo_url!r})
        shell.run_cell("text = open('README.md').read()")
        uninstall_hooks()
        shell.run_cell("import os; after = os.path.exists('README.md')")
        print(repr((shell.user_ns['text'], shell.user_ns['after'])))
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=project, env=os.environ.copy(), capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == repr(("# test repo\n", False))


def test_context_manager_and_handle(remote, project):
    with install_hooks(project_root=project, repo_url=remote.repo_url + ".git", branch="main") as handle:
        assert os.path.exists("README.md")
        assert handle.revision == remote.head_sha() and hooked_roots() == {str(project): handle}
        assert TOKEN not in repr(handle) and "revision=" in repr(handle)
    assert not os.path.exists("README.md") and hooked_roots() == {}
    handle.uninstall()  # already gone: no-op


def test_overlapping_roots_are_rejected_and_separate_roots_coexist(remote, project, tmp_path, make_server):
    other_repo = tmp_path / "other-repo"
    other_repo.mkdir()
    (other_repo / "other.txt").write_text("other\n")
    other = make_server(other_repo, token=TOKEN)
    install_hooks(project_root=project, repo_url=remote.repo_url)
    for overlapping in (project, project / "sub", tmp_path):
        with pytest.raises(ValueError) as exc:
            install_hooks(project_root=overlapping, repo_url=other.repo_url)
        assert str(project) in str(exc.value) and str(overlapping) in str(exc.value)
    second = tmp_path / "second"
    second.mkdir()
    install_hooks(project_root=second, repo_url=other.repo_url)
    assert open(second / "other.txt").read() == "other\n" and os.path.exists("README.md")
    uninstall_hooks(str(second))
    assert not os.path.exists(second / "other.txt") and os.path.exists("README.md")
    with pytest.raises(ValueError):
        uninstall_hooks(second)


def test_repo_url_and_branch_from_git_config(remote, project, monkeypatch):
    monkeypatch.delenv("DAGSHUB_TOKEN")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    host = remote.url.split("://", 1)[1]
    (project / ".git" / "config").write_text(
        '[core]\n\tbare = false\n[remote "upstream"]\n\turl = https://example.invalid/x/y.git\n'
        f'[remote "origin"]\n\turl = http://me:{TOKEN}@{host}/user/repo.git\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n')
    (project / "sub").mkdir()
    os.chdir(project / "sub")
    handle = install_hooks()  # root: the checkout above the cwd; repo, branch and token: from .git
    assert handle.root == str(project) and handle.config.repo_url == remote.repo_url
    assert handle.config.branch == "main" and TOKEN not in repr(handle) and TOKEN not in os.environ[ENV_VAR]
    assert open("../README.md").read() == "# test repo\n"
    uninstall_hooks()


def test_a_bad_token_fails_at_install(remote, project):
    with pytest.raises(AuthenticationError):
        install_hooks(project_root=project, repo_url=remote.repo_url, token="wrong")
    assert hooked_roots() == {} and builtins.open is ORIGINALS[(builtins, "open")]


def test_repo_url_may_be_owner_repo_or_dagshub_url(remote, project, monkeypatch):
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", remote.url)  # the host of the short forms
    for form in ("user/repo", "dagshub://user/repo", "dagshub://user/repo/", f"{remote.repo_url}.git"):
        with install_hooks(project_root=project, repo_url=form, branch="main") as handle:
            assert handle.config.repo_url == remote.repo_url, form  # the owner keeps its case, never a host
            assert open("README.md").read() == "# test repo\n"
    for bad in ("just-a-name", "dagshub://user", "dagshub://user/repo/data", "https://host-only"):
        with pytest.raises(ValueError, match="OWNER/REPO"):
            install_hooks(project_root=project, repo_url=bad)
    assert hooked_roots() == {}


def test_a_missing_repository_is_not_called_a_missing_branch(remote, project):
    remote.reset_counts()
    with pytest.raises(RepositoryNotFoundError, match="repository .*/user/nope not found"):
        install_hooks(project_root=project, repo_url=f"{remote.url}/user/nope", branch="main")
    assert remote.request_count(kind="repo") == 1  # one look at the repo record, after the branch 404
    with pytest.raises(RevisionNotFoundError, match="no branch or tag named 'dev'") as caught:
        install_hooks(project_root=project, repo_url=remote.repo_url, branch="dev")
    assert not isinstance(caught.value, RepositoryNotFoundError)
    assert hooked_roots() == {}


def test_unsupported_official_arguments_are_refused(remote, project):
    with pytest.raises(ValueError, match="username/password"):
        install_hooks(project_root=project, repo_url=remote.repo_url, username="u", password="p")
    with pytest.raises(ValueError, match="frameworks"):
        install_hooks(project_root=project, repo_url=remote.repo_url, frameworks=["transformers"])


def test_env_var_describes_hooks_without_the_token(remote, project):
    with install_hooks(project_root=project, repo_url=remote.repo_url, token=TOKEN, exclude_globs="*.npy"):
        raw = os.environ[ENV_VAR]
        assert TOKEN not in raw
        (config,) = json.loads(raw)
        assert config["project_root"] == str(project) and config["revision"] == remote.head_sha()
        assert config["exclude_globs"] == ["*.npy"]


def test_measure_hook_overhead_reports_ratios():
    from benchmarks.hook_overhead import measure_hook_overhead  # the bench's helper (the checkout, not the wheel)

    result = measure_hook_overhead(200)
    assert set(result) == {"n", "plain_s", "hooked_s", "ratio", "open_ratio", "stat_ratio", "relative_ratio"}
    assert result["n"] == 200 and all(v > 0 for v in result.values())
    assert hooked_roots() == {} and builtins.open is ORIGINALS[(builtins, "open")]
