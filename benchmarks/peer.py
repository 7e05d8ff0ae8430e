"""An independent DagsHub-like peer for the fetch benchmarks (P15): aiohttp's web server on one event loop.

``streamloader serve`` answers every connection in a thread of its own (the stdlib's ``ThreadingHTTPServer``); on a
2-core machine its ~1 ms of CPU per small file is half of what a cold fetch costs, and the client sides share those
cores with it. This peer is written separately from the library (no ``streamloader`` import), as dagshub.com would
answer a client, on a different stack: an asyncio server, one task per request, ``asyncio.sleep`` for the injected
latency. It knows only what a cold fetch needs, answering as dagshub.com does (see
``../shared/reference/dagshub-api.md``):

* ``GET {base}``, ``{base}/branches[/{branch}]``, ``{base}/commits/{sha}``: the records (one branch, one commit);
* ``GET {base}/content/{rev}/{dir}``: one unpaged JSON array; sizes are 0 unless ``include_size=true``; files under
  ``data/`` are DVC-tracked (``versioning: "dvc"``, ``hash`` the md5 of their bytes), the rest git blobs (sha1);
* ``GET|HEAD {base}/raw/{rev}/{path}``: the bytes (one ``Range: bytes=a-b`` honoured with 206);
* ``/_peer/stats`` (GET: counts and the peak of raw GETs in flight), ``/_peer/reset`` and ``/_peer/settings``
  (POST ``{"latency": s, "nagle": bool}``; while Nagle is on, each request turns it back on for its connection,
  which aiohttp accepted with it off, and that connection keeps it).

Everything but ``/_peer/*`` needs ``Authorization: Bearer <token>`` when a token is set (read from
``STREAMLOADER_PEER_TOKEN``, never from the command line). Run as ``python -m benchmarks.peer ROOT``; the first
line it prints is ``peer at URL pid PID``. :class:`PeerProcess` starts one and talks to its admin endpoints.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import urllib.request
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["PeerProcess", "main"]

TOKEN_ENV = "STREAMLOADER_PEER_TOKEN"
_BANNER = re.compile(r"^peer at (http://\S+) pid (\d+)\s*$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    """The served folder, read into memory once: ``files[path] = (bytes, hash, versioning)`` and each folder's
    children; ``only``: the top-level folders to serve (all of the folder when empty)."""

    def __init__(self, root: str, only: Sequence[str] = ()):
        self.files: Dict[str, Tuple[bytes, str, str]] = {}
        self.dirs: Dict[str, list] = {"": []}
        for folder, subdirs, names in os.walk(root):
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            rel = "" if rel == "." else rel
            if not rel and only:  # (the top level keeps only the folders asked for, and no files)
                subdirs[:] = [sub for sub in subdirs if sub in only]
                names = []
            subdirs.sort()
            for sub in subdirs:
                path = f"{rel}/{sub}" if rel else sub
                self.dirs.setdefault(rel, []).append(path)
                self.dirs.setdefault(path, [])
            for name in sorted(names):
                path = f"{rel}/{name}" if rel else name
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                dvc = path.startswith("data/")
                digest = hashlib.md5(data).hexdigest() if dvc else _git_sha(data)
                self.files[path] = (data, digest, "dvc" if dvc else "git")
                self.dirs.setdefault(rel, []).append(path)
        self.head = hashlib.sha1("\n".join(f"{p} {h}" for p, (_, h, _) in sorted(self.files.items()))
                                 .encode()).hexdigest()


def _app(root: str, owner: str, repo: str, branch: str, token: Optional[str], only: Sequence[str] = ()) -> Any:
    from aiohttp import web

    data = _Repo(root, only)
    state: Dict[str, Any] = {"latency": 0.0, "nagle": False, "in_flight": 0, "peak": 0, "raw_gets": 0,
                             "requests": 0, "not_found": 0}
    base = f"/api/v1/repos/{owner}/{repo}"
    raw_prefix = f"{base}/raw/"
    person = {"id": 1, "login": owner, "full_name": owner, "username": owner, "email": f"{owner}@localhost",
              "avatar_url": ""}
    commit = {"id": data.head, "message": "bench peer snapshot", "url": "", "timestamp": "1970-01-01T00:00:00Z",
              "author": person, "committer": person, "added": None, "removed": None, "modified": None}
    branch_record = {"name": branch, "commit": commit}
    record = {"id": 1, "owner": person, "name": repo, "full_name": f"{owner}/{repo}", "description": "bench peer",
              "private": token is not None, "fork": False, "parent": None, "empty": False, "mirror": False,
              "size": 0, "html_url": "", "ssh_url": None, "clone_url": "", "website": None, "stars_count": 0,
              "forks_count": 0, "watchers_count": 0, "open_issues_count": 0, "default_branch": branch,
              "created_at": "1970-01-01T00:00:00Z", "updated_at": "1970-01-01T00:00:00Z",
              "permissions": {"admin": True, "push": True, "pull": True}}

    def answer(obj: Any, status: int = 200) -> Any:
        return web.Response(body=json.dumps(obj).encode(), status=status, content_type="application/json")

    def row(request: Any, rev: str, path: str, with_size: bool) -> Dict[str, Any]:
        api = f"http://{request.host}{base}"
        if path in data.files:
            body, digest, versioning = data.files[path]
            kind, size = "file", len(body) if with_size else 0
        else:
            kind, size, digest, versioning = "dir", 0, hashlib.sha1(path.encode()).hexdigest(), "git"
        return {"path": path, "type": kind, "size": size, "hash": digest, "versioning": versioning,
                "download_url": f"{api}/raw/{rev}/{path}", "content_url": f"{api}/content/{rev}/{path}"}

    @web.middleware
    async def gate(request: Any, handler: Any) -> Any:
        state["requests"] += 1
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        if state["nagle"] and sock is not None:  # aiohttp sets TCP_NODELAY on every connection it accepts
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        if request.path.startswith("/_peer/"):
            return await handler(request)
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return answer({"message": "unauthorized"}, 401)
        counted = request.method == "GET" and request.path.startswith(raw_prefix)
        if counted:  # a raw GET is in flight from its arrival (latency included) to its answer
            state["raw_gets"] += 1
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
        try:
            if state["latency"] > 0:
                await asyncio.sleep(state["latency"])
            return await handler(request)
        finally:
            if counted:
                state["in_flight"] -= 1

    def check_rev(rev: str) -> None:
        if rev not in (branch, data.head):
            raise web.HTTPNotFound(text=json.dumps({"message": f"revision {rev!r} not found"}),
                                   content_type="application/json")

    async def repo_record(request: Any) -> Any:
        return answer(record)

    async def branches(request: Any) -> Any:
        name = request.match_info.get("name")
        if name is None:
            return answer([branch_record])
        return answer(branch_record) if name == branch else answer({"message": "branch not found"}, 404)

    async def commits(request: Any) -> Any:
        sha = request.match_info["sha"]
        return answer({"commit": commit}) if sha == data.head else answer({"message": "commit not found"}, 404)

    async def content(request: Any) -> Any:
        rev, path = request.match_info["rev"], request.match_info["path"].strip("/")
        check_rev(rev)
        with_size = request.query.get("include_size", "").lower() in ("1", "true")
        if path in data.files:
            return answer(row(request, rev, path, with_size))
        if path not in data.dirs:
            state["not_found"] += 1
            return answer({"message": "not found"}, 404)
        return answer([row(request, rev, child, with_size) for child in data.dirs[path]])

    async def raw(request: Any) -> Any:
        rev, path = request.match_info["rev"], request.match_info["path"]
        check_rev(rev)
        if path not in data.files:
            state["not_found"] += 1
            return answer({"message": "not found"}, 404)
        body = data.files[path][0]
        wanted = _RANGE.match(request.headers.get("Range", ""))
        if wanted is None:
            return web.Response(body=body, content_type="application/octet-stream")
        start = int(wanted.group(1))
        end = min(int(wanted.group(2)) if wanted.group(2) else len(body) - 1, len(body) - 1)
        if start > end:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(body)}"})
        return web.Response(body=body[start:end + 1], status=206, content_type="application/octet-stream",
                            headers={"Content-Range": f"bytes {start}-{end}/{len(body)}"})

    async def stats(request: Any) -> Any:
        return answer({k: state[k] for k in ("requests", "raw_gets", "in_flight", "peak", "not_found", "latency",
                                             "nagle")})

    async def reset(request: Any) -> Any:
        state.update(requests=0, raw_gets=0, peak=0, not_found=0)
        return answer({"ok": True})

    async def settings(request: Any) -> Any:
        values = await request.json()
        if "latency" in values:
            state["latency"] = float(values["latency"])
        if "nagle" in values:
            state["nagle"] = bool(values["nagle"])
        return answer({"latency": state["latency"], "nagle": state["nagle"]})

    app = web.Application(middlewares=[gate])
    app.router.add_get(base, repo_record)
    app.router.add_get(f"{base}/branches", branches)
    app.router.add_get(f"{base}/branches/{{name}}", branches)
    app.router.add_get(f"{base}/commits/{{sha}}", commits)
    app.router.add_get(f"{base}/content/{{rev}}/{{path:.*}}", content)
    app.router.add_get(f"{base}/raw/{{rev}}/{{path:.+}}", raw)  # (add_get also answers HEAD)
    app.router.add_get("/_peer/stats", stats)
    app.router.add_post("/_peer/reset", reset)
    app.router.add_post("/_peer/settings", settings)
    return app


def main(argv: Optional[list] = None) -> int:
    """``python -m benchmarks.peer ROOT [--port P] [--owner O] [--repo R] [--branch B] [--only FOLDER]...``."""
    from aiohttp import web

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--owner", default="user")
    parser.add_argument("--repo", default="repo")
    parser.add_argument("--branch", default="main")
    parser.add_argument("--only", action="append", default=[], help="serve only this top-level folder (repeatable)")
    args = parser.parse_args(argv)
    app = _app(args.root, args.owner, args.repo, args.branch, os.environ.get(TOKEN_ENV) or None, args.only)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"peer at http://127.0.0.1:{port} pid {os.getpid()}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


class PeerProcess:
    """``python -m benchmarks.peer`` in a subprocess; ``with PeerProcess(root, token=t) as peer: peer.repo_url``."""

    def __init__(self, root: str, token: Optional[str] = None, owner: str = "user", repo: str = "repo",
                 branch: str = "main", only: Sequence[str] = (), start_timeout: float = 60.0):
        self.root, self.token, self.owner, self.repo, self.branch = root, token, owner, repo, branch
        self.only = list(only)
        self.start_timeout = start_timeout
        self.url = self.repo_url = ""
        self.pid = 0
        self._proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "PeerProcess":
        env = dict(os.environ)
        env.pop(TOKEN_ENV, None)
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peer", self.root, "--owner", self.owner, "--repo", self.repo,
             "--branch", self.branch, *(f"--only={folder}" for folder in self.only)],
            stdout=subprocess.PIPE, text=True, env=env)
        assert self._proc.stdout is not None
        # the peer prints its banner once it listens (or exits, closing the pipe); never wait longer than this
        ready, _, _ = select.select([self._proc.stdout], [], [], self.start_timeout)
        line = self._proc.stdout.readline() if ready else ""
        found = _BANNER.match(line)
        if found is None:
            self.__exit__()
            raise RuntimeError(f"the bench peer did not start within {self.start_timeout:g} s (said {line!r})")
        self.url, self.pid = found.group(1), int(found.group(2))
        self.repo_url = f"{self.url}/{self.owner}/{self.repo}"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def _call(self, name: str, body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/_peer/{name}", method="GET" if body is None else "POST",
                                         data=None if body is None else json.dumps(body).encode())
        with _OPENER.open(request, timeout=30) as answer:
            return json.loads(answer.read())

    def stats(self) -> Dict[str, Any]:
        """``{"requests", "raw_gets", "in_flight", "peak", "not_found", "latency", "nagle"}``: counts since the last
        reset (``in_flight``: raw GETs now)."""
        return self._call("stats")

    def reset_counts(self) -> None:
        self._call("reset", {})

    def set(self, **settings: Any) -> Dict[str, Any]:
        """Change ``latency`` (seconds) and/or ``nagle`` (on: every connection at its next request; see module)."""
        return self._call("settings", settings)


if __name__ == "__main__":
    raise SystemExit(main())
