"""ServerProcess: run ``python -m streamloader serve`` in a subprocess (for tests that need a separate process,
e.g. DataLoader workers or killing the server), with the same counters/faults API over the admin endpoints.

Example::

    with ServerProcess(repo_dir, token="t0k", faults=ServerFaults(latency=0.01)) as srv:
        ...  # use srv.repo_url
        assert srv.request_count("data/a.jpg", kind="raw") == 1
        srv.set_faults(error_rate=0.5)
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import IO, Any, Dict, List, Optional, Sequence, Union

# the subprocess reads its token from TOKEN_ENV, so it never appears in the process arguments (ps, /proc/*/cmdline)
from streamloader.auth import SERVER_TOKEN_ENV as TOKEN_ENV
from streamloader.errors import StreamloaderError
from streamloader.server.faults import ServerFaults
from streamloader.server.mode import DagsHubLike

log = logging.getLogger(__name__)

__all__ = ["ServerProcess"]

# admin calls go straight to the loopback server, whatever proxy the environment configures
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_BANNER = re.compile(r"^Serving .* at (http://\S+) \(repo URL: (\S+)\)\s*$")


class ServerProcess:
    """A ``streamloader serve`` subprocess on a free port; ``start()`` returns once it answers HTTP."""

    def __init__(
        self,
        root: str,
        owner: str = "user",
        repo: str = "repo",
        branch: str = "main",
        token: Optional[str] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Optional[ServerFaults] = None,
        *,
        extra_args: Sequence[str] = (),
        test_knobs: bool = True,
        start_timeout: float = 60.0,
        env: Optional[Dict[str, str]] = None,
        dagshub_like: Union[None, bool, DagsHubLike] = None,
        anonymous_read: bool = False,
        anonymous_status: int = 401,
        storage: Optional[Dict[str, str]] = None,
    ):
        self.root = str(root)
        self.storage = {str(k): str(v) for k, v in (storage or {}).items()}
        self.owner, self.repo, self.branch, self.token = owner, repo, branch, token
        self.host, self.port = host, int(port)
        self.initial_faults = faults
        if faults is not None and not test_knobs:
            cli_only = {"latency", "error_rate", "throttle_rate", "retry_after", "drop_rate"}
            extra = {k for k, v in faults.to_dict().items() if k not in cli_only and v != ServerFaults().to_dict()[k]}
            if extra:
                raise ValueError(f"fault knobs {sorted(extra)} need test_knobs=True (the admin endpoints)")
        self.dagshub_like = DagsHubLike() if dagshub_like is True else (dagshub_like or None)
        self.anonymous_read, self.anonymous_status = anonymous_read, anonymous_status
        self.extra_args = list(extra_args)
        self.test_knobs = test_knobs
        self.start_timeout = start_timeout
        self.env = env
        self.url = ""
        self.repo_url = ""
        self._proc: Optional[subprocess.Popen] = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def command(self) -> List[str]:
        """The argv used to start the server (contains no token)."""
        cmd = [sys.executable, "-m", "streamloader", "serve", self.root, "--host", self.host,
               "--port", str(self.port), "--owner", self.owner, "--repo", self.repo, "--branch", self.branch]
        if self.test_knobs:
            cmd.append("--test-knobs")
        faults = self.initial_faults
        if faults is not None:
            cmd += ["--latency", str(faults.latency), "--error-rate", str(faults.error_rate),
                    "--throttle-rate", str(faults.throttle_rate), "--retry-after", str(faults.retry_after),
                    "--drop-rate", str(faults.drop_rate)]
        for name, folder in self.storage.items():
            cmd += ["--storage", f"{name}={folder}"]
        if self.anonymous_read:
            cmd.append("--public")
        if self.anonymous_status != 401:
            cmd += ["--anonymous-status", str(self.anonymous_status)]
        if self.dagshub_like is not None:
            cmd.append("--dagshub-like")
            defaults = DagsHubLike().to_dict()
            for name, value in self.dagshub_like.to_dict().items():
                if value != defaults[name]:
                    cmd += ["--dagshub-knob", f"{name}={json.dumps(value)}"]
        return cmd + self.extra_args

    def start(self) -> "ServerProcess":
        """Spawn the server, wait for its banner line and a first HTTP answer; returns self."""
        if self._proc is not None:
            return self
        env = dict(os.environ if self.env is None else self.env)
        env.pop(TOKEN_ENV, None)
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, env=env, text=True)
        try:
            line = self._read_banner(self._proc.stdout)
            match = _BANNER.match(line)
            if not match:
                raise StreamloaderError(f"streamloader serve printed an unexpected first line: {line!r}")
            self.url, self.repo_url = match.group(1), match.group(2)
            self.port = int(self.url.rsplit(":", 1)[1])
            # keep draining stdout so the child can never block on a full pipe
            threading.Thread(target=self._proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            self._wait_until_answering()
            if self.initial_faults is not None and self.test_knobs:
                # the CLI flags cover the rates; the admin endpoint sets the rest (fail_paths, seed, ...)
                self.set_faults(**self.initial_faults.to_dict())
        except BaseException:
            self.stop()
            raise
        return self

    def _read_banner(self, stream: Optional[IO[str]]) -> str:
        result: List[str] = []
        reader = threading.Thread(target=lambda: result.append(stream.readline() if stream else ""), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        if not result or not result[0]:
            code = self._proc.poll() if self._proc else None
            raise StreamloaderError(
                f"streamloader serve did not start within {self.start_timeout:g} s (exit code {code})"
            )
        return result[0]

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        # the admin probe is not counted; without admin endpoints the probe shows up as one "repo" request
        probe = "/_streamloader/counts" if self.test_knobs else f"/api/v1/repos/{self.owner}/{self.repo}"
        while True:
            try:
                with _OPENER.open(f"{self.url}{probe}", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer (401 without a token) means it is serving
            except OSError:
                if time.monotonic() > deadline or (self._proc and self._proc.poll() is not None):
                    raise StreamloaderError(f"streamloader serve at {self.url} never answered") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the subprocess (SIGTERM, then SIGKILL after 10 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("streamloader serve (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def api_url(self) -> str:
        """``{url}/api/v1/repos/{owner}/{repo}``, the base of the repo endpoints."""
        return f"{self.url}/api/v1/repos/{self.owner}/{self.repo}"

    @property
    def pid(self) -> Optional[int]:
        """Process id of the running server (None when stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> Optional[int]:
        """Exit status once it has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- admin endpoints ------------------------------------------------------------------------------------
    def _admin(self, method: str, name: str, payload: Optional[Dict[str, Any]] = None) -> Any:
        if not self.url:
            raise StreamloaderError("ServerProcess is not started")
        data = json.dumps(payload).encode("utf-8") if payload is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(f"{self.url}/_streamloader/{name}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            if exc.code == 400:
                raise ValueError(detail) from None
            raise StreamloaderError(f"admin endpoint {name} answered HTTP {exc.code}: {detail}") from None

    def request_count(self, path: Optional[str] = None, kind: Optional[str] = None) -> int:
        """Like DagsHubServer.request_count, over HTTP."""
        counts: Dict[str, Dict[str, int]] = self._admin("GET", "counts")["counts"]
        kinds = [kind] if kind is not None else list(counts)
        return sum(
            sum(counts.get(k, {}).values()) if path is None else counts.get(k, {}).get(path, 0) for k in kinds
        )

    def get_counts(self, kind: Optional[str] = None) -> Dict[str, int]:
        """Like DagsHubServer.get_counts, over HTTP."""
        total: Dict[str, int] = {}
        for k, per_path in self._admin("GET", "counts")["counts"].items():
            if kind is None or k == kind:
                for path, n in per_path.items():
                    total[path] = total.get(path, 0) + n
        return total

    def reset_counts(self) -> None:
        """Like DagsHubServer.reset_counts, over HTTP."""
        self._admin("POST", "reset")

    @property
    def request_log(self) -> List[Dict[str, Any]]:
        """Like DagsHubServer.request_log, over HTTP."""
        return self._admin("GET", "log")["log"]

    def head_sha(self) -> str:
        """Current commit sha of the served branch."""
        return self._admin("GET", "head")["sha"]

    def get_faults(self) -> ServerFaults:
        """A copy of the subprocess's current fault knobs."""
        return ServerFaults(**self._admin("GET", "faults"))

    def set_faults(self, **knobs: Any) -> None:
        """Set some fault knobs by name (others keep their values). Example: ``srv.set_faults(error_rate=0.2)``."""
        self._admin("POST", "faults", knobs)

    def clear_faults(self) -> None:
        """Restore every fault knob to its default."""
        self._admin("POST", "faults", {"_replace": True})

    def get_dagshub_like(self) -> Optional[DagsHubLike]:
        """A copy of the subprocess's DagsHubLike knobs (None: the mode is off)."""
        knobs = self._admin("GET", "dagshub_like")
        return DagsHubLike(**knobs) if knobs is not None else None

    def set_dagshub_like(self, **knobs: Any) -> None:
        """Set some DagsHubLike knobs (switching the mode on); ``_off=True`` switches it off, ``_replace=True``
        restores the defaults first. Example: ``srv.set_dagshub_like(max_in_flight=4)``."""
        self._admin("POST", "dagshub_like", knobs)
