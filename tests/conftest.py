"""Shared fixtures: an isolated environment for every test, a synthetic dataset repo, and local DagsHub servers.

Fixtures
    isolated_env (autouse)  no DAGSHUB_* variables leak in from the machine (all unset; DAGSHUB_DISABLE_ANALYTICS=1);
                            STREAMLOADER_CACHE, DAGSHUB_CLIENT_TOKENS_CACHE, HOME and XDG_* point into a fresh temp
                            dir outside ``tmp_path``. Returns that dir (a pathlib.Path).
    repo_dir                a small LAION-like repo folder (see ``make_repo``); a pathlib.Path.
    make_server             factory ``make_server(root, **DagsHubServer kwargs) -> DagsHubServer``, started; every
                            server it made is stopped at teardown.
    make_server_process     the same for ``ServerProcess`` (a ``streamloader serve`` subprocess).
    server                  ``DagsHubServer(repo_dir, token=TOKEN)``, started, with env DAGSHUB_TOKEN=TOKEN.

Helpers: ``TOKEN``, ``LABEL_ROWS``, ``make_jpeg``, ``write_labels``, ``make_repo``, ``rewrite_file``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple, Union

import pytest

from streamloader.server import DagsHubServer, ServerProcess

TOKEN = "sl-test-token-3f9a1c"

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
def server(repo_dir: Path, make_server: Callable[..., DagsHubServer], monkeypatch: pytest.MonkeyPatch) -> DagsHubServer:
    """``DagsHubServer(repo_dir, token=TOKEN)``, started; DAGSHUB_TOKEN=TOKEN is set for the test."""
    srv = make_server(repo_dir, token=TOKEN)
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    return srv


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
