"""The streamloader CLI: ls, filter, prefetch, cache, serve, exit codes, one-line errors (against the real server)."""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TOKEN
from streamloader.cli import build_parser, main


def _exit_code(argv):
    """main()'s return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _env(**extra):
    return dict(os.environ, DAGSHUB_TOKEN=TOKEN, STREAMLOADER_NONINTERACTIVE="1", **extra)


def test_help_for_every_command(capsys):
    for cmd in ("ls", "prefetch", "cache", "serve", "filter", "login", "demo", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
        assert "usage: streamloader" in capsys.readouterr().out


def test_every_usage_mistake_exits_2_with_one_line(server, tmp_path, capsys):
    assert main([]) == 2
    capsys.readouterr()
    names = tmp_path / "names.txt"
    names.write_text("0000.jpg\n")
    binary = tmp_path / "names.bin"
    binary.write_bytes(b"0000.jpg\n\xff\xfe\x00\n")
    for argv in (["cache", "explode"], ["cache", "prune", "--max-size", "5XB"],
                 ["prefetch", "-j", "0", "dagshub://user/repo/data"], ["ls", "dagshub://user"],
                 ["ls", "https://example.com/just-one-segment"], ["prefetch", "dagshub://user"],
                 ["ls", f"{server.repo_url}/data", "--host", "http://127.0.0.1:1"],
                 ["ls", f"{server.repo_url}/src/main/data", "--branch", "other"],
                 ["prefetch", str(names), "--host", server.url],
                 ["prefetch", "--base", "data", str(names)], ["filter", "dagshub://user", "-k", "x"],
                 ["serve", str(tmp_path), "--port", "99999"], ["serve", str(tmp_path / "nowhere")],
                 ["cache", "info", "--cache-dir", str(names)], ["cache", "prune", "--max-size", "1.2.3"],
                 ["cache", "prune", "--max-size", "0.5B"], ["mount", "badurl", str(tmp_path)],
                 ["mount", "dagshub://user/repo", str(tmp_path), "--prefetch-dir-on-open", "-5"],
                 ["mount", "dagshub://user/repo", str(tmp_path), "--whole-file-max", "-1"],
                 ["ls", "dagshub://user/repo", "--host", "not a host"], ["ls", "dagshub://user/repo", "--host", "ftp://x"],
                 ["prefetch", str(binary), "--base", "dagshub://user/repo/data"]):
        assert _exit_code(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err
        assert err.strip().splitlines()[-1].startswith("streamloader"), (argv, err)
        assert "Traceback" not in err and not captured.out.strip(), (argv, captured)  # (errors go to stderr)
    assert _exit_code(["prefetch", str(names), "--host", server.url]) == 2
    assert "give --base dagshub://OWNER/REPO/DIR" in capsys.readouterr().err


def test_global_flags_are_accepted_after_the_subcommand(server, capsys):
    parser = build_parser()
    assert parser.parse_args(["--debug", "ls", "x"]).debug is True  # not reset by the sub-command's default
    assert parser.parse_args(["ls", "x", "--debug"]).debug is True
    assert parser.parse_args(["ls", "x", "-v"]).verbose is True
    assert parser.parse_args(["ls", "x"]).debug is False
    seen = []
    probe = logging.Handler()
    probe.emit = lambda record: seen.append(record)
    logging.getLogger().addHandler(probe)
    try:
        assert main(["ls", "dagshub://user/repo/data", "--debug", "--host", server.url]) == 0
        assert main(["ls", "dagshub://user/repo/data", "-v", "--host", server.url]) == 0
    finally:
        logging.getLogger().removeHandler(probe)
    assert any(r.levelno == logging.DEBUG and r.name.startswith("streamloader") for r in seen)  # --debug took effect


def test_ls_lists_remote_dir_with_types(server, capsys):
    assert main(["ls", "-l", "dagshub://user/repo/data", "--host", server.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dir ") and line.endswith("nested/") for line in lines)
    assert any(line.startswith("file") and line.endswith("labels.tsv") for line in lines)
    assert not any("dire" in line for line in lines)


def test_ls_takes_the_repo_url_form(server, capsys, monkeypatch):
    monkeypatch.delenv("DAGSHUB_CLIENT_HOST", raising=False)  # the host comes from the URL alone
    assert main(["ls", "dagshub://user/repo/data", "--host", server.url]) == 0
    expected = capsys.readouterr().out
    for url in (f"{server.repo_url}/data", f"{server.repo_url}.git/data/", f"{server.repo_url}/src/main/data"):
        assert main(["ls", url]) == 0, url
        assert capsys.readouterr().out == expected


def test_prefetch_summary_separates_downloaded_from_cached(server, repo_dir, tmp_path, capsys):
    cache_dir = str(tmp_path / "cache")
    n_files = sum(1 for p in repo_dir.joinpath("data").rglob("*") if p.is_file())
    assert main(["prefetch", "dagshub://user/repo/data", "--host", server.url, "--cache-dir", cache_dir]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{n_files} downloaded (") and ", 0 already cached, 0 failed in " in out
    assert " MB)" not in out and "KB)" in out  # a few KB are not "0.0 MB"
    server.reset_counts()
    assert main(["prefetch", f"{server.repo_url}/data", "--cache-dir", cache_dir]) == 0
    assert capsys.readouterr().out.startswith(f"0 downloaded (0 B), {n_files} already cached, 0 failed in ")
    assert server.request_count(kind="raw") == 0


def test_prefetch_from_list_file(server, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"dagshub://user/repo/data/0000.jpg\n# comment\n{server.repo_url}/data/0001.jpg\n")
    assert main(["prefetch", str(listing), "--host", server.url, "--cache-dir", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.startswith("2 downloaded")


def test_filter_output_feeds_prefetch(server, tmp_path, capsys, monkeypatch):
    assert main(["filter", "dagshub://user/repo/data/labels.tsv", "--host", server.url, "-k", "squirrel"]) == 0
    names = capsys.readouterr().out
    assert names.split() == ["0000.jpg", "0002.jpg"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(names))
    assert main(["prefetch", "--base", "dagshub://user/repo/data", "--host", server.url, "-",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.startswith("2 downloaded")


def test_filter_pipe_prefetch_in_a_shell(server, tmp_path):
    """The README's pipeline, in real processes, with repo URLs pasted in the https:// form."""
    data = f"{server.repo_url}/data"
    command = (f"{sys.executable} -m streamloader filter {data}/labels.tsv -k squirrel"
               f" | {sys.executable} -m streamloader prefetch --base {data} -")
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=_env(STREAMLOADER_CACHE=str(tmp_path / "c")), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 downloaded (") and "0 failed" in result.stdout
    assert "2 of 4 rows matched" in result.stderr and "Traceback" not in result.stderr


def test_prefetch_reports_each_failure_once(server, tmp_path, capsys):
    listing = tmp_path / "names.txt"
    listing.write_text("0000.jpg\nmissing.jpg\n")
    argv = ["prefetch", "--base", "dagshub://user/repo/data", str(listing), "--host", server.url,
            "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "missing.jpg" in line] == [
        "failed: dagshub://user/repo/data/missing.jpg: No such file or directory in the remote repository"]
    assert "WARNING" not in err
    assert out.startswith("0 downloaded") or out.startswith("1 downloaded")
    assert "1 failed" in out
    assert main(argv + ["--skip-errors"]) == 0
    assert "1 already cached, 1 failed" in capsys.readouterr().out


def test_cache_info_and_clear_cover_every_part(server, tmp_path, capsys):
    import numpy as np

    from streamloader.cache import cache_info
    from streamloader.data.feature_cache import FeatureCache

    cache_dir = tmp_path / "cache"
    assert main(["prefetch", "dagshub://user/repo/data", "--host", server.url, "--cache-dir", str(cache_dir)]) == 0
    FeatureCache(str(cache_dir / "features"), "f" * 64, {"name": "toy/extractor"}).put("id-0", np.ones(8, np.float32))
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    every_file = [os.path.join(d, f) for d, _s, fs in os.walk(cache_dir) for f in fs]
    info = cache_info(str(cache_dir))
    assert info["total_files"] == len(every_file)
    assert info["total_bytes"] == sum(os.path.getsize(p) for p in every_file)  # listings and features included
    assert info["parts"]["listings"]["files"] > 0 and info["parts"]["features"]["files"] == 2
    for part in ("objects", "listings", "features", "tmp", "locks", "total"):
        assert any(line.startswith(part) for line in out.splitlines()), part
    assert f"{server.repo_url}: 1 commit, 7 files" in out
    assert "toy/extractor" in out and "1 vector" in out
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert "(7 objects," in capsys.readouterr().out
    left = [os.path.relpath(os.path.join(d, f), cache_dir) for d, _s, fs in os.walk(cache_dir) for f in fs]
    assert os.path.join("locks", "entries.lock") in left  # locks/ stays (also its sweep stamp and size total)
    assert all(p.startswith("locks" + os.sep) for p in left), left


def test_cache_commands_never_create_the_cache_dir(tmp_path, capsys):
    from streamloader.cache import cache_info

    missing = tmp_path / "never-made"
    assert main(["cache", "info", "--cache-dir", str(missing)]) == 0
    assert "does not exist" in capsys.readouterr().out
    for action in (["clear"], ["prune", "--max-size", "1GB"], ["prune"]):
        assert main(["cache", *action, "--cache-dir", str(missing)]) == 0
    assert cache_info(str(missing))["total_files"] == 0
    assert not missing.exists()


def test_runtime_errors_are_one_line_exit_1(server, capsys, monkeypatch):
    monkeypatch.setenv("DAGSHUB_TOKEN", "bad-token-value")
    assert main(["ls", "dagshub://user/repo/data", "--host", server.url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DAGSHUB_TOKEN" in err and "bad-token-value" not in err


def test_missing_path_and_repository_are_one_line_exit_1(server, capsys):
    assert main(["ls", "dagshub://user/repo/missing", "--host", server.url, "--branch", "main"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such file" in err and "missing" in err
    assert main(["ls", f"{server.url}/user/nope/data", "--branch", "main"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "repository" in err and "not found" in err and "branch" not in err


def test_filter_on_a_binary_file_says_so_briefly(tmp_path, capsys):
    binary = tmp_path / "image.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 4)
    assert main(["filter", str(binary), "-k", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "binary" in err and len(err) < 200 and "JFIF" not in err


def test_closed_stdout_is_a_normal_end(server, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "streamloader", "ls", "dagshub://user/repo/data", "--host",
                             server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    proc.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


def test_interrupted_prefetch_ends_with_one_line(tmp_path, make_server):
    """Ctrl-C (SIGINT to the whole process group) of a prefetch in worker processes: 'interrupted' is the last
    word, and no worker writes anything after it."""
    from streamloader.server import ServerFaults
    from streamloader.synthetic import make_laion_repo

    make_laion_repo(tmp_path / "repo", n_images=260, n_squirrel=0, image_size=(8, 8))
    srv = make_server(str(tmp_path / "repo"), token=TOKEN, faults=ServerFaults(latency=0.05))
    proc = subprocess.Popen([sys.executable, "-m", "streamloader", "prefetch", "dagshub://user/repo/data", "-j", "8",
                             "--host", srv.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(STREAMLOADER_CACHE=str(tmp_path / "c")), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while srv.request_count(kind="raw") < 16 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "interrupted"
    assert b"WARNING" not in err and b"Traceback" not in err


def test_serve_prints_what_to_export_and_makes_demo_data(tmp_path):
    repo = tmp_path / "laion-mini"
    env = _env(STREAMLOADER_SERVER_TOKEN="serve-secret-123")
    proc = subprocess.Popen([sys.executable, "-m", "streamloader", "serve", str(repo), "--demo-data", "12"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(4)]
        url = lines[0].split(" at ", 1)[1].split(" ")[0]
        assert lines[0] == (f"Serving {repo} as DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus at {url} "
                            f"(repo URL: {url}/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus)")
        assert lines[2:] == [f"  export DAGSHUB_CLIENT_HOST={url}",
                             '  export DAGSHUB_TOKEN="$STREAMLOADER_SERVER_TOKEN"']
        assert len(list((repo / "data").glob("*.jpg"))) == 12
        # the export lines work: a fresh process with them lists the guide's repo by OWNER/REPO alone
        listed = subprocess.run([sys.executable, "-m", "streamloader", "ls",
                                 "dagshub://DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus/data"],
                                capture_output=True, text=True, timeout=60,
                                env=dict(env, DAGSHUB_CLIENT_HOST=url, DAGSHUB_TOKEN="serve-secret-123"))
        assert "labels.tsv" in listed.stdout, listed.stderr
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "serve-secret-123" not in "\n".join(lines) + out + err
    assert "scores follow image brightness" in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "streamloader", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("streamloader ")
