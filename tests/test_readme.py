"""Every ```python block of README.md runs as written, in order, against `streamloader serve` (no DagsHub).

The server serves a synthetic LAION-style repo as DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus; the only change to
the snippets is the host (https://dagshub.com -> the local server), as DAGSHUB_CLIENT_HOST does for dagshub:// URLs.
Blocks marked ```python notest (they need Colab, torchvision or real credentials) must still compile.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import TOKEN

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks():
    return [(info.strip(), code) for info, code in BLOCK.findall(README.read_text(encoding="utf-8"))]


def test_readme_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in first.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["bash scripts/setup.sh && python3 -m streamloader demo",
                        "bash scripts/setup.sh && python3 -m pytest -q"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci  # CI runs exactly the README's test command


def test_every_block_compiles_and_names_real_apis():
    """Blocks marked notest cannot run here (Colab, torchvision, credentials) but must compile, and every streamloader
    name any block imports or uses must exist: the README cannot advertise an API that is not there."""
    import streamloader

    blocks = _blocks()
    assert len([info for info, _code in blocks if info != "python"]) >= 3
    names = []
    for info, code in blocks:
        tree = ast.parse(code, f"README {info}")
        compile(tree, f"README {info}", "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "streamloader":
                module = importlib.import_module(node.module)
                names += [(node.module, alias.name, hasattr(module, alias.name)) for alias in node.names]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "streamloader"):
                names.append(("streamloader", node.attr, hasattr(streamloader, node.attr)))
    assert len(names) >= 12
    assert [f"{module}.{name}" for module, name, found in names if not found] == []


def test_local_server_section_quotes_what_serve_prints():
    from streamloader.commands import serve

    text = README.read_text(encoding="utf-8")
    assert f"#   export DAGSHUB_TOKEN={serve.ANY_TOKEN}  # this server accepts any token" in text
    assert "#   export DAGSHUB_CLIENT_HOST=http://127.0.0.1:8765" in text
    assert "streamloader serve ./laion-mini --demo-data" in text


def test_python_blocks_run_against_local_server(tmp_path, make_server):
    from streamloader.synthetic import make_laion_repo

    repo = make_laion_repo(tmp_path / "repo", n_images=60, n_squirrel=7, image_size=(32, 32))
    srv = make_server(str(repo.root), owner="DagsHub-Datasets", repo="LAION-Aesthetics-V2-6.5plus", token=TOKEN)
    runnable = [code for info, code in _blocks() if info == "python"]
    assert len(runnable) >= 7
    script = "\n".join(runnable).replace("https://dagshub.com", srv.url)
    script += "\nprint('README-OK', len(squirrel_files), len(dataset))\n"
    project = tmp_path / "project"
    project.mkdir()
    env = dict(os.environ, DAGSHUB_TOKEN=TOKEN, DAGSHUB_CLIENT_HOST=srv.url,
               DAGSHUB_CLIENT_TOKENS_CACHE=str(tmp_path / "tokens.yaml"),
               STREAMLOADER_CACHE=str(tmp_path / "cache"), STREAMLOADER_NONINTERACTIVE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True,
                            timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"README-OK 7 7" in result.stdout
    assert "torch.Size([32, 3, 64, 64]) torch.Size([32, 512])" in result.stdout
    assert "7 of 60 rows matched" in result.stdout
    assert "['file', 'caption', 'score', 'url'] 60" in result.stdout


def test_help_of_the_dataset_documents_its_arguments():
    """The README sends users to help(LaionAestheticsDataset): it must explain the arguments itself."""
    from streamloader import LaionAestheticsDataset

    doc = LaionAestheticsDataset.__doc__
    for argument in ("annotations_file", "img_dir", "feature_extractor", "limit", "keywords", "on_error",
                     "storage_options"):
        assert f"{argument}" in doc, argument
    assert "see module docstring" not in doc.lower()
    assert "help(LaionAestheticsDataset)" in README.read_text(encoding="utf-8")
