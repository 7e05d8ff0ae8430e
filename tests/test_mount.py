"""``streamloader mount``: a real FUSE mount of the local test server, read by real C programs (cat, cmp, diff).

Most tests share one mount (module scope) of a repo with a few extra folders; each counting test reads its own
folder, so what the others cached cannot hide a download. Tests skip only when this machine cannot mount (no
mfusepy, no libfuse, no /dev/fuse), and say why.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from conftest import TOKEN, make_jpeg, make_repo, why_no_mount
from streamloader.errors import MountError
from streamloader.server import DagsHubServer

ROOT = Path(__file__).resolve().parents[1]


NO_MOUNT = why_no_mount()
needs_fuse = pytest.mark.skipif(bool(NO_MOUNT), reason=f"this machine cannot mount: {NO_MOUNT}")


def _build_repo(root: Path) -> Path:
    make_repo(root)
    for i in range(40):
        (root / "many" / f"{i:03d}.bin").parent.mkdir(exist_ok=True)
        (root / "many" / f"{i:03d}.bin").write_bytes(os.urandom(2000 + i))
    for i in range(12):
        (root / "seq").mkdir(exist_ok=True)
        (root / "seq" / f"{i:03d}.bin").write_bytes(os.urandom(500 + i))
    (root / "big").mkdir()
    for i in range(2500):
        (root / "big" / f"f{i:05d}").write_bytes(b"x")
    (root / "blobs").mkdir()
    (root / "blobs" / "large.bin").write_bytes(os.urandom(300_000))
    for i in range(3):
        make_jpeg(root / "images" / f"{i}.jpg", seed=10 + i, size=(48, 40))
    return root


def _env(cache: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSHUB_", "STREAMLOADER_"))}
    env.update(DAGSHUB_TOKEN=TOKEN, DAGSHUB_DISABLE_ANALYTICS="1", STREAMLOADER_CACHE=str(cache),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _mount_cli(server: DagsHubServer, mountpoint: Path, cache: Path, *args: str,
               foreground: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamloader", "mount", "dagshub://user/repo", str(mountpoint),
           "--host", server.url, *args] + (["--foreground"] if foreground else [])
    return subprocess.Popen(cmd, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_mounted(mountpoint: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    from streamloader.fusemount import is_mounted

    deadline = time.monotonic() + timeout
    while not is_mounted(str(mountpoint)):
        assert proc.poll() is None, f"mount exited: {proc.communicate()}"
        assert time.monotonic() < deadline, "not mounted in time"
        time.sleep(0.02)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point; whatever a failed test left mounted there is detached at teardown."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    from streamloader.fusemount import is_mounted, unmount

    if is_mounted(str(path)):
        unmount(str(path), lazy=True)


def _raw_gets(server: DagsHubServer, prefix: str) -> Dict[str, int]:
    return {p: n for p, n in server.get_counts("raw").items() if p.startswith(prefix)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, object]]:
    """One server and one mount of it (through ``streamloader.mount``) for the read-only tests."""
    if NO_MOUNT:
        pytest.skip(f"this machine cannot mount: {NO_MOUNT}")
    import streamloader

    base = tmp_path_factory.mktemp("mount")
    repo = _build_repo(base / "repo")
    server = DagsHubServer(str(repo), token=TOKEN).start()
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    try:
        with streamloader.mount("dagshub://user/repo", str(mountpoint), host=server.url, token=TOKEN,
                                cache_dir=str(base / "cache")) as handle:
            yield {"server": server, "repo": repo, "mnt": mountpoint, "handle": handle, "cache": base / "cache"}
        from streamloader.fusemount import is_mounted

        assert not is_mounted(str(mountpoint)) and handle.process.poll() is not None
    finally:
        server.stop()


@needs_fuse
def test_listdir_and_stat_show_the_real_tree(shared):
    repo, mnt = shared["repo"], shared["mnt"]
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(repo))
    assert sorted(os.listdir(mnt / "data")) == sorted(os.listdir(repo / "data"))
    from streamloader.remote.client import DagsHubClient

    commit_time = DagsHubClient(shared["server"].repo_url, token=TOKEN).commit_time()
    for rel in ("README.md", "data/0001.jpg", "data/labels.tsv", "data/nested/deeper/note.txt", "blobs/large.bin"):
        st = os.stat(mnt / rel)
        assert st.st_size == os.path.getsize(repo / rel)
        assert st.st_blocks == (st.st_size + 511) // 512  # (du and sparse-file checks read the blocks)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
        assert st.st_mtime == pytest.approx(commit_time, abs=1)
    st = os.stat(mnt / "data" / "nested")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555


@needs_fuse
def test_big_folder_lists_every_entry(shared):
    names = os.listdir(shared["mnt"] / "big")
    assert len(names) == 2500 and sorted(names) == sorted(os.listdir(shared["repo"] / "big"))


@needs_fuse
def test_listed_attributes_are_the_real_ones_on_every_page(shared):
    """A listing hands the kernel each file's attributes (readdirplus, page by page): what `find -printf` shows
    for a folder of 2500 entries and for one of 40 must be the source's sizes, modes and types."""
    repo, mnt = shared["repo"], shared["mnt"]
    for folder in ("big", "many"):
        proc = subprocess.run(["find", str(mnt / folder), "-mindepth", "1", "-printf", "%f %s %m %y\\n"],
                              capture_output=True, text=True, timeout=120, check=True)
        shown = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
        source = {p.name: f"{p.stat().st_size} 444 f" for p in (repo / folder).iterdir()}
        assert shown == source


@needs_fuse
def test_every_file_has_the_source_bytes_read_by_a_c_program(shared):
    repo, mnt, server = shared["repo"], shared["mnt"], shared["server"]
    proc = subprocess.run(["diff", "-r", "-x", "big", "-x", "many", "-x", "seq", str(repo), str(mnt)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rel in ("data/0000.jpg", "data/labels.tsv", "blobs/large.bin"):  # and once more, by cmp at an offset
        subprocess.run(["cmp", "-i", "100", str(repo / rel), str(mnt / rel)], check=True, timeout=10)
    gets = _raw_gets(server, "data/")
    assert gets and set(gets.values()) == {1}, gets


@needs_fuse
def test_missing_path_is_enoent_and_writes_are_erofs(shared):
    mnt = shared["mnt"]
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "data" / "nope.jpg")
    with pytest.raises(FileNotFoundError):
        os.listdir(mnt / "no-such-dir")
    for attempt in (lambda: open(mnt / "new.txt", "w"), lambda: open(mnt / "README.md", "r+b"),
                    lambda: os.mkdir(mnt / "d"), lambda: os.unlink(mnt / "README.md"),
                    lambda: os.rename(mnt / "README.md", mnt / "x")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    proc = subprocess.run(f"echo x > '{mnt}/README.md'", shell=True, capture_output=True, text=True)
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr


@needs_fuse
def test_four_concurrent_reader_processes_download_each_file_once(shared):
    server, mnt, repo = shared["server"], shared["mnt"], shared["repo"]
    files = sorted(os.listdir(repo / "many"))
    server.faults.latency = 0.02  # downloads overlap
    try:
        commands = ["cat " + " ".join(f"'{mnt}/many/{name}'" for name in order) + " | md5sum"
                    for order in (files, files[::-1], files, files[::-1])]
        readers = [subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, text=True) for command in commands]
        sums = {reader.communicate(timeout=60)[0] for reader in readers}
    finally:
        server.faults.latency = 0.0
    expected = subprocess.run(["sh", "-c", "cat " + " ".join(str(repo / "many" / n) for n in files) + " | md5sum"],
                              capture_output=True, text=True).stdout
    assert len(sums) == 2  # forward and reversed orders
    assert expected in sums
    assert _raw_gets(server, "many/") == {f"many/{name}": 1 for name in files}


@needs_fuse
def test_reading_a_folder_in_order_prefetches_the_next_files(shared):
    server, mnt = shared["server"], shared["mnt"]
    subprocess.run(["cat", str(mnt / "seq" / "005.bin")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cat", str(mnt / "seq" / "002.bin")], check=True, stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    assert set(_raw_gets(server, "seq/")) == {"seq/005.bin", "seq/002.bin"}  # random opens: nothing extra
    # one reader, two files in listing order: the rest of the folder (window 32) is fetched without being read
    subprocess.run(["cat", str(mnt / "seq" / "000.bin"), str(mnt / "seq" / "001.bin")], check=True,
                   stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while len(_raw_gets(server, "seq/")) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _raw_gets(server, "seq/") == {f"seq/{i:03d}.bin": 1 for i in range(12)}


@needs_fuse
def test_opencv_reads_images_through_the_mount(shared):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed (optional)")
    import numpy as np

    for i in range(3):
        ours = cv2.imread(str(shared["mnt"] / "images" / f"{i}.jpg"))
        assert ours is not None and ours.shape == (40, 48, 3)
        assert np.array_equal(ours, cv2.imread(str(shared["repo"] / "images" / f"{i}.jpg")))


@needs_fuse
def test_busy_and_non_empty_mount_points_get_one_clear_line(shared, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for target, words in ((full, "is not empty"), (shared["mnt"], "is busy"), (tmp_path / "absent", "does not exist")):
        proc = _mount_cli(shared["server"], target, tmp_path / "cache")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert (full / "keep.txt").read_text() == "mine"


@needs_fuse
def test_big_files_are_read_by_ranges_and_the_context_manager_unmounts(server, repo_dir, mnt):
    import streamloader
    from streamloader.cache import FileCache
    from streamloader.fusemount import is_mounted

    big = os.urandom(50_000)
    (repo_dir / "large.bin").write_bytes(big)
    with streamloader.mount("dagshub://user/repo", str(mnt), host=server.url, whole_file_max=10_000) as handle:
        assert is_mounted(str(mnt))
        out = subprocess.run(["dd", f"if={mnt}/large.bin", "bs=7000", "skip=3", "count=2", "status=none"],
                             capture_output=True, check=True, timeout=30).stdout
        assert out == big[21_000:35_000]
        subprocess.run(["cmp", str(repo_dir / "large.bin"), str(mnt / "large.bin")], check=True, timeout=30)
        ranges = [e["range"] for e in server.request_log if e["kind"] == "raw" and e["path"] == "large.bin"]
        assert ranges and all(r and r.startswith("bytes=") for r in ranges)
        assert not any(FileCache()._entries())  # nothing whole-file downloaded into the cache
    assert not is_mounted(str(mnt)) and handle.process.poll() == 0


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_cleanly(server, tmp_path, mnt, sig):
    from streamloader.fusemount import is_mounted

    proc = _mount_cli(server, mnt, tmp_path / "cache", foreground=True)
    try:
        _wait_mounted(mnt, proc)
        assert (mnt / "README.md").read_bytes() == b"# test repo\n"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, proc.communicate()
        assert not is_mounted(str(mnt)) and os.listdir(mnt) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_fuse
def test_a_web_address_of_the_repo_mounts_too(server, tmp_path, mnt):
    from streamloader.fusemount import is_mounted

    cmd = [sys.executable, "-m", "streamloader", "mount", f"{server.repo_url}/data/nested", str(mnt), "--foreground"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # (an http://HOST/OWNER/REPO/PATH address, as ls and prefetch take)
    try:
        _wait_mounted(mnt, proc)
        assert (mnt / "deeper" / "note.txt").read_text() == "nested file\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.communicate()
        assert not is_mounted(str(mnt))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_fuse
def test_kill_9_leaves_a_sound_cache_and_umount_cleans_the_dead_mount(server, repo_dir, tmp_path, mnt):
    from streamloader.cache import FileCache
    from streamloader.fusemount import is_mounted

    cache = tmp_path / "cache"
    proc = _mount_cli(server, mnt, cache, foreground=True)
    _wait_mounted(mnt, proc)
    subprocess.run(["cat", str(mnt / "README.md")], check=True, stdout=subprocess.DEVNULL)
    server.faults.latency = 2.0  # the next download is in flight when the mount process dies
    reader = subprocess.Popen(["cat", str(mnt / "data" / "0001.jpg")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    server.faults.latency = 0.0
    assert reader.wait(timeout=10) != 0  # the reader gets an error, not a partial file
    with pytest.raises(OSError) as info:
        os.stat(mnt / "data" / "0003.jpg")  # never looked up: asks the (dead) mount process
    assert info.value.errno == errno.ENOTCONN
    retry = _mount_cli(server, mnt, cache)
    err = retry.communicate(timeout=60)[1]
    assert retry.returncode == 1 and "dead mount" in err and "streamloader umount" in err
    umount = subprocess.run([sys.executable, "-m", "streamloader", "umount", str(mnt)], env=_env(cache),
                            capture_output=True, text=True, timeout=60)
    assert umount.returncode == 0, umount.stderr
    assert not is_mounted(str(mnt))
    # every cache entry is whole and verified; a remount serves every file right
    for path, _st in FileCache(str(cache))._entries():
        data = Path(path).read_bytes()
        assert data in (b"# test repo\n", (repo_dir / "data" / "0001.jpg").read_bytes())
    again = _mount_cli(server, mnt, cache, foreground=True)
    try:
        _wait_mounted(mnt, again)
        subprocess.run(["diff", "-r", str(repo_dir), str(mnt)], check=True, timeout=60)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0


def test_missing_libfuse_or_device_is_one_clear_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, FUSE_LIBRARY_PATH=str(tmp_path / "no-libfuse.so"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "streamloader", "mount", "dagshub://user/repo", str(mnt)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert ("libfuse" in proc.stderr or "mfusepy" in proc.stderr) and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    from streamloader.fusemount import check_fuse

    with pytest.raises(MountError, match="no-fuse is missing"):
        check_fuse(device=str(tmp_path / "no-fuse"))


@needs_fuse
def test_unknown_size_is_asked_for_that_one_path(server):
    from streamloader.fusemount.ops import file_size
    from streamloader.remote.client import DagsHubClient, RemoteEntry
    from streamloader.remote.repo import RemoteRepo

    repo = RemoteRepo(DagsHubClient(server.repo_url))
    listed = repo.info("data/0002.jpg")
    real = len(Path(server.folder.root, "data", "0002.jpg").read_bytes())
    for unknown in (0, None):
        entry = RemoteEntry(listed.path, "file", unknown, listed.hash, listed.versioning)  # type: ignore[arg-type]
        assert file_size(repo, entry) == real
    assert server.request_count("data/0002.jpg", kind="raw") == 0  # a size question, not a download
    assert file_size(repo, RemoteEntry("README.md", "file", 12)) == 12  # a known size: no question at all


def test_cached_copy_of_a_listed_entry_is_checked_like_any_cache_lookup(server, tmp_path):
    """What the mount uses for listed files: the cached copy without a store lookup, None until it is cached, and
    a copy whose size disagrees with the entry is no answer."""
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient, RemoteEntry
    from streamloader.remote.repo import RemoteRepo

    repo = RemoteRepo(DagsHubClient(server.repo_url), FileCache(str(tmp_path / "cache")))
    entry = next(e for e in repo.ls("data") if e.name == "0002.jpg")
    assert repo.cached_copy(entry) is None
    local = repo.local_path(entry.path)
    assert repo.cached_copy(entry) == local
    assert Path(local).read_bytes() == Path(server.folder.root, "data", "0002.jpg").read_bytes()
    assert repo.cached_copy(next(e for e in repo.ls("data") if e.is_dir)) is None
    wrong = RemoteEntry(entry.path, "file", (entry.size or 0) + 1, entry.hash, entry.versioning)
    assert repo.cached_copy(wrong) is None


def test_read_ahead_cancels_what_has_not_started_on_a_jump():
    from streamloader.fusemount.readahead import ReadAhead

    gate = threading.Event()
    fetched: List[str] = []

    def fetch(path: str) -> None:
        fetched.append(path)
        gate.wait(10)

    paths = [f"d/{i}" for i in range(40)]
    ahead = ReadAhead(fetch, window=4, workers=1)
    try:
        ahead.opened("reader", 0, paths)
        assert ahead.submitted == 0  # one open alone is not a pattern
        ahead.opened("reader", 1, paths)
        assert ahead.submitted == 4  # files 2..5
        ahead.opened("reader", 2, paths)
        assert ahead.submitted == 5  # and 6
        ahead.opened("reader", 30, paths)  # a jump: 3..6 have not started (one worker, blocked on 2)
        assert ahead.cancelled == 4
        ahead.opened("other", 10, paths)
        ahead.opened("other", 11, paths)  # another reader gets its own stream
        gate.set()
        deadline = time.monotonic() + 10
        while ahead.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fetched == ["d/2", "d/12", "d/13", "d/14", "d/15"]
    finally:
        gate.set()
        ahead.close()
