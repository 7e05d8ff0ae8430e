"""Shared fixtures: an isolated environment for every test, a synthetic dataset repo, and local DagsHub servers.

Fixtures
    isolated_env (autouse)  no DAGSHUB_* variables leak in from the machine (all unset; DAGSHUB_DISABLE_ANALYTICS=1);
                            STREAMLOADER_CACHE, DAGSHUB_CLIENT_TOKENS_CACHE, HOME and XDG_* point into a fresh temp
                            dir outside ``tmp_path``. Returns that dir (a pathlib.Path).
    repo_dir                a small LAION-like repo folder (see ``make_repo``); a pathlib.Path.
    make_server             factory ``make_server(root, **DagsHubServer kwargs) -> DagsHubServer``, started; every
                            server it made is stopped at teardown.
    make_server_process     the same for ``ServerProcess`` (a ``streamloader serve`` subprocess).
    serve                   factory ``serve(**kwargs) -> make_server(repo_dir, token=TOKEN, **kwargs)``; it also
                            sets env DAGSHUB_TOKEN=TOKEN for the test.
    server                  ``serve()``: ``DagsHubServer(repo_dir, token=TOKEN)``, started, DAGSHUB_TOKEN=TOKEN.
    _no_hooks_leak (autouse) whatever hooks a test installed (even one that failed midway) are removed after it.
    project                 an empty local project folder ``tmp_path / "work"``, made the cwd.
    hook_project            factory ``hook_project(srv, **install_hooks kwargs) -> HookedRoot``: hooks for
                            ``project`` -> ``srv`` at branch main, uninstalled at teardown.
    remote                  the standard repo plus tables/scores.csv (``CSV``) and shards/000.tar (``TAR_MEMBERS``),
                            served by ``serve()`` (the hooks tests' server).
    hooked                  ``hook_project(remote)``, with the server's counters reset after installing.

Helpers: ``TOKEN``, ``AUTH`` (its request headers), ``api_get`` (a GET of the repo API with ``AUTH``),
``LABEL_ROWS``, ``make_jpeg``, ``write_labels``, ``make_repo``, ``make_random_files``, ``rewrite_file``, ``remote_repo`` (a RemoteRepo on a
test server), ``on_disk``, ``pixels``, ``run_official`` / ``official_hooks_script`` (the official dagshub client in
a fresh interpreter), ``why_no_mount``. Fixture-free helpers that spawned processes import too (git blob ids, job
launching) live in tests/_helpers.py.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Union

import pytest

from streamloader.server import DagsHubServer, ServerProcess

TOKEN = "sl-test-token-3f9a1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # the request headers of a client holding TOKEN

# The dagshub package reads its settings when first imported: keep its analytics off for the whole session,
# even for a module that imports it before any fixture runs.
os.environ["DAGSHUB_DISABLE_ANALYTICS"] = "1"
# Keras runs on the torch backend in the tests (TensorFlow is not a dependency), whatever ~/.keras says.
os.environ.setdefault("KERAS_BACKEND", "torch")

# (file name, caption, score, url) of data/labels.tsv in make_repo; row 1's caption holds a tab
LABEL_ROWS: List[Tuple[str, str, str, str]] = [
    ("0000.jpg", "A squirrel on a branch", "6.8", "https://example.com/0000.jpg"),
    ("0001.jpg", "A red\tcar at dusk", "7.1", "https://example.com/0001.jpg"),
    ("0002.jpg", "Squirrels in the park", "6.6", "https://example.com/0002.jpg"),
    ("0003.jpg", "mountain lake at dawn", "6.9", "https://example.com/0003.jpg"),
]

PathLike = Union[str, "os.PathLike[str]"]

# the extra files of the hooks tests' ``remote`` repo
CSV = b"name,score\n0000.jpg,6.8\n0001.jpg,7.1\n"
TAR_MEMBERS = {"a.txt": b"alpha\n", "b/c.bin": bytes(range(256))}

_REAL_LSTAT = os.lstat  # captured before any hook: what is really on the local disk
_REAL_MKDIR = os.mkdir  # likewise: makes a local folder even where the repo has one (os.mkdir says it exists)

#: seconds the test process may take to exit once the session is over before the exit watchdog ends it
EXIT_GRACE = float(os.environ.get("STREAMLOADER_TEST_EXIT_GRACE", "300"))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit watchdog: the library must never hold a process open (a worker nobody stops, a thread that never
    ends). Should the interpreter's exit hang anyway, print every thread's stack and the child processes left, and
    end the run failed after ``EXIT_GRACE`` s, instead of holding the job until CI's own timeout says nothing."""
    import faulthandler
    import threading

    status = [int(getattr(config, "_sl_exitstatus", 0) or 0)]

    def watchdog() -> None:
        time.sleep(EXIT_GRACE)
        sys.__stderr__.write(f"\n*** the test process did not exit within {EXIT_GRACE:.0f} s of the session's end; "
                             f"threads:\n")
        sys.__stderr__.flush()
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        from _helpers import child_pids

        for pid in child_pids(os.getpid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmdline = "?"
            sys.__stderr__.write(f"*** child process {pid} still there: {cmdline[:300]}\n")
        sys.__stderr__.flush()
        os._exit(status[0] or 3)

    threading.Thread(target=watchdog, name="tests-exit-watchdog", daemon=True).start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._sl_exitstatus = exitstatus  # type: ignore[attr-defined]  # for the exit watchdog


def make_jpeg(path: PathLike, seed: int = 0, size: Tuple[int, int] = (32, 32)) -> bytes:
    """Write a real, deterministic RGB JPEG (same seed and size -> same bytes) and return its bytes."""
    import io

    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.RandomState(seed)
    # a gradient plus noise: decodable, seed-dependent, and not trivially compressible
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy + seed * 37) % 256], -1)
    pixels = np.clip(base + rng.randint(-20, 21, size=(height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data


def write_labels(path: PathLike, rows: Sequence[Tuple[str, str, str, str]] = LABEL_ROWS) -> bytes:
    """Write a labels.tsv (name, caption, score, url per line; no header) and return its bytes."""
    data = "".join("\t".join(row) + "\n" for row in rows).encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data


def make_repo(root: PathLike) -> Path:
    """Build the standard test repo under ``root`` and return it as a Path.

    Layout::

        data/labels.tsv                 LABEL_ROWS (row 0001 has a tab inside its caption)
        data/0000.jpg .. data/0003.jpg  32x32 JPEGs, make_jpeg(seed=i)
        data/emb/img_emb_0.npy          float32 (4, 8), row i = i + arange(8) / 10
        data/nested/deeper/note.txt     b"nested file\\n"
        README.md                       b"# test repo\\n"
    """
    import numpy as np

    root = Path(root)
    write_labels(root / "data" / "labels.tsv")
    for i in range(len(LABEL_ROWS)):
        make_jpeg(root / "data" / f"{i:04d}.jpg", seed=i)
    emb = (np.arange(4, dtype=np.float32)[:, None] + np.arange(8, dtype=np.float32)[None, :] / 10).astype(np.float32)
    (root / "data" / "emb").mkdir(parents=True, exist_ok=True)
    np.save(root / "data" / "emb" / "img_emb_0.npy", emb)
    (root / "data" / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    (root / "data" / "nested" / "deeper" / "note.txt").write_bytes(b"nested file\n")
    (root / "README.md").write_bytes(b"# test repo\n")
    return root


def make_random_files(root: PathLike, count: int = 60) -> Dict[str, bytes]:
    """``count`` small files of distinct random content, ``root/data/f000.bin`` ...; returns {repo path: bytes}."""
    files = {}
    (Path(root) / "data").mkdir(parents=True)
    for i in range(count):
        data = os.urandom(1000 + 37 * i)
        (Path(root) / "data" / f"f{i:03d}.bin").write_bytes(data)
        files[f"data/f{i:03d}.bin"] = data
    return files


def rewrite_file(path: PathLike, data: bytes) -> None:
    """Replace a served file's content so the server's commit sha surely changes.

    The server detects changes by size and mtime; a same-size rewrite within one filesystem timestamp tick would
    go unnoticed, so this also moves the mtime forward by at least a second.
    """
    path = Path(path)
    old_mtime = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    new_mtime = max(time.time_ns(), old_mtime + 1_000_000_000)
    os.utime(path, ns=(new_mtime, new_mtime))


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep every test away from the user's tokens, caches and DagsHub settings (see module docstring)."""
    env_dir = tmp_path_factory.mktemp("env")
    for name in list(os.environ):
        if name.startswith("DAGSHUB_") or name == "STREAMLOADER_SERVER_TOKEN":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSHUB_DISABLE_ANALYTICS", "1")
    monkeypatch.setenv("STREAMLOADER_CACHE", str(env_dir / "streamloader-cache"))
    monkeypatch.setenv("DAGSHUB_CLIENT_TOKENS_CACHE", str(env_dir / "dagshub" / "tokens"))
    monkeypatch.setenv("HOME", str(env_dir / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(env_dir / "home" / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(env_dir / "home" / ".config"))
    (env_dir / "home").mkdir()
    return env_dir


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """A fresh copy of the standard test repo (``make_repo``) at ``tmp_path / "repo"``."""
    return make_repo(tmp_path / "repo")


@pytest.fixture
def make_server() -> Any:
    """Factory: ``make_server(root, **kwargs)`` -> a started DagsHubServer (kwargs as DagsHubServer's)."""
    servers: List[DagsHubServer] = []

    def factory(root: PathLike, **kwargs: Any) -> DagsHubServer:
        srv = DagsHubServer(str(root), **kwargs).start()
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.stop()


@pytest.fixture
def make_server_process() -> Any:
    """Factory: ``make_server_process(root, **kwargs)`` -> a started ServerProcess (admin endpoints on)."""
    procs: List[ServerProcess] = []

    def factory(root: PathLike, **kwargs: Any) -> ServerProcess:
        proc = ServerProcess(str(root), **kwargs)
        procs.append(proc)
        return proc.start()

    yield factory
    for proc in procs:
        proc.stop()


@pytest.fixture
def serve(repo_dir: Path, make_server: Callable[..., DagsHubServer],
          monkeypatch: pytest.MonkeyPatch) -> Callable[..., DagsHubServer]:
    """Factory: ``serve(**kwargs)`` -> ``make_server(repo_dir, token=TOKEN, **kwargs)``; sets DAGSHUB_TOKEN=TOKEN."""

    def factory(**kwargs: Any) -> DagsHubServer:
        monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
        return make_server(repo_dir, token=TOKEN, **kwargs)

    return factory


@pytest.fixture
def server(serve: Callable[..., DagsHubServer]) -> DagsHubServer:
    """``DagsHubServer(repo_dir, token=TOKEN)``, started; DAGSHUB_TOKEN=TOKEN is set for the test."""
    return serve()


# --- hooks ----------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_hooks_leak() -> Iterator[None]:
    """Hooks are process-wide: whatever a test installed (even one that failed midway) goes away after it."""
    yield
    hooks = sys.modules.get("streamloader.hooks")  # never imported: nothing can be installed
    if hooks is not None:
        hooks.uninstall_hooks()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local project folder, made the cwd."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def hook_project(project: Path) -> Iterator[Callable[..., Any]]:
    """Factory: ``hook_project(srv, **kwargs)`` -> the HookedRoot of hooks for ``project`` -> ``srv`` (branch main)."""
    from streamloader.hooks import install_hooks, uninstall_hooks

    def factory(srv: DagsHubServer, **kwargs: Any) -> Any:
        return install_hooks(project_root=str(project), repo_url=srv.repo_url, **{"branch": "main", **kwargs})

    yield factory
    uninstall_hooks()


@pytest.fixture
def remote(repo_dir: Path, serve: Callable[..., DagsHubServer]) -> DagsHubServer:
    """The standard repo plus tables/scores.csv and shards/000.tar, served with TOKEN; DAGSHUB_TOKEN=TOKEN."""
    (repo_dir / "tables").mkdir()
    (repo_dir / "tables" / "scores.csv").write_bytes(CSV)
    (repo_dir / "shards").mkdir()
    with tarfile.open(repo_dir / "shards" / "000.tar", "w") as tar:
        for name, data in TAR_MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return serve()


@pytest.fixture
def hooked(remote: DagsHubServer, hook_project: Callable[..., Any]) -> Any:
    """Hooks installed for ``project`` -> ``remote`` at branch main; server counters reset afterwards."""
    handle = hook_project(remote)
    remote.reset_counts()
    return handle


def api_get(srv: Any, path: str, **kwargs: Any) -> Any:
    """``requests.get`` of ``<srv.api_url>/<path>`` with TOKEN's ``AUTH`` headers (unless ``headers=``) and a 10 s
    timeout (unless ``timeout=``); other ``kwargs`` as requests.get's."""
    import requests

    kwargs.setdefault("headers", AUTH)
    kwargs.setdefault("timeout", 10)
    return requests.get(f"{srv.api_url}/{path}", **kwargs)


def remote_repo(srv: Any, cache_dir: PathLike, retry: Any = None, token: Any = TOKEN, **kwargs: Any) -> Any:
    """A RemoteRepo on ``srv`` (a DagsHubServer or ServerProcess) at branch main with ``token`` (False: none),
    caching in a FileCache at ``cache_dir``; ``retry`` (a RetryPolicy; None: the client's default) and ``kwargs``
    as RemoteRepo's."""
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.repo import RemoteRepo

    options = {} if retry is None else {"retry": retry}
    client = DagsHubClient(srv.repo_url, token=token, branch="main", **options)
    return RemoteRepo(client, FileCache(str(cache_dir)), **kwargs)


def mkdir_on_disk(path: PathLike) -> None:
    """Make the local folder ``path`` whether or not a hooked repo has one by that name (a local overlay)."""
    _REAL_MKDIR(path)


def on_disk(path: PathLike) -> bool:
    """Whether ``path`` really exists on the local disk (an lstat taken before any hook was installed)."""
    try:
        _REAL_LSTAT(path)
        return True
    except FileNotFoundError:
        return False


def pixels(path: PathLike) -> Any:
    """The RGB pixels of an image file, as a numpy array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --- the official dagshub client ------------------------------------------------------------------------------------
def official_hooks_script(body: str) -> str:
    """A script for :func:`run_official`: ``repo_url, mount, out_path = sys.argv[1:4]``, the official client's hooks
    installed for ``mount``; ``body`` (source at column 0; ``os``, ``hashlib`` imported) fills the dict ``res``,
    which is written as JSON to ``out_path`` after the hooks are uninstalled."""
    head = textwrap.dedent("""
        import hashlib, json, os, sys
        repo_url, mount, out_path = sys.argv[1:4]
        from dagshub.streaming import install_hooks, uninstall_hooks
        install_hooks(project_root=mount, repo_url=repo_url, branch="main")
        res = {}
        try:
        """)
    tail = textwrap.dedent("""
        finally:
            uninstall_hooks()
        with open(out_path, "w") as f:
            json.dump(res, f)
        """)
    return head + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + tail


def run_official(script: str, args: Sequence[Any], env_extra: Dict[str, str], tmp_path: Path, name: str) -> Any:
    """Run a script with the official client in a fresh interpreter (no DAGSHUB_* variables but ``env_extra``, its
    own token cache); the script's last argument is an output path, whose JSON this returns."""
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSHUB_")}
    env.update({"DAGSHUB_DISABLE_ANALYTICS": "1", "DAGSHUB_CLIENT_TOKENS_CACHE": str(tmp_path / "tokens.yaml"),
                **env_extra})
    proc = subprocess.run([sys.executable, str(path), *map(str, args), str(out)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, f"official client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def why_no_mount() -> str:
    """Why this machine cannot mount a FUSE file system ("" when it can): no libfuse, binding or /dev/fuse."""
    import sys

    if not sys.platform.startswith("linux"):
        return "FUSE mounts need Linux"
    from streamloader.errors import MountError
    from streamloader.fusemount import check_fuse, load_binding

    try:
        load_binding()
        check_fuse()
    except MountError as exc:
        return str(exc)
    return ""


@pytest.fixture
def canned():
    """``canned(script, tls=None)`` -> a :class:`canned.CannedServer` (raw bytes per request), closed after the test."""
    from canned import CannedServer

    servers: List[Any] = []

    def factory(script: Callable[[int, bytes], Any], tls: Any = None) -> Any:
        servers.append(CannedServer(script, tls))
        return servers[-1]

    yield factory
    for server in servers:
        server.close()
