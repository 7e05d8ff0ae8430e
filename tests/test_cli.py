"""The streamloader CLI: ls, prefetch, cache, exit codes and one-line errors (against the real server)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from streamloader.cli import main


def test_help_for_every_command(capsys):
    for cmd in ("ls", "prefetch", "cache", "serve", "filter", "login", "demo", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
        assert "usage: streamloader" in capsys.readouterr().out


def test_no_command_and_bad_usage_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "explode"])
    assert exit_info.value.code == 2


def test_ls_lists_remote_dir(server, capsys):
    assert main(["ls", "-l", "dagshub://user/repo/data", "--host", server.url]) == 0
    out = capsys.readouterr().out
    assert "labels.tsv" in out and "0000.jpg" in out and "nested/" in out


def test_prefetch_then_cache_info_prune_clear(server, repo_dir, tmp_path, capsys):
    cache_dir = str(tmp_path / "cache")
    assert main(["prefetch", "dagshub://user/repo/data", "--host", server.url, "--cache-dir", cache_dir]) == 0
    out = capsys.readouterr().out
    n_files = sum(1 for p in repo_dir.joinpath("data").rglob("*") if p.is_file())
    assert f"prefetched {n_files} files" in out
    server.reset_counts()
    assert main(["prefetch", "dagshub://user/repo/data", "--host", server.url, "--cache-dir", cache_dir]) == 0
    assert server.request_count(kind="raw") == 0
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", cache_dir]) == 0
    assert f"files: {n_files}" in capsys.readouterr().out
    assert main(["cache", "prune", "--max-size", "0", "--cache-dir", cache_dir]) == 0
    assert f"removed {n_files} cached files" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "prune", "--cache-dir", cache_dir])
    assert exit_info.value.code == 2


def test_prefetch_from_list_file(server, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("dagshub://user/repo/data/0000.jpg\n# comment\ndagshub://user/repo/data/0001.jpg\n")
    assert main(["prefetch", str(listing), "--host", server.url, "--cache-dir", str(tmp_path / "c")]) == 0
    assert "prefetched 2 files" in capsys.readouterr().out


def test_runtime_errors_are_one_line_exit_1(server, capsys, monkeypatch):
    monkeypatch.setenv("DAGSHUB_TOKEN", "bad-token-value")
    assert main(["ls", "dagshub://user/repo/data", "--host", server.url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DAGSHUB_TOKEN" in err and "bad-token-value" not in err


def test_missing_path_is_one_line_exit_1(server, capsys):
    assert main(["ls", "dagshub://user/repo/missing", "--host", server.url, "--branch", "main"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such file" in err and "missing" in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "streamloader", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("streamloader ")
