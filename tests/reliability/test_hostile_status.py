"""Answers no well-behaved server gives, found by an audit against a lying proxy: a raw GET answered with a status
other than 200/206 (its body was kept as the file), a pushback whose Retry-After says 0 (retried ~180 times a
second), hostile listings that escaped as builtin exceptions, a gzip body cut short, a copy cached before its hash
was known, and a server that never answers an event-loop prefetch (held for ~10 minutes)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import TOKEN
from reliability.hostile import HostileProxy
from streamloader.errors import RemoteError
from streamloader.remote.client import DagsHubClient, RetryPolicy

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05, max_time=10, max_throttled_time=3)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    for i in range(4):
        (root / "data" / f"{i}.bin").write_bytes(os.urandom(1024))
    return root


class _Misanswer:
    """``mutate_raw`` for HostileProxy: the first ``times`` raw GETs get ``status`` and a small body instead."""

    def __init__(self, status: int, times: int, headers=None):
        self.status, self.times, self.headers, self.sent = status, times, headers or {}, 0
        self.lock = threading.Lock()

    def __call__(self, path, status, headers, body, wanted_range):
        with self.lock:
            if self.sent >= self.times:
                return status, headers, body
            self.sent += 1
        bogus = b"" if self.status in (204, 304) else b"not the file"
        return self.status, {"Content-Length": str(len(bogus)), **self.headers}, bogus


@pytest.mark.parametrize("status", [201, 203, 204, 300, 302, 304, 307])
def test_only_200_and_206_answers_are_taken_for_a_files_bytes(repo, make_server, tmp_path, status):
    srv = make_server(str(repo), token=TOKEN)
    good = (repo / "data" / "1.bin").read_bytes()
    wrong = _Misanswer(status, times=2)  # (a 3xx without a Location: nothing to follow)
    with HostileProxy(srv.url, mutate_raw=wrong) as proxy:
        client = DagsHubClient(f"{proxy.url}/user/repo", token=TOKEN, branch="main", retry=FAST)
        assert client.read_bytes("data/1.bin") == good  # retried past them
        assert wrong.sent == 2
        always = _Misanswer(status, times=10 ** 6)
        proxy.mutate_raw = always
        with pytest.raises(RemoteError, match=f"HTTP {status}"):
            client.read_bytes("data/2.bin")


def test_a_file_answered_with_204_is_never_cached_through_the_file_system(repo, make_server, tmp_path):
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(str(repo), token=TOKEN)
    good = (repo / "data" / "3.bin").read_bytes()
    with HostileProxy(srv.url, mutate_raw=_Misanswer(204, times=10 ** 6)) as proxy:
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=str(tmp_path / "cache"),
                               skip_instance_cache=True, retry=FAST)
        result = fs.prefetch(["user/repo/data/3.bin"], progress=False, on_error="skip")  # the loop, then warm()
        assert list(result.failed) == ["data/3.bin"] and result.downloaded == 0
        with pytest.raises(RemoteError):
            fs.cat_file("user/repo/data/3.bin")
        proxy.mutate_raw = None  # the server heals: the real bytes, nothing bogus kept
        assert fs.cat_file("user/repo/data/3.bin") == good


@pytest.mark.parametrize("retry_after", ["0", "-5", "Thu, 01 Jan 1970 00:00:00 GMT"])
def test_a_pushback_saying_wait_no_time_is_retried_with_backoff_not_at_once(repo, make_server, retry_after):
    srv = make_server(str(repo), token=TOKEN)
    refuse = _Misanswer(429, times=10 ** 6, headers={"Retry-After": retry_after})
    with HostileProxy(srv.url, mutate_raw=refuse) as proxy:
        policy = RetryPolicy(initial_backoff=0.05, max_backoff=1.0, max_throttled_time=2.0)
        client = DagsHubClient(f"{proxy.url}/user/repo", token=TOKEN, branch="main", retry=policy)
        started = time.monotonic()
        with pytest.raises(RemoteError, match="429"):
            client.read_bytes("data/0.bin")
        seconds = time.monotonic() - started
    # backoff 0.05, 0.1, 0.2 ... 1 s (jittered): ~6-10 requests in the 2 s budget; at once it was ~360
    assert refuse.sent <= 20 and seconds < 30, (refuse.sent, seconds)  # (the count is the point; the time is loose)


def _listing_of_data(body: bytes):
    def mutate(path, original):
        return body if "/content/" in path and path.rstrip("/").endswith("/data") else original
    return mutate


@pytest.mark.parametrize("body, says", [
    (b'[{"path": "data/\xff.bin", "type": "file", "size": 3}]', "not UTF-8"),
    (b"[" + b"[" * 200_000 + b"]" * 200_000 + b"]", "nested too deeply"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
])
def test_a_listing_no_json_parser_takes_is_a_remote_error_not_a_builtin_one(repo, make_server, tmp_path, body, says):
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(str(repo), token=TOKEN)
    with HostileProxy(srv.url, _listing_of_data(body)) as proxy:
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=str(tmp_path / "cache"),
                               skip_instance_cache=True, retry=FAST)
        with pytest.raises(RemoteError, match=says):  # (a UnicodeDecodeError, a ValueError, was "missing" to exists)
            fs.ls("user/repo/data")


def test_a_listed_size_past_any_integer_is_skipped_not_a_failure_of_every_ls(repo, make_server, tmp_path):
    import json

    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(str(repo), token=TOKEN)
    good = json.dumps([{"path": "data/0.bin", "name": "0.bin", "type": "file", "size": 1024},
                       {"path": "data/huge.bin", "name": "huge.bin", "type": "file", "size": 2 ** 63}]).encode()
    with HostileProxy(srv.url, _listing_of_data(good)) as proxy:
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=str(tmp_path / "cache"),
                               skip_instance_cache=True, retry=FAST)
        for _ in range(2):  # (the first ls stores it, the second reads the store)
            assert [e["name"] for e in fs.ls("user/repo/data")] == ["user/repo/data/0.bin"]


def test_a_redirect_to_a_malformed_url_is_a_remote_error(repo, make_server):
    srv = make_server(str(repo), token=TOKEN)

    def intercept(path):
        if "/raw/" in path:
            return 302, {"Location": "http://[::1", "Content-Length": "0"}, b""
        return None

    with HostileProxy(srv.url, intercept=intercept) as proxy:
        client = DagsHubClient(f"{proxy.url}/user/repo", token=TOKEN, branch="main", retry=FAST)
        with pytest.raises(RemoteError, match="malformed URL"):
            client.read_bytes("data/0.bin")


def _compressing(how: str):
    import gzip
    import zlib

    def mutate(path, status, headers, body, wanted_range):
        if status != 200:
            return status, headers, body
        if how == "gzip cut short":  # the trailer (CRC and length) and a little more left out
            body, encoding = gzip.compress(body)[:-20], "gzip"
        elif how == "gzip":
            body, encoding = gzip.compress(body), "gzip"
        elif how == "deflate":
            body, encoding = zlib.compress(body), "deflate"
        else:  # raw deflate, no zlib header (what some servers send as "deflate")
            packer = zlib.compressobj(wbits=-15)
            body, encoding = packer.compress(body) + packer.flush(), "deflate"
        return status, {**headers, "Content-Encoding": encoding, "Content-Length": str(len(body))}, body
    return mutate


@pytest.mark.parametrize("how", ["gzip", "deflate", "raw deflate", "gzip cut short"])
def test_a_compressed_file_is_decoded_whole_or_not_at_all(repo, make_server, tmp_path, how):
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(str(repo), token=TOKEN)
    good = (repo / "data" / "2.bin").read_bytes()
    with HostileProxy(srv.url, mutate_raw=_compressing(how)) as proxy:
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=str(tmp_path / "cache"),
                               skip_instance_cache=True, retry=FAST)
        if how != "gzip cut short":
            assert fs.cat_file("user/repo/data/2.bin") == good  # (read before any listing: no size to check)
            return
        with pytest.raises(RemoteError, match="ends before its compressed stream"):
            fs.cat_file("user/repo/data/2.bin")  # (urllib3 took the missing end for the end: 1004 of 1024 bytes)
        proxy.mutate_raw = None
        assert fs.cat_file("user/repo/data/2.bin") == good  # nothing short was kept


@pytest.mark.parametrize("read", ["cat_file", "open", "prefetch"])
def test_a_copy_stored_before_its_hash_was_known_is_checked_against_it_once_it_is(repo, make_server, tmp_path,
                                                                                  read):
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(str(repo), token=TOKEN)
    good = (repo / "data" / "0.bin").read_bytes()
    lies = {"on": True}

    def corrupt(path, status, headers, body, wanted_range):
        if lies["on"] and status == 200:
            body = bytes(b ^ 0xFF for b in body)  # the same size: only the hash can tell
        return status, headers, body

    with HostileProxy(srv.url, mutate_raw=corrupt) as proxy:
        cache_dir = str(tmp_path / "cache")
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=cache_dir, skip_instance_cache=True, retry=FAST)
        assert fs.cat_file("user/repo/data/0.bin") != good  # nothing listed yet: nothing to check it against
        lies["on"] = False
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=cache_dir, skip_instance_cache=True, retry=FAST)
        assert fs.ls("user/repo/data")[0]["hash"]  # now its git hash is known
        before = sum("/raw/" in p for p in proxy.paths)
        if read == "prefetch":
            fs.prefetch(["user/repo/data/0.bin"], progress=False)
            got = fs.cat_file("user/repo/data/0.bin")
        elif read == "open":
            with fs.open("user/repo/data/0.bin") as f:
                got = f.read()
        else:
            got = fs.cat_file("user/repo/data/0.bin")
        assert got == good
        assert sum("/raw/" in p for p in proxy.paths) == before + 1  # the bad copy dropped, downloaded again


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stall", ["silent", "drip"])
def test_an_event_loop_prefetch_gives_up_on_a_silent_or_dripping_server_within_its_read_timeout(repo, make_server,
                                                                                                 tmp_path, stall):
    from streamloader.remote.filesystem import DagsHubFileSystem

    srv = make_server(str(repo), token=TOKEN)
    stop = threading.Event()

    def dripping(wfile):
        for _ in range(30):
            if stop.wait(0.5):
                return
            wfile.write(b"x")
            wfile.flush()

    def intercept(path):
        if "/raw/" not in path:
            return None
        if stall == "silent":
            stop.wait(30)  # accepted, the request read, never answered
            return 500, {}, b""
        return 200, {"Content-Length": "100000"}, dripping  # a byte every half second

    with HostileProxy(srv.url, intercept=intercept) as proxy:
        policy = RetryPolicy(attempts=1, read_timeout=1.0, connect_timeout=1.0, min_rate=64 * 1024, max_time=5)
        fs = DagsHubFileSystem(host=proxy.url, token=TOKEN, cache_dir=str(tmp_path / "cache"),
                               skip_instance_cache=True, retry=policy)
        fs.repo("user", "repo").revision()
        started = time.monotonic()
        result = fs.prefetch(["user/repo/data/1.bin"], progress=False, on_error="skip", processes=1)
        seconds = time.monotonic() - started
        stop.set()
    assert list(result.failed) == ["data/1.bin"]
    # the loop's try and the thread path's (attempts=1) each give up after ~1 s; it was connect + read + 16 MiB at
    # the floor rate (~260 s here, ~10 minutes with the default policy)
    assert seconds < 10, seconds


@pytest.mark.timeout(60)
def test_a_json_request_whose_answer_drips_its_head_gives_up_within_the_read_timeout():
    import socket

    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 100:  # a byte every 0.2 s
                if stop.wait(0.2):
                    break
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    break
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        policy = RetryPolicy(attempts=2, read_timeout=1.0, connect_timeout=1.0, initial_backoff=0.01, max_time=10)
        client = DagsHubClient(f"http://127.0.0.1:{port}/user/repo", token=TOKEN, branch="main", retry=policy)
        started = time.monotonic()
        with pytest.raises(RemoteError):
            client.resolve_revision()  # (each byte came well within the read timeout: it waited for ever)
        assert time.monotonic() - started < 6
    finally:
        stop.set()
        thread.join(5)
        listener.close()
