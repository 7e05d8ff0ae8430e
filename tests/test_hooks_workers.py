"""Hooks in child processes: DataLoader workers (fork and spawn), multiprocessing, subprocess + activate_from_env."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import TOKEN, pixels
from streamloader.hooks import ENV_VAR, hooked_roots, install_hooks

IMAGES = [f"{i:04d}.jpg" for i in range(4)]


class RepoImages:
    """A map-style dataset that opens ``data/<name>`` with PIL, relative to the cwd, like the guide's Dataset."""

    def __init__(self, names):
        self.names = names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(os.path.join("data", self.names[index])) as image:
            return index, np.asarray(image.convert("RGB")).copy(), os.getpid()


def read_in_child(path):
    """Runs in a multiprocessing child: the bytes of ``path`` and whether the hooks came from the parent."""
    with open(path, "rb") as f:
        data = f.read()
    return data, [hook.inherited for hook in hooked_roots().values()]


def _load_all(context):
    torch_data = pytest.importorskip("torch.utils.data")
    loader = torch_data.DataLoader(RepoImages(IMAGES), batch_size=None, num_workers=2,
                                   multiprocessing_context=context)
    return {int(index): (array.numpy(), pid) for index, array, pid in loader}


def _assert_pixels(results, repo_dir):
    assert sorted(results) == list(range(len(IMAGES)))
    for index, (array, pid) in results.items():
        assert pid != os.getpid()
        assert np.array_equal(array, pixels(repo_dir / "data" / IMAGES[index]))


def test_dataloader_fork_workers(hooked, repo_dir, remote):
    _assert_pixels(_load_all("fork"), repo_dir)
    assert sum(remote.request_count(f"data/{name}", kind="raw") for name in IMAGES) == len(IMAGES)


def test_dataloader_spawn_workers_get_the_hooks_and_the_token(remote, project, repo_dir, monkeypatch):
    monkeypatch.delenv("DAGSHUB_TOKEN")  # the token exists only as an argument: it must reach the workers by pickle
    with install_hooks(project_root=project, repo_url=remote.repo_url, branch="main", token=TOKEN):
        assert TOKEN not in os.environ[ENV_VAR]
        remote.reset_counts()
        _assert_pixels(_load_all("spawn"), repo_dir)
        # the workers used the parent's pinned commit and listings: no branch lookup, no listing request
        assert remote.request_count(kind="branches") == 0 and remote.request_count(kind="commits") == 0


def test_spawn_child_of_a_script_that_installs_hooks_at_top_level(remote, project, repo_dir):
    script = project / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, multiprocessing, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from streamloader.hooks import install_hooks
        install_hooks(project_root='.', repo_url={remote.repo_url!r}, branch='main')  # runs again in the child
        from test_hooks_workers import read_in_child

        if __name__ == '__main__':
            with multiprocessing.get_context('spawn').Pool(1) as pool:
                data, inherited = pool.apply(read_in_child, ('data/labels.tsv',))
            print(json.dumps({{"size": len(data), "inherited": inherited}}))
        """))
    out = subprocess.run([sys.executable, str(script)], cwd=project, env=os.environ.copy(), capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"size": (repo_dir / "data" / "labels.tsv").stat().st_size, "inherited": [True]}


def test_multiprocessing_spawn_process_sees_the_parent_commit(hooked, repo_dir):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        data, inherited = pool.apply(read_in_child, ("data/nested/deeper/note.txt",))
    assert data == b"nested file\n" and inherited == [True]


def test_subprocess_opts_in_with_activate_from_env(hooked, project, remote):
    code = textwrap.dedent("""
        import json
        from streamloader.hooks import activate_from_env
        (hook,) = activate_from_env()
        with open('data/labels.tsv') as f:
            print(json.dumps({"first": f.readline(), "revision": hook.revision, "root": hook.root}))
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=project, env=os.environ.copy(), capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"first": "0000.jpg\tA squirrel on a branch\t6.8\thttps://example.com/0000.jpg\n",
                      "revision": hooked.revision, "root": str(project)}


def test_activate_from_env_without_the_variable_does_nothing(monkeypatch):
    from streamloader.hooks import activate_from_env

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert activate_from_env() == [] and hooked_roots() == {}
