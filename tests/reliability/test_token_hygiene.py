"""Issue 8.6 — token hygiene (datasets #6412): a recognisable token goes through every auth path; it must never
show up in log output, exception messages, reprs, cache file names or contents, or any process's arguments; it
is not sent after a cross-origin redirect; the cache is private to the user (dirs 0700, files 0600).

Unit-level: tests/test_auth.py (Token hides itself, resolution never logs it), tests/test_client.py (redirect to
an origin without the file), tests/test_cache.py (permissions of the top-level dirs).
"""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Tuple

import pytest

from conftest import make_repo
from reliability.conftest import FAST, wait_for_log
from streamloader.remote.client import DagsHubClient
from streamloader.remote.filesystem import DagsHubFileSystem
from streamloader.remote.repo import RemoteRepo

# recognisable, and built at run time so that no source line (shown in tracebacks) contains them
SECRET = "-".join(["sl", "SECRET", "tok", "7c1d9e0b4a"])
WRONG = "-".join(["sl", "WRONG", "tok", "22aa91f0c3"])


def _messages(exc: BaseException) -> List[str]:
    """str and repr of an exception and of everything chained to it."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out += [str(exc), repr(exc), str(getattr(exc, "args", ""))]
        exc = exc.__cause__ or exc.__context__
    return out


def _assert_clean(texts: Iterable[str], where: str) -> None:
    for text in texts:
        for secret in (SECRET, WRONG):
            assert secret not in text, f"token leaked in {where}: {text[:300]!r}"


def _cache_names_and_contents(root: str) -> List[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        out += [os.path.join(dirpath, d) for d in dirs]
        for name in files:
            path = os.path.join(dirpath, name)
            out.append(path)
            if os.path.getsize(path) < 1_000_000:
                with open(path, "rb") as f:
                    out.append(f.read().decode("latin-1"))
    return out


def _all_cmdlines() -> List[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    lines.append(f.read().replace(b"\0", b" ").decode("utf-8", "replace"))
            except OSError:
                continue
    return lines


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo")


def test_token_never_in_logs_errors_reprs_or_cache_files(repo, make_server, isolated_env, monkeypatch, caplog,
                                                         figures):
    from streamloader.data.labels import read_labels
    from streamloader.errors import AuthenticationError, RemoteError, RevisionNotFoundError

    srv = make_server(repo, token=SECRET)
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", srv.url)
    monkeypatch.setenv("DAGSHUB_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 and fsspec included
    cache = str(isolated_env / "streamloader-cache")
    errors: List[BaseException] = []
    objects: list = []

    fs = DagsHubFileSystem(host=srv.url, token=SECRET, skip_instance_cache=True)
    fs.ls("user/repo/data")
    assert fs.cat_file("user/repo/data/0000.jpg")[:2] == b"\xff\xd8"
    fs.prefetch(fs.find("user/repo/data"), progress=False)
    assert len(list(read_labels("dagshub://user/repo/data/labels.tsv"))) == 4  # token from the environment
    client = DagsHubClient(srv.repo_url, token=SECRET, retry=FAST)
    remote = RemoteRepo(client)
    objects += [fs, client, remote, remote.cache, fs.repo("user", "repo")]

    def expect(error_type, call):
        with pytest.raises(error_type) as excinfo:
            call()
        errors.append(excinfo.value)

    expect(FileNotFoundError, lambda: fs.cat_file("user/repo/data/missing.jpg"))
    expect(RevisionNotFoundError,
           lambda: DagsHubFileSystem(host=srv.url, token=SECRET, branch="nope", skip_instance_cache=True).ls(
               "user/repo"))
    srv.faults.fail_paths = {"README.md": 503}
    expect(RemoteError, lambda: remote.read_bytes("README.md"))
    srv.faults.fail_paths = {}
    for bad in (WRONG, f"{SECRET}x"):  # a wrong token, and one that merely contains the real one
        expect(AuthenticationError, lambda: DagsHubClient(srv.repo_url, token=bad, retry=FAST).list_dir("data"))
    expect(ValueError, lambda: fs.cat_file("user/repo/../x"))
    from streamloader.auth import resolve_token

    token = resolve_token(srv.url)
    objects.append(token)
    assert token.reveal() == SECRET

    _assert_clean([caplog.text], "log output")
    assert any("HTTP" in r.getMessage() or "GET" in r.getMessage() for r in caplog.records)  # logs were captured
    for exc in errors:
        _assert_clean(_messages(exc), f"{type(exc).__name__}")
    _assert_clean([repr(o) for o in objects] + [str(o) for o in objects], "reprs")
    _assert_clean(_cache_names_and_contents(cache), "the cache")
    figures.update(auth_paths=9, errors_checked=len(errors), log_records=len(caplog.records),
                   cache_entries=len(_cache_names_and_contents(cache)))


@pytest.mark.timeout(120)
def test_token_never_in_process_arguments_or_cli_output(repo, make_server_process, tmp_path, figures):
    srv = make_server_process(repo, token=SECRET)
    env = {**os.environ, "DAGSHUB_TOKEN": SECRET, "STREAMLOADER_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "streamloader", "--debug", "prefetch", "dagshub://user/repo/data", "--host", srv.url,
           "-j", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshots = 0
    while proc.poll() is None:  # look at every process on the machine while the client runs
        _assert_clean(_all_cmdlines(), "process arguments")
        snapshots += 1
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    _assert_clean([out, err], "CLI output")
    assert "DEBUG" in err  # the debug log really was on
    # the failure path with a rejected token, with --debug tracebacks
    bad = subprocess.run(cmd, env={**env, "DAGSHUB_TOKEN": WRONG}, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "401" in bad.stderr
    _assert_clean([bad.stdout, bad.stderr], "CLI error output")
    login = subprocess.run([sys.executable, "-m", "streamloader", "login", "--token", "-", "--host", srv.url],
                           input=SECRET + "\n", env=env, capture_output=True, text=True, timeout=60)
    assert login.returncode == 0, login.stderr
    _assert_clean([login.stdout, login.stderr], "login output")
    _assert_clean(_all_cmdlines(), "process arguments")
    figures.update(cmdline_snapshots=snapshots, processes=4)


def test_token_is_not_sent_after_a_cross_origin_redirect(repo, make_server, tmp_path, figures):
    srv = make_server(repo, token=SECRET)
    other = make_server(repo)  # same files, another origin, accepts anything: a successful hand-off
    srv.faults.redirect_raw_to = other.url.replace("127.0.0.1", "localhost")
    fs = DagsHubFileSystem(host=srv.url, token=SECRET, cache_dir=str(tmp_path / "cache"), skip_instance_cache=True)
    for i in range(4):
        assert fs.cat_file(f"user/repo/data/{i:04d}.jpg") == (repo / "data" / f"{i:04d}.jpg").read_bytes()
    log = wait_for_log(other, lambda entries: sum(e["kind"] == "raw" for e in entries) >= 4)
    raw = [e for e in log if e["kind"] == "raw"]
    assert len(raw) == 4 and not any(e["has_auth"] for e in raw)  # followed, without the credentials
    redirected = [e for e in srv.request_log if e["fault"] == "redirect"]
    assert len(redirected) == 4 and all(e["has_auth"] for e in redirected)
    figures.update(redirects=len(redirected), auth_headers_after_redirect=0)


def _file_modes(cache: str, path: str) -> Tuple[int, ...]:
    """Finished cache objects are read-only (0400); a download's temp file is 0600 until it is verified, then 0400
    for the instant before it is renamed into objects/ (the off-path commit); every other file is 0600."""
    if path.startswith(os.path.join(cache, "objects") + os.sep):
        return (0o400,)
    if path.startswith(os.path.join(cache, "tmp") + os.sep) and path.endswith(".part"):
        return (0o600, 0o400)
    return (0o600,)


def _check_private_tree(cache: str) -> Dict[str, int]:
    """Assert every directory under ``cache`` is 0700 and every file has one of :func:`_file_modes`; returns counts.
    A temp file renamed into place between the listing and its stat is skipped (it was checked as an object or
    will be)."""
    seen = {"dirs": 0, "files": 0}
    for dirpath, _dirs, files in os.walk(cache):
        mode = stat.S_IMODE(os.stat(dirpath).st_mode)
        assert mode == 0o700, f"{dirpath} is {oct(mode)}"
        seen["dirs"] += 1
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                assert name.endswith(".part"), f"{path} vanished while the cache was idle"
                continue
            assert mode in _file_modes(cache, path), f"{path} is {oct(mode)}"
            seen["files"] += 1
    return seen


def test_cache_is_private_even_under_a_permissive_umask(repo, make_server, tmp_path, figures):
    srv = make_server(repo, token=SECRET)
    cache = str(tmp_path / "deep" / "cache")
    old = os.umask(0)  # the worst case: nothing is masked, every mode is exactly what the code asked for
    try:
        fs = DagsHubFileSystem(host=srv.url, token=SECRET, cache_dir=cache, cache_max_size=10_000_000,
                               skip_instance_cache=True)
        fs.prefetch(fs.find("user/repo"), progress=False)
        with fs.open("user/repo/README.md", "rb") as f:
            f.read()
    finally:
        os.umask(old)
    seen = _check_private_tree(cache)
    assert seen["files"] >= 7  # objects, listings, heads and locks were all looked at
    figures.update(**seen)


def test_feature_cache_under_the_cache_root_is_private_too(tmp_path, make_server):
    from streamloader.data.features import tiny_cnn_extractor
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.synthetic import make_laion_repo

    laion = make_laion_repo(tmp_path / "laion", n_images=4, n_squirrel=1, image_size=(16, 16))
    srv = make_server(laion.root, token=SECRET)
    cache = str(tmp_path / "cache")
    old = os.umask(0)
    try:
        ds = LaionAestheticsDataset("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                                    tiny_cnn_extractor(input_size=16), cache_dir=cache,
                                    storage_options={"host": srv.url, "token": SECRET, "skip_instance_cache": True})
        for i in range(len(ds)):
            ds[i]
    finally:
        os.umask(old)
    assert ds.stats["features_computed"] == 4
    assert _check_private_tree(cache)["files"] >= 4


# --- issue 15.9: what requests/urllib3 raise on hostile answers becomes our typed errors -------------------------


def _hostile_answers(path: str):
    """Canned answers of a hostile server, by the file (or record) a request is for."""
    if "/raw/" in path and path.endswith("/data/0000.jpg"):
        return 200, {"Content-Length": "12abc", "Content-Type": "application/octet-stream"}, b"\xff\xd8" * 6
    if "/raw/" in path and path.endswith("/data/0001.jpg") or path.endswith("/branches/loop"):
        return 302, {"Location": path, "Content-Length": "0"}, b""  # to itself, for ever
    if "/raw/" in path and path.endswith("/data/0002.jpg") or path.endswith("/branches/to-file"):
        return 302, {"Location": "file:///etc/passwd", "Content-Length": "0"}, b""
    if "/raw/" in path and path.endswith("/data/0003.jpg"):
        return 302, {"Location": f"ftp://127.0.0.1:9/{SECRET}/x", "Content-Length": "0"}, b""
    return None


def test_hostile_answers_raise_typed_errors_without_the_token(repo, make_server, caplog, figures):
    from streamloader.errors import RemoteError
    from reliability.hostile import HostileProxy

    srv = make_server(repo, token=SECRET)
    caplog.set_level(logging.DEBUG)
    errors = []
    with HostileProxy(srv.url, intercept=_hostile_answers) as proxy:
        client = DagsHubClient(f"{proxy.url}/user/repo", token=SECRET, branch="main", retry=FAST)
        for name in ("0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg"):  # bad length, loop, file://, ftp://
            with pytest.raises(RemoteError) as excinfo:
                client.read_bytes(f"data/{name}")
            errors.append(excinfo.value)
        for branch in ("loop", "to-file"):  # the same on a JSON lookup (followed by requests itself)
            with pytest.raises(RemoteError) as excinfo:
                DagsHubClient(f"{proxy.url}/user/repo", token=SECRET, branch=branch, retry=FAST).resolve_revision()
            errors.append(excinfo.value)
    assert "Content-Length" in str(errors[0]) and "redirect" in str(errors[1])
    assert all("/etc/passwd" not in str(e) and "ftp:" not in str(e) for e in errors)
    for exc in errors:
        _assert_clean(_messages(exc), type(exc).__name__)
    _assert_clean([caplog.text], "log output")
    figures.update(hostile_answers=len(errors))


@pytest.mark.parametrize("source", ["argument", "DAGSHUB_TOKEN", "dagshub token cache"])
def test_token_with_a_line_break_fails_before_any_request(repo, make_server, monkeypatch, caplog, source):
    from streamloader.auth import login
    from streamloader.errors import InvalidTokenError

    srv = make_server(repo, token=SECRET)
    broken = SECRET[:8] + "\n" + SECRET[8:]
    if source == "DAGSHUB_TOKEN":
        monkeypatch.setenv("DAGSHUB_TOKEN", broken)
    elif source == "dagshub token cache":
        import yaml

        path = os.environ["DAGSHUB_CLIENT_TOKENS_CACHE"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump({"version": "1", srv.url: [{"access_token": broken, "expiry": "never",
                                                       "token_type": "app-token"}]}, f)
    caplog.set_level(logging.DEBUG)
    token = broken if source == "argument" else None
    for call in (lambda: DagsHubClient(srv.repo_url, token=token, retry=FAST).list_dir("data"),
                 lambda: DagsHubFileSystem(host=srv.url, token=token, skip_instance_cache=True).ls("user/repo"),
                 lambda: login(token, srv.url)):
        with pytest.raises(InvalidTokenError, match=f"token from {source} contains a line break") as excinfo:
            call()
        assert isinstance(excinfo.value, ValueError)
        for text in _messages(excinfo.value):
            assert SECRET[:8] not in text and SECRET[8:] not in text
    assert srv.request_count() == 0  # refused before anything was sent
    assert SECRET[8:] not in caplog.text


# --- issue 15.10: a token inside a URL is used as the token, and shown nowhere -----------------------------------


def test_token_in_the_url_is_the_credential_and_never_shown(repo, make_server, caplog, figures):
    from streamloader.errors import AuthenticationError, RemoteError, RevisionNotFoundError

    srv = make_server(repo, token=SECRET)
    caplog.set_level(logging.DEBUG)
    with_secret = srv.url.replace("://", f"://user:{SECRET}@")
    with_wrong = srv.url.replace("://", f"://user:{WRONG}@")
    objects: list = []
    errors: List[BaseException] = []

    client = DagsHubClient(f"{with_secret}/user/repo", retry=FAST)  # no DAGSHUB_TOKEN: the URL's password is it
    assert [e.name for e in client.list_dir("data")][:1] == ["0000.jpg"]
    assert client.ref.host == srv.url
    fs = DagsHubFileSystem(host=with_secret, skip_instance_cache=True)
    assert fs.cat_file("user/repo/README.md") == b"# test repo\n"
    assert SECRET not in str(fs.storage_options.get("host")) and fs.host == srv.url
    by_host = DagsHubClient("user/repo", host=with_secret, retry=FAST)
    assert by_host.read_bytes("README.md") == b"# test repo\n"
    objects += [client, RemoteRepo(client), fs, fs.repo("user", "repo"), by_host, by_host.ref]

    def expect(error_type, call):
        with pytest.raises(error_type) as excinfo:
            call()
        errors.append(excinfo.value)

    expect(AuthenticationError, lambda: DagsHubClient(f"{with_wrong}/user/repo", retry=FAST).list_dir("data"))
    expect(AuthenticationError,
           lambda: DagsHubFileSystem(host=with_wrong, skip_instance_cache=True).ls("user/repo/data"))
    expect(RevisionNotFoundError,
           lambda: DagsHubClient(f"{with_secret}/user/repo", branch="nope", retry=FAST).resolve_revision())
    srv.faults.fail_paths = {"README.md": 503}
    expect(RemoteError, lambda: DagsHubClient(f"{with_secret}/user/repo", retry=FAST).read_bytes("README.md"))
    assert "rejected the token from the password in the URL" in str(errors[0])

    for exc in errors:
        _assert_clean(_messages(exc), type(exc).__name__)
    _assert_clean([repr(o) for o in objects] + [str(o) for o in objects], "reprs")
    _assert_clean([caplog.text], "log output")
    figures.update(url_token_errors=len(errors))


@pytest.mark.parametrize("url, gets_token", [
    ("http://127.0.0.1:9/api/v1/repos/o/r/raw/x", True),
    ("HTTP://127.0.0.1:9/api/v1/x", True),  # scheme and host compare without case, as origins do
    ("http://127.0.0.1:9", True),
    ("http://127.0.0.1:9?q=1", True),
    ("http://127.0.0.1:90/api/v1/x", False),  # a longer port is another origin
    ("http://127.0.0.1:9@evil.example/api/v1/x", False),  # userinfo: the host is evil.example
    ("http://127.0.0.1:9.evil.example/x", False),
    ("https://127.0.0.1:9/api/v1/x", False),  # another scheme is another origin
    ("http://127.0.0.2:9/api/v1/x", False),
])
def test_the_token_header_goes_to_the_api_origin_only(url, gets_token):
    from streamloader.remote.credentials import OriginBearerAuth

    auth = OriginBearerAuth("http://127.0.0.1:9", lambda: "s3cret-token")
    assert auth.headers_for(url) == ({"Authorization": "Bearer s3cret-token"} if gets_token else {})
