"""Token resolution, login, OAuth through the dagshub package, and ``streamloader login`` (streamloader/auth.py)."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import types
import webbrowser

import pytest
import requests
import yaml

import streamloader
from streamloader import auth, cli
from streamloader.errors import AuthenticationError, RemoteError
from conftest import TOKEN

CLOSED_HOST = "http://127.0.0.1:9"  # discard port: nothing listens, so any network use fails loudly


def write_cache(entries_by_host: dict) -> str:
    """Write a token cache in the dagshub package's own format (version 1, YAML keyed by host)."""
    path = os.environ["DAGSHUB_CLIENT_TOKENS_CACHE"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.dump({"version": "1", **entries_by_host}, f, yaml.Dumper)
    return path


def app_token(value: str) -> dict:
    return {"access_token": value, "expiry": "never", "token_type": "app-token"}


def oauth_entry(value: str, expiry: str) -> dict:
    return {"access_token": value, "expiry": expiry, "token_type": "bearer"}


def clean_env() -> dict:
    """The current environment without anything that would give a token or force (non)interactivity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSHUB_") and k not in ("CI",)}
    env.pop(auth.NONINTERACTIVE_ENV, None)
    env["DAGSHUB_CLIENT_TOKENS_CACHE"] = os.environ["DAGSHUB_CLIENT_TOKENS_CACHE"]
    return env


@pytest.fixture
def url(server, monkeypatch) -> str:
    """The test server's URL, with the conftest's DAGSHUB_TOKEN removed so the other sources get their turn."""
    monkeypatch.delenv("DAGSHUB_TOKEN", raising=False)
    return server.url


@pytest.fixture
def auto_approve(monkeypatch):
    """Replace the browser with a GET of the authorize URL: the test server approves on that request."""
    opened = []

    def open_in_fake_browser(url, *args, **kwargs):
        opened.append(url)
        requests.get(url, timeout=10).raise_for_status()
        return True

    monkeypatch.setattr(webbrowser, "open", open_in_fake_browser)
    return opened


# --- precedence ------------------------------------------------------------------------------------------------


def test_each_source_in_order_of_precedence(url, auto_approve, monkeypatch):
    write_cache({url: [app_token("from-cache")]})
    monkeypatch.setenv("DAGSHUB_TOKEN", "from-dagshub-token")
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", "from-user-token")

    tok = auth.resolve_token(url, "from-argument", interactive=False)
    assert (tok.source, tok.reveal()) == ("argument", "from-argument")
    tok = auth.resolve_token(url, interactive=False)
    assert (tok.source, tok.reveal()) == ("DAGSHUB_TOKEN", "from-dagshub-token")
    monkeypatch.delenv("DAGSHUB_TOKEN")
    tok = auth.resolve_token(url, interactive=False)
    assert (tok.source, tok.reveal()) == ("DAGSHUB_USER_TOKEN", "from-user-token")
    monkeypatch.delenv("DAGSHUB_USER_TOKEN")
    tok = auth.resolve_token(url, interactive=False)
    assert (tok.source, tok.reveal()) == ("dagshub token cache", "from-cache")
    assert auto_approve == []

    os.remove(os.environ["DAGSHUB_CLIENT_TOKENS_CACHE"])
    with pytest.raises(AuthenticationError, match="DAGSHUB_TOKEN"):
        auth.resolve_token(url, interactive=False)
    assert auto_approve == []  # a non-interactive process never starts OAuth
    tok = auth.resolve_token(url, interactive=True)
    assert (tok.source, tok.reveal()) == ("oauth", TOKEN)
    assert len(auto_approve) == 1


def test_empty_env_vars_are_skipped(monkeypatch):
    monkeypatch.setenv("DAGSHUB_TOKEN", "  ")
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", "user-token\n")
    tok = auth.resolve_token(CLOSED_HOST, interactive=False)
    assert (tok.source, tok.reveal()) == ("DAGSHUB_USER_TOKEN", "user-token")


def test_empty_token_argument_is_an_error():
    with pytest.raises(AuthenticationError, match="empty"):
        auth.resolve_token(CLOSED_HOST, "", interactive=False)


def test_token_object_argument_is_returned_as_is():
    tok = auth.Token("abc", "DAGSHUB_TOKEN")
    assert auth.resolve_token(CLOSED_HOST, tok, interactive=False) is tok


def test_default_host_reads_dagshub_client_host(monkeypatch):
    monkeypatch.delenv("DAGSHUB_CLIENT_HOST", raising=False)
    from streamloader.remote.urls import default_host

    assert default_host() == "https://dagshub.com"
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", "http://127.0.0.1:1234/")
    assert default_host() == "http://127.0.0.1:1234"
    write_cache({"http://127.0.0.1:1234": [app_token("for-default-host")]})
    assert auth.resolve_token(interactive=False).reveal() == "for-default-host"


# --- the dagshub token cache ---------------------------------------------------------------------------------


def test_guide_add_app_token_is_found(url):
    """``dagshub.auth.add_app_token(token, host=...)`` as in the guide, in its own process, then we find it."""
    script = textwrap.dedent(
        f"""
        import dagshub
        dagshub.auth.add_app_token({TOKEN!r}, host={url!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], env=clean_env(), check=True, timeout=120,
                   stdin=subprocess.DEVNULL, capture_output=True)
    tok = auth.resolve_token(url + "/", interactive=False)  # trailing slash: same host
    assert (tok.source, tok.reveal()) == ("dagshub token cache", TOKEN)


def test_cache_skips_expired_tokens_and_other_hosts():
    write_cache({
        "http://127.0.0.1:1": [oauth_entry("expired", "2001-01-01T00:00:00.000000Z")],
        "http://127.0.0.1:2": [app_token("other-host")],
    })
    with pytest.raises(AuthenticationError):
        auth.resolve_token("http://127.0.0.1:1", interactive=False)
    write_cache({"http://127.0.0.1:1": [
        oauth_entry("expired", "2001-01-01T00:00:00.000000Z"),
        oauth_entry("oauth-valid", "2099-12-31T23:59:59.000000000Z"),
    ]})
    assert auth.resolve_token("http://127.0.0.1:1", interactive=False).reveal() == "oauth-valid"


def test_cache_prefers_app_tokens_like_the_official_client():
    write_cache({"http://127.0.0.1:1/": [
        oauth_entry("oauth-token", "2099-12-31T23:59:59.000000Z"),
        app_token("app-token"),
    ]})
    assert auth.resolve_token("http://127.0.0.1:1", interactive=False).reveal() == "app-token"


def test_corrupt_cache_is_ignored_without_quoting_it(caplog):
    path = os.environ["DAGSHUB_CLIENT_TOKENS_CACHE"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("version: '1'\nhttp://127.0.0.1:1: [{access_token: leaked-secret, : : :\n")
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as excinfo:
        auth.resolve_token("http://127.0.0.1:1", interactive=False)
    assert "not valid YAML" in caplog.text
    assert "leaked-secret" not in caplog.text and "leaked-secret" not in str(excinfo.value)
    with pytest.raises(streamloader.DataFormatError):  # login refuses to overwrite a cache it cannot read
        auth.login("new-token", "http://127.0.0.1:1", validate=False)


# --- OAuth ---------------------------------------------------------------------------------------------------


def test_oauth_end_to_end_stores_the_token_for_later_runs(url, auto_approve):
    tok = auth.resolve_token(url, interactive=True)
    assert (tok.source, tok.reveal()) == ("oauth", TOKEN)
    assert auto_approve and auto_approve[0].startswith(url + "/login/oauth/authorize?")
    assert "middleman_request_id=" in auto_approve[0]
    again = auth.resolve_token(url, interactive=True)  # no second browser round
    assert (again.source, again) == ("dagshub token cache", tok)
    assert len(auto_approve) == 1
    assert auth.validate_token(again, url)["login"]


def test_oauth_failure_is_an_authentication_error(monkeypatch):
    monkeypatch.setattr(webbrowser, "open", lambda *args, **kwargs: True)
    with pytest.raises(AuthenticationError, match="OAuth login with .* failed"):
        auth.resolve_token(CLOSED_HOST, interactive=True)  # the middleman POST cannot connect


# --- headless ------------------------------------------------------------------------------------------------


def test_headless_without_token_fails_fast_in_a_subprocess():
    script = textwrap.dedent(
        f"""
        import sys
        from streamloader.auth import resolve_token
        from streamloader.errors import AuthenticationError
        try:
            resolve_token({CLOSED_HOST!r})
        except AuthenticationError as exc:
            print("DAGSHUB_TOKEN" in str(exc), "dagshub" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], env=clean_env(), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]  # the hint, and the slow dagshub import was not even needed


def test_is_interactive_detection(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(auth.NONINTERACTIVE_ENV, raising=False)
    assert auth.is_interactive() is False  # pytest's stdin is not a terminal
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert auth.is_interactive() is True
    monkeypatch.setenv("CI", "true")
    assert auth.is_interactive() is False
    monkeypatch.delenv("CI")
    monkeypatch.setenv(auth.NONINTERACTIVE_ENV, "1")
    assert auth.is_interactive() is False


# --- secrecy -------------------------------------------------------------------------------------------------


def test_token_hides_its_value_but_pickles_and_compares():
    tok = auth.Token("s3cret-value", "argument")
    for text in (repr(tok), str(tok), f"{tok}", repr([tok]), repr({"t": tok})):
        assert "s3cret-value" not in text and "***" in text
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok and clone.reveal() == "s3cret-value" and clone.source == "argument"
    assert auth.Token("other", "argument") != tok
    assert auth.auth_headers(tok) == {"Authorization": "Bearer s3cret-value"}
    assert auth.auth_headers(None) == {}


def test_token_never_in_logs_or_errors(url, auto_approve, monkeypatch, caplog):
    bad = "bad-token-7f3a9c"
    with caplog.at_level(logging.DEBUG):
        monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
        auth.login(host=url)
        monkeypatch.delenv("DAGSHUB_TOKEN")
        auth.login(TOKEN, url)
        auth.resolve_token(url, interactive=False)
        os.remove(os.environ["DAGSHUB_CLIENT_TOKENS_CACHE"])
        auth.resolve_token(url, interactive=True)  # OAuth, with the dagshub package's own logging
        with pytest.raises(AuthenticationError) as excinfo:
            auth.login(bad, url)
    assert auto_approve
    assert TOKEN not in caplog.text and bad not in caplog.text
    assert bad not in str(excinfo.value) and bad not in repr(excinfo.value)


# --- login ---------------------------------------------------------------------------------------------------


def test_login_validates_stores_and_is_found_later(url):
    env_before = dict(os.environ)
    tok = auth.login(TOKEN, url + "/")
    assert (tok.source, tok.reveal()) == ("argument", TOKEN) and tok.user
    assert dict(os.environ) == env_before  # login sets nothing in the environment
    later = auth.resolve_token(url, interactive=False)
    assert (later.source, later) == ("dagshub token cache", tok)
    assert oct(os.stat(auth.token_cache_path()).st_mode & 0o777) == "0o600"


def test_login_token_is_readable_by_the_official_client(url):
    auth.login(TOKEN, url)
    script = textwrap.dedent(
        f"""
        from dagshub.auth.tokens import TokenStorage
        print(TokenStorage().get_token(host={url!r}, fail_if_no_token=True) == {TOKEN!r})
        """
    )
    out = subprocess.run([sys.executable, "-c", script], env=clean_env(), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_login_with_a_bad_token_fails_and_stores_nothing(url):
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        auth.login("not-the-token", url)
    assert not os.path.exists(auth.token_cache_path())


def test_login_unreachable_host_is_a_remote_error():
    with pytest.raises(RemoteError, match="cannot reach"):
        auth.login("some-token", CLOSED_HOST)


def test_latest_login_wins():
    auth.login("first", CLOSED_HOST, validate=False)
    auth.login("second", CLOSED_HOST + "/", validate=False)
    assert auth.resolve_token(CLOSED_HOST, interactive=False).reveal() == "second"
    auth.login("first", CLOSED_HOST, validate=False)
    assert auth.resolve_token(CLOSED_HOST, interactive=False).reveal() == "first"
    with open(auth.token_cache_path()) as f:
        assert yaml.safe_load(f)[CLOSED_HOST] == [app_token("first"), app_token("second")]


def test_login_does_not_persist_env_tokens(url, monkeypatch):
    monkeypatch.setenv("DAGSHUB_TOKEN", TOKEN)
    tok = auth.login(host=url)
    assert tok.source == "DAGSHUB_TOKEN" and tok.user
    assert not os.path.exists(auth.token_cache_path())


def test_public_names_are_exported():
    assert streamloader.login is auth.login


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_login_with_token(url, capsys):
    assert cli.main(["login", "--token", TOKEN, "--host", url]) == 0
    out, err = capsys.readouterr()
    assert "Logged in to " + url in out
    assert TOKEN not in out + err
    assert auth.resolve_token(url, interactive=False).source == "dagshub token cache"


def test_cli_login_bad_token_exits_1_with_one_line(url, capsys):
    bad = "bad-token-51e0d2"
    assert cli.main(["login", "--token", bad, "--host", url]) == 1
    out, err = capsys.readouterr()
    assert bad not in out + err
    assert len(err.strip().splitlines()) == 1 and "rejected the token" in err
    assert not os.path.exists(auth.token_cache_path())


def test_cli_login_token_from_stdin(url, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))
    assert cli.main(["login", "--token", "-", "--host", url]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert auth.resolve_token(url, interactive=False).reveal() == TOKEN


def test_cli_login_empty_stdin_exits_1(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["login", "--token", "-", "--host", CLOSED_HOST]) == 1
    assert "stdin" in capsys.readouterr().err


# --- public repositories need no token; private ones ask for one when needed (issue 18.3) ------------------------


@pytest.fixture
def headless(monkeypatch):
    """This process is not interactive, whatever the machine: OAuth is never started."""
    monkeypatch.setenv(auth.NONINTERACTIVE_ENV, "1")


def sent_authorization(srv) -> set:
    """Every Authorization header value the server received (None: no header)."""
    return {entry["auth"] for entry in srv.request_log}


def test_public_repo_is_read_without_any_token(repo_dir, make_server, tmp_path, capsys, headless):
    from streamloader.hooks import install_hooks
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(repo_dir, token=TOKEN, anonymous_read=True)
    fs = DagsHubFileSystem(host=srv.url, skip_instance_cache=True)
    assert "user/repo/data/0000.jpg" in fs.ls("user/repo/data", detail=False)
    assert fs.cat_file("user/repo/README.md") == b"# test repo\n"
    assert cli.main(["ls", "dagshub://user/repo/data", "--host", srv.url]) == 0
    assert "labels.tsv" in capsys.readouterr().out
    project = tmp_path / "project"
    project.mkdir()
    with install_hooks(project_root=str(project), repo_url=srv.repo_url, branch="main"):
        with open(project / "data" / "labels.tsv", "rb") as f:
            assert f.readline().startswith(b"0000.jpg\t")
    assert sent_authorization(srv) == {None}  # never an empty "Bearer " header


@pytest.mark.parametrize("anonymous_status", [401, 404])
def test_private_repo_without_a_token_says_to_set_dagshub_token(repo_dir, make_server, tmp_path, capsys, headless,
                                                                anonymous_status):
    from streamloader.hooks import install_hooks
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(repo_dir, token=TOKEN, anonymous_status=anonymous_status)
    calls = [
        lambda: DagsHubClient(srv.repo_url).list_dir("data"),  # the repo record is refused
        lambda: DagsHubClient(srv.repo_url, branch="main").list_dir("data"),  # the branch lookup is refused
        lambda: DagsHubClient(srv.repo_url, revision=srv.head_sha()).read_bytes("README.md"),  # the commit lookup
        lambda: DagsHubFileSystem(host=srv.url, skip_instance_cache=True).cat_file("user/repo/README.md"),
        lambda: install_hooks(project_root=str(tmp_path), repo_url=srv.repo_url, branch="main"),
    ]
    for call in calls:
        with pytest.raises(AuthenticationError, match=f"refused anonymous access \\(HTTP {anonymous_status}\\)"
                           ) as excinfo:
            call()
        assert "DAGSHUB_TOKEN" in str(excinfo.value) and "not interactive" in str(excinfo.value)
    assert cli.main(["ls", "dagshub://user/repo/data", "--host", srv.url]) == 1
    assert "DAGSHUB_TOKEN" in capsys.readouterr().err
    assert sent_authorization(srv) == {None}


def test_public_repo_missing_branch_or_file_is_still_not_found(repo_dir, make_server, headless):
    from streamloader.errors import RevisionNotFoundError
    from streamloader.remote.client import DagsHubClient

    srv = make_server(repo_dir, token=TOKEN, anonymous_read=True)
    with pytest.raises(RevisionNotFoundError):
        DagsHubClient(srv.repo_url, branch="nope").resolve_revision()
    client = DagsHubClient(srv.repo_url)
    with pytest.raises(FileNotFoundError):
        client.read_bytes("data/missing.jpg")
    with pytest.raises(FileNotFoundError):
        client.list_dir("nothing-here")


def test_a_rejected_token_names_its_source_not_its_value(repo_dir, make_server, monkeypatch, headless):
    from streamloader.remote.client import DagsHubClient

    srv = make_server(repo_dir, token=TOKEN, anonymous_read=True)
    monkeypatch.setenv("DAGSHUB_TOKEN", "wrong-token-0b3c77")
    with pytest.raises(AuthenticationError, match=r"rejected the token from DAGSHUB_TOKEN \(HTTP 401\)") as excinfo:
        DagsHubClient(srv.repo_url).list_dir("data")  # a public repo, but a bad token is not quietly dropped
    assert "wrong-token-0b3c77" not in str(excinfo.value)


def test_interactive_oauth_starts_only_once_a_private_repo_asks(repo_dir, make_server, auto_approve, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from streamloader.remote.client import DagsHubClient

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(auth.NONINTERACTIVE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))  # as in Colab
    public = make_server(repo_dir, token=TOKEN, anonymous_read=True)
    assert DagsHubClient(public.repo_url).read_bytes("README.md") == b"# test repo\n"
    assert auto_approve == []  # nothing asked for a token, so no login

    private = make_server(repo_dir, token=TOKEN, anonymous_status=404)
    with ThreadPoolExecutor(4) as pool:  # four clients refused at once: still one login
        listings = list(pool.map(lambda _: DagsHubClient(private.repo_url).list_dir("data"), range(4)))
    assert all("data/0000.jpg" in [e.path for e in listing] for listing in listings)
    assert len(auto_approve) == 1
    assert sent_authorization(private) == {None, f"Bearer {TOKEN}"}
    assert auth.resolve_token(private.url, interactive=False).source == "dagshub token cache"  # kept for next runs


# --- torchrun: one OAuth login per machine, not one per rank (issue 18.4) ----------------------------------------

_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from streamloader.remote.client import DagsHubClient
    names = [e.name for e in DagsHubClient(sys.argv[1], branch="main").list_dir("data")]
    with open(sys.argv[2], "w") as f:
        json.dump(names, f)
    """
)


def _start_rank(script_args, rank, env, tty):
    """Start a rank as torchrun would (RANK/LOCAL_RANK/WORLD_SIZE), on a terminal of its own when ``tty``;
    returns (process, function giving its output once it ended)."""
    import pty
    import threading

    env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "DAGSHUB_DISABLE_ANALYTICS": "1"}
    cmd = [sys.executable, "-c", _RANK_SCRIPT, *script_args]
    if not tty:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        return proc, lambda: proc.stdout.read().decode("utf-8", "replace")
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []

    def pump():  # keep reading, or a chatty child blocks on a full terminal
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def output():
        reader.join(10)
        return b"".join(chunks).decode("utf-8", "replace")

    return proc, output


def _finish(procs, timeout=120):
    outputs = []
    try:
        for proc, output in procs:
            proc.wait(timeout=timeout)
            outputs.append(output())
    finally:
        for proc, _output in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _fake_browser(tmp_path):
    """A BROWSER command (webbrowser honours $BROWSER) that "clicks Authorize" and logs each link it opened."""
    log_file = tmp_path / "browser.log"
    script = tmp_path / "browser.py"
    script.write_text(textwrap.dedent(
        f"""
        import sys, urllib.request
        with open({str(log_file)!r}, "a") as f:
            f.write(sys.argv[1] + "\\n")
        urllib.request.urlopen(sys.argv[1], timeout=30).read()
        """
    ))
    return f"{sys.executable} {script} %s", log_file


@pytest.mark.timeout(180)
def test_torchrun_ranks_share_one_oauth_login(repo_dir, make_server, tmp_path):
    srv = make_server(repo_dir, token=TOKEN, anonymous_status=404)
    browser, browser_log = _fake_browser(tmp_path)
    env = {**clean_env(), "BROWSER": browser, "STREAMLOADER_OAUTH_WAIT": "90"}
    procs = [_start_rank([srv.repo_url, str(tmp_path / f"rank{r}.json")], r, env, tty=True) for r in (0, 1)]
    outputs = _finish(procs)
    for rank, ((proc, _), out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}: {out[-3000:]}"
        with open(tmp_path / f"rank{rank}.json") as f:
            assert "0000.jpg" in json.load(f)
    assert len(browser_log.read_text().splitlines()) == 1  # one link, opened once
    assert sum(out.count("AUTHORIZATION REQUIRED") for out in outputs) == 1, outputs
    assert "AUTHORIZATION REQUIRED" in outputs[0] and "only local rank 0 logs in" in outputs[1]


@pytest.mark.timeout(120)
def test_torchrun_rank_waits_boundedly_or_fails_fast_when_headless(repo_dir, make_server, tmp_path):
    import time

    srv = make_server(repo_dir, token=TOKEN, anonymous_status=404)
    browser, browser_log = _fake_browser(tmp_path)
    env = {**clean_env(), "BROWSER": browser, "STREAMLOADER_OAUTH_WAIT": "1"}
    started = time.monotonic()
    # local rank 1 alone on a terminal: rank 0 never logs in, so it gives up after STREAMLOADER_OAUTH_WAIT
    (waited,) = _finish([_start_rank([srv.repo_url, str(tmp_path / "r1.json")], 1, env, tty=True)])
    # local rank 1 in a headless job: fails at once, no waiting
    (headless,) = _finish([_start_rank([srv.repo_url, str(tmp_path / "r1b.json")], 1, env, tty=False)])
    assert time.monotonic() - started < 60
    assert "waited 1 s (STREAMLOADER_OAUTH_WAIT) in vain" in waited and "DAGSHUB_TOKEN" in waited
    assert "not interactive, so OAuth was not attempted" in headless and "DAGSHUB_TOKEN" in headless
    assert not browser_log.exists()  # nobody but local rank 0 ever opens the browser
