"""install_hooks: unchanged file-access code reads a repo served by the local DagsHub server (streamloader/hooks/).

The project root is an empty local folder; the repo (tests/conftest.py ``make_repo`` + a CSV and a tar) lives only
on the server, so every read below that succeeds went through the hooks. The fixtures (``remote``, ``project``,
``hooked``) and ``on_disk`` / ``pixels`` come from tests/conftest.py.
"""
from __future__ import annotations

import errno
import glob
import io
import os
import pathlib
import stat
import tarfile
import threading

import numpy as np
import pytest

from conftest import LABEL_ROWS, TAR_MEMBERS, mkdir_on_disk, pixels
from streamloader.errors import AuthenticationError
from streamloader.hooks import install_hooks


# --- open -----------------------------------------------------------------------------------------------------------
def test_open_reads_remote_files_in_text_and_binary_mode(hooked, repo_dir):
    with open("data/labels.tsv") as f:
        assert f.readlines()[0] == "\t".join(LABEL_ROWS[0]) + "\n"
    with open("data/0000.jpg", "rb") as f:
        assert f.read() == (repo_dir / "data" / "0000.jpg").read_bytes()
    with io.open("README.md", "rb", buffering=0) as f:
        assert f.read() == b"# test repo\n"
    with open(pathlib.Path("data/nested/deeper/note.txt"), encoding="ascii") as f:
        assert f.read() == "nested file\n"


def test_a_cold_remote_file_behaves_like_a_local_one(hooked, repo_dir, remote):
    """Name as given (like open), a real fd with the right size, and the cached copy lands for the next read."""
    want = (repo_dir / "data" / "0001.jpg").read_bytes()
    with open(pathlib.Path("data/0001.jpg"), "rb") as f:
        assert f.name == "data/0001.jpg"
        assert os.fstat(f.fileno()).st_size == len(want)
        assert np.fromfile(f, dtype=np.uint8).tobytes() == want   # numpy reads through the fd itself
    with open("data/labels.tsv", encoding="utf-8") as f:
        assert f.name == "data/labels.tsv" and f.readline().startswith(LABEL_ROWS[0][0])
    hooked.repo.cache.flush(10)
    with open("data/0001.jpg", "rb") as f:
        assert f.read() == want
    assert remote.request_count(kind="raw") == 2  # one per file: the second read of 0001.jpg came from the cache


def test_a_local_file_wins_over_the_repo(hooked, project, remote):
    mkdir_on_disk(project / "data")
    (project / "data" / "labels.tsv").write_text("local\n")
    with open("data/labels.tsv") as f:
        assert f.read() == "local\n"
    assert os.stat("data/labels.tsv").st_size == 6
    assert remote.request_count(kind="raw") == 0


def test_missing_file_raises_the_local_enoent(hooked, tmp_path, remote):
    with pytest.raises(FileNotFoundError) as remote_miss:
        open("data/missing.jpg")
    assert remote_miss.value.errno == errno.ENOENT
    assert str(remote_miss.value) == "[Errno 2] No such file or directory: 'data/missing.jpg'"
    with pytest.raises(FileNotFoundError) as stat_miss:
        os.stat(os.path.join(str(hooked.root), "nope", "x.jpg"))
    assert stat_miss.value.errno == errno.ENOENT and stat_miss.value.filename.endswith("nope/x.jpg")
    # open goes straight to the download (one 404, then one content lookup of that path: a folder or missing?);
    # "nope" is a top-level name, answered by the small root listing. data/ itself is never listed.
    assert remote.request_count("data/missing.jpg", kind="raw") == 1
    assert remote.request_count(kind="raw") == 1
    assert remote.request_count("data", kind="content") == 0
    with pytest.raises(FileNotFoundError):
        open("data/missing.jpg")
    assert remote.request_count(kind="raw") == 1  # remembered as missing for a while


def test_server_failures_never_yield_partial_or_empty_files(hooked, remote, repo_dir):
    remote.faults.fail_first = {"data/0003.jpg": 2}  # transient: retried
    remote.faults.drop_rate = 0.5  # half the bodies cut short: retried
    remote.faults.seed = 7
    with open("data/0003.jpg", "rb") as f:
        assert f.read() == (repo_dir / "data" / "0003.jpg").read_bytes()
    assert [e["fault"] for e in remote.request_log if e["kind"] == "raw"][:2] == ["fail_first", "fail_first"]
    remote.faults.drop_rate = 0.0
    remote.faults.fail_paths = {"data/0002.jpg": 401}
    with pytest.raises(AuthenticationError):
        open("data/0002.jpg", "rb")
    remote.faults.fail_paths = {}
    with open("data/0002.jpg", "rb") as f:
        assert f.read() == (repo_dir / "data" / "0002.jpg").read_bytes()


def test_directories_and_files_in_the_wrong_place_raise_like_local_ones(hooked):
    with pytest.raises(IsADirectoryError) as exc:
        open("data/nested")
    assert str(exc.value) == "[Errno 21] Is a directory: 'data/nested'"
    with pytest.raises(NotADirectoryError) as exc:
        os.listdir("data/labels.tsv")
    assert exc.value.errno == errno.ENOTDIR


# --- stat and os.path -----------------------------------------------------------------------------------------------
def test_stat_reports_real_sizes_and_modes(hooked, repo_dir):
    st = os.stat("data/0001.jpg")
    assert st.st_size == (repo_dir / "data" / "0001.jpg").stat().st_size
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o444
    assert st.st_mtime == 0 and st.st_mtime_ns == 0 and st.st_nlink == 1
    assert stat.S_ISDIR(os.stat("data/nested").st_mode)
    assert os.lstat("data/0001.jpg") == st
    assert os.stat("data/0002.jpg").st_ino != st.st_ino


def test_os_path_functions_see_the_repo(hooked, repo_dir):
    assert os.path.exists("data/emb/img_emb_0.npy") and os.path.lexists("data/emb/img_emb_0.npy")
    assert os.path.isfile("README.md") and not os.path.isdir("README.md")
    assert os.path.isdir("data/nested/deeper") and not os.path.isfile("data/nested")
    assert os.path.getsize("data/labels.tsv") == (repo_dir / "data" / "labels.tsv").stat().st_size
    assert not os.path.exists("data/nope.jpg") and not os.path.islink("data/0000.jpg")
    assert os.path.realpath("data/0000.jpg") == os.path.join(hooked.root, "data", "0000.jpg")


# --- listings -------------------------------------------------------------------------------------------------------
def test_listdir_is_the_union_of_local_and_remote(hooked, project):
    mkdir_on_disk(project / "data")
    (project / "data" / "local-only.txt").write_text("x")
    (project / "data" / "0000.jpg").write_bytes(b"local copy")
    names = os.listdir("data")
    assert sorted(names) == sorted(["local-only.txt", "0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg",
                                    "labels.tsv", "emb", "nested"])
    assert len(names) == len(set(names))
    assert sorted(os.listdir()) == ["README.md", "data", "shards", "tables"]
    assert os.listdir(b"data/nested") == [b"deeper"]


def test_scandir_yields_direntry_like_objects(hooked, project):
    mkdir_on_disk(project / "data")
    (project / "data" / "local.txt").write_text("x")
    with os.scandir("data") as it:
        entries = {e.name: e for e in it}
    assert entries["local.txt"].is_file() and isinstance(entries["local.txt"], os.DirEntry)
    jpg, emb = entries["0000.jpg"], entries["emb"]
    assert jpg.path == "data/0000.jpg" and os.fspath(jpg) == "data/0000.jpg"
    assert jpg.is_file() and not jpg.is_dir() and not jpg.is_symlink()
    assert jpg.stat().st_size == os.path.getsize("data/0000.jpg") and jpg.inode() == os.stat("data/0000.jpg").st_ino
    assert emb.is_dir() and not emb.is_file() and stat.S_ISDIR(emb.stat().st_mode)
    assert repr(jpg) == "<DirEntry '0000.jpg'>"
    assert sorted(e.name for e in os.scandir()) == ["README.md", "data", "shards", "tables"]


def test_walk_and_glob_cover_remote_trees(hooked):
    walked = {root: (sorted(dirs), sorted(files)) for root, dirs, files in os.walk("data")}
    assert walked["data/nested/deeper"] == ([], ["note.txt"])
    assert walked["data"][0] == ["emb", "nested"]
    assert sorted(glob.glob("data/*.jpg")) == [f"data/{i:04d}.jpg" for i in range(4)]
    assert glob.glob("**/note.txt", recursive=True) == ["data/nested/deeper/note.txt"]
    assert glob.glob(os.path.join(hooked.root, "tables", "*.csv")) == [os.path.join(hooked.root, "tables", "scores.csv")]


def test_pathlib_methods(hooked, repo_dir):
    data = pathlib.Path("data")
    assert data.exists() and data.is_dir() and not data.is_file()
    assert (data / "0000.jpg").is_file() and (data / "0000.jpg").stat().st_size == os.path.getsize("data/0000.jpg")
    assert sorted(p.name for p in data.iterdir()) == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "emb",
                                                     "labels.tsv", "nested"]
    assert sorted(str(p) for p in data.glob("*.jpg")) == [f"data/{i:04d}.jpg" for i in range(4)]
    assert [str(p) for p in pathlib.Path(".").rglob("note.txt")] == ["data/nested/deeper/note.txt"]
    assert (data / "labels.tsv").read_text().startswith("0000.jpg\t")
    assert pathlib.Path("README.md").read_bytes() == b"# test repo\n"
    with (data / "0001.jpg").open("rb") as f:
        assert f.read() == (repo_dir / "data" / "0001.jpg").read_bytes()
    assert not (data / "nope").exists()


# --- libraries ------------------------------------------------------------------------------------------------------
def test_pil_image_open_returns_the_repo_pixels(hooked, repo_dir):
    for i in range(4):
        assert np.array_equal(pixels(f"data/{i:04d}.jpg"), pixels(repo_dir / "data" / f"{i:04d}.jpg"))


def test_numpy_load(hooked):
    emb = np.load("data/emb/img_emb_0.npy")
    assert emb.dtype == np.float32 and emb.shape == (4, 8) and emb[2, 3] == pytest.approx(2.3)


def test_pandas_read_csv(hooked):
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv("tables/scores.csv")
    assert list(frame["name"]) == ["0000.jpg", "0001.jpg"] and list(frame["score"]) == [6.8, 7.1]


def test_tarfile_open(hooked):
    with tarfile.open("shards/000.tar") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()} == TAR_MEMBERS


# --- scope ----------------------------------------------------------------------------------------------------------
def test_paths_outside_the_root_never_reach_the_server(hooked, tmp_path, remote):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "f.txt").write_text("x")
    for p in (str(outside / "sub" / "f.txt"), outside / "sub" / "f.txt"):
        with open(p) as f:
            f.read()
        os.stat(p)
    assert os.listdir(outside) == ["sub"] and [e.name for e in os.scandir(outside)] == ["sub"]
    assert list(os.walk(outside))[1][2] == ["f.txt"] and glob.glob(str(outside / "*" / "*.txt"))
    for missing in (outside / "nope.jpg", "../outside/nope.jpg", str(hooked.root) + "2/data/0000.jpg"):
        assert not os.path.exists(missing)
        with pytest.raises(FileNotFoundError):
            open(missing)
    assert remote.request_count() == 0


def test_exclude_globs_never_go_remote(remote, project):
    with install_hooks(project_root=str(project), repo_url=remote.repo_url, exclude_globs=["*.npy", "nested"]):
        remote.reset_counts()
        assert not os.path.exists("data/emb/img_emb_0.npy")
        assert not os.path.exists("data/nested/deeper/note.txt")
        assert "nested" not in os.listdir("data") and os.listdir("data/emb") == []
        with pytest.raises(FileNotFoundError):
            np.load("data/emb/img_emb_0.npy")
        assert remote.request_count("data/emb/img_emb_0.npy") == 0
        assert remote.request_count("data/nested", kind="content") == 0
        assert os.path.exists("data/0000.jpg")
        assert not os.path.exists(".git/config") and remote.request_count(".git", kind="content") == 0


def test_relative_paths_follow_chdir(hooked, project, tmp_path):
    (project / "sub").mkdir()
    os.chdir(project / "sub")
    assert open("../data/labels.tsv").readline().startswith("0000.jpg")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)
    assert os.path.exists("work/README.md") and not os.path.exists("../data/labels.tsv")
    os.chdir(tmp_path)
    assert not os.path.exists("data/labels.tsv")
    assert os.path.exists("work/data/labels.tsv")


def test_fds_bytes_paths_and_dir_fd_pass_through(hooked, project, repo_dir):
    fd = os.open(os.path.join(project, "local.bin"), os.O_CREAT | os.O_WRONLY)
    with open(fd, "wb") as f:
        f.write(b"abc")
    assert os.stat(os.path.join(project, "local.bin").encode()).st_size == 3
    with open(b"data/0000.jpg", "rb") as f:
        assert f.read() == (repo_dir / "data" / "0000.jpg").read_bytes()
    dir_fd = os.open(project, os.O_RDONLY)
    try:
        assert os.stat("local.bin", dir_fd=dir_fd).st_size == 3
        with pytest.raises(FileNotFoundError):  # dir_fd calls are never routed
            os.stat("README.md", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def test_concurrent_readers_share_one_download(hooked, repo_dir, remote):
    expected = (repo_dir / "data" / "0002.jpg").read_bytes()
    results, barrier = [], threading.Barrier(8)

    def read():
        barrier.wait()
        with open("data/0002.jpg", "rb") as f:
            results.append(f.read())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 8
    assert remote.request_count("data/0002.jpg", kind="raw") == 1
