"""DagsHubServer: a local folder served over HTTP as a DagsHub repository, in a background thread.

Example::

    with DagsHubServer("/tmp/repo", token="t0k") as srv:
        requests.get(f"{srv.url}/api/v1/repos/user/repo/raw/main/data/labels.tsv",
                     headers={"Authorization": "Bearer t0k"}).content
        srv.faults.error_rate = 0.3          # knobs are live
        srv.request_count("data/labels.tsv", kind="raw")

    # answer like dagshub.com (server/mode.py), as a public repo with 540k synthetic images in data/
    DagsHubServer(root, token="t0k", anonymous_read=True, dagshub_like=DagsHubLike(synthetic={"data": 540_000}))
"""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import threading
from collections import Counter, deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple, Union

from streamloader.server.faults import KINDS, ServerFaults
from streamloader.server.handler import DagsHubRequestHandler
from streamloader.server.httpd import LoopbackHTTPServer
from streamloader.server.mode import DagsHubLike
from streamloader.server.oauth import OAuthBroker
from streamloader.server.presigned import PresignedOrigin
from streamloader.server.repo import RepoFolder
from streamloader.server.storage import ServedBuckets

log = logging.getLogger(__name__)

__all__ = ["DagsHubServer"]

# request_log keeps the newest entries only, so a long benchmark cannot grow memory without bound
_MAX_LOG = 200_000
# the request kinds that read the repository (what anonymous_read opens, what anonymous_status answers)
_REPO_KINDS = frozenset({"repo", "branches", "commits", "content", "raw", "storage"})


class DagsHubServer:
    """Serve ``root`` as ``{owner}/{repo}`` on branch ``branch`` (see module docstring for an example).

    ``token=None`` accepts any (or no) credentials; otherwise every API request needs ``Bearer <token>`` (or Basic
    with the token as password) and a wrong token always gets 401. ``anonymous_read=True`` makes the repo public:
    reads without an Authorization header are allowed (the repo record says ``"private": false``); a private repo
    answers them ``anonymous_status`` (401, or 404 as dagshub.com does). ``dagshub_like`` (a DagsHubLike, or True
    for every default) makes the server answer like dagshub.com (server/mode.py). ``test_knobs`` enables the
    unauthenticated ``/_streamloader/`` admin endpoints; ``oauth_wait`` bounds how long ``/login/oauth/middleman``
    waits for approval. ``storage`` (``{"s3/my-bucket": DIR}``) serves folders as connected storage buckets
    (server/storage.py).
    """

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
        test_knobs: bool = True,
        oauth_wait: float = 30.0,
        dagshub_like: Union[None, bool, DagsHubLike] = None,
        anonymous_read: bool = False,
        anonymous_status: int = 401,
        storage: Optional[Mapping[str, str]] = None,
    ):
        self.folder = RepoFolder(str(root))
        self.buckets = ServedBuckets(storage)
        self.owner, self.repo, self.branch = owner, repo, branch
        self.token = token
        self.host, self.port = host, int(port)
        self.test_knobs = test_knobs
        if anonymous_status not in (401, 404):
            raise ValueError("anonymous_status must be 401 or 404")
        self.anonymous_read, self.anonymous_status = bool(anonymous_read), int(anonymous_status)
        self._faults = faults if faults is not None else ServerFaults()
        self._dagshub_like: Optional[DagsHubLike] = None
        self.dagshub_like = dagshub_like  # type: ignore[assignment]
        self.presigned = PresignedOrigin(self, host)
        self._in_flight = 0
        self.folder.extra_signature = self._synthetic_signature
        # OAuth hands out the configured token; without one, any token works, so a generated one will do
        self.oauth = OAuthBroker(token or f"sl-oauth-{secrets.token_hex(12)}", oauth_wait)
        self._stats_lock = threading.Lock()
        self._counts: Dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self._kind_in_flight: Counter = Counter()  # requests being handled, per kind (the request log's in_flight)
        self._log: Deque[Dict[str, Any]] = deque(maxlen=_MAX_LOG)
        self._httpd: Optional[LoopbackHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "DagsHubServer":
        """Bind and serve in a daemon thread; returns self. Example: ``srv = DagsHubServer(d).start()``."""
        if self._httpd is not None:
            return self
        self._httpd = LoopbackHTTPServer((self.host, self.port), self, DagsHubRequestHandler)
        self.port = int(self._httpd.server_address[1])
        if self._dagshub_like is not None and self._dagshub_like.presign_dvc_raw:
            self.presigned.start()  # otherwise it starts on the first presigned URL handed out
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name=f"dagshub-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.debug("serving %s as %s/%s at %s", self.folder.root, self.owner, self.repo, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            self.presigned.stop()
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        self.presigned.stop()  # after the API origin, so no request left can start it again
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "DagsHubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def repo_url(self) -> str:
        """``{url}/{owner}/{repo}``, the form the official client's ``repo_url=`` takes."""
        return f"{self.url}/{self.owner}/{self.repo}"

    @property
    def api_url(self) -> str:
        """``{url}/api/v1/repos/{owner}/{repo}``, the base of the repo endpoints."""
        return f"{self.url}/api/v1/repos/{self.owner}/{self.repo}"

    # -- faults ---------------------------------------------------------------------------------------------
    @property
    def faults(self) -> ServerFaults:
        """The live fault knobs; mutate them or assign a new ServerFaults at any time."""
        return self._faults

    @faults.setter
    def faults(self, value: ServerFaults) -> None:
        self._faults = value

    def update_faults(self, values: Mapping[str, Any]) -> None:
        """Set some knobs by name (``{"_replace": True}`` first restores every default); ValueError if invalid."""
        values = dict(values)
        if values.pop("_replace", False):
            fresh = ServerFaults()
            fresh.update(values)
            self._faults = fresh
        else:
            self._faults.update(values)

    # -- dagshub-like mode ------------------------------------------------------------------------------------
    @property
    def dagshub_like(self) -> Optional[DagsHubLike]:
        """The live DagsHubLike knobs (None: the server's own answers); assign one (or True/None) at any time."""
        return self._dagshub_like

    @dagshub_like.setter
    def dagshub_like(self, value: Union[None, bool, DagsHubLike]) -> None:
        if value is True:
            value = DagsHubLike()
        elif value is False:
            value = None
        if value is not None and not isinstance(value, DagsHubLike):
            raise TypeError("dagshub_like must be a DagsHubLike, True or None")
        self._dagshub_like = value

    def update_dagshub_like(self, values: Mapping[str, Any]) -> None:
        """Set some DagsHubLike knobs by name, switching the mode on if it was off. ``{"_replace": True}`` first
        restores every default, ``{"_off": True}`` switches the mode off; ValueError if invalid."""
        values = dict(values)
        if values.pop("_off", False):
            self._dagshub_like = None
            return
        if values.pop("_replace", False) or self._dagshub_like is None:
            fresh = DagsHubLike()
            fresh.update(values)
            self._dagshub_like = fresh
        else:
            self._dagshub_like.update(values)

    @property
    def presigned_origin(self) -> str:
        """``http://HOST:PORT`` of the presigned-download origin ("" until it started)."""
        return self.presigned.url

    def presigned_url(self, repo_path: str, host: Optional[str] = None) -> str:
        """A presigned URL for a file (already expired while ``expire_first`` lasts); starts the origin. ``host``:
        the host name to put in it (default: the address the server binds)."""
        mode = self._dagshub_like or DagsHubLike()
        return self.presigned.sign(repo_path, float(mode.presigned_ttl), expired=mode.take("expire_first"), host=host)

    def _synthetic_signature(self) -> str:
        mode = self._dagshub_like
        return repr(sorted(mode.synthetic.items())) if mode is not None and mode.synthetic else ""

    def _admit(self) -> Tuple[bool, Optional[str]]:
        """Count a request in flight (dagshub-like mode only): (counted, Retry-After if it must answer 429)."""
        mode = self._dagshub_like
        if mode is None:
            return False, None
        with self._stats_lock:
            self._in_flight += 1
            in_flight = self._in_flight
        if (mode.max_in_flight and in_flight > mode.max_in_flight) or mode.take("rate_limit_first"):
            return True, mode.retry_after_header()
        return True, None

    def _release(self) -> None:
        with self._stats_lock:
            self._in_flight -= 1

    # -- state ----------------------------------------------------------------------------------------------
    def head_sha(self) -> str:
        """Current commit sha of the branch (derived from the folder's state)."""
        return self.folder.head_sha()

    def access_denied(self, kind: str, header: Optional[str]) -> Optional[int]:
        """None if a request of ``kind`` with this Authorization header may proceed, else the status (401/404)."""
        if self.token is None:
            return None
        if header is not None:
            return None if self.authorized(header) else 401
        if kind in _REPO_KINDS:
            return None if self.anonymous_read else self.anonymous_status
        return 401

    def authorized(self, header: Optional[str]) -> bool:
        """Whether an Authorization header value carries the server token (always True without a token)."""
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() == "basic":
            try:
                credential = base64.b64decode(credential, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() not in ("bearer", "token"):
            return False
        return hmac.compare_digest(credential.encode("utf-8"), self.token.encode("utf-8"))

    # -- counters -------------------------------------------------------------------------------------------
    def _record_arrival(self, kind: str, key: str) -> None:
        with self._stats_lock:
            self._counts[kind][key] += 1

    def _enter(self, kind: str) -> int:
        """A request of ``kind`` arrived: the number in flight now, itself included (see ``_leave``)."""
        with self._stats_lock:
            self._kind_in_flight[kind] += 1
            return self._kind_in_flight[kind]

    def _leave(self, kind: str) -> None:
        with self._stats_lock:
            self._kind_in_flight[kind] -= 1

    def _record_done(self, entry: Dict[str, Any]) -> None:
        with self._stats_lock:
            self._log.append(entry)

    def request_count(self, path: Optional[str] = None, kind: Optional[str] = None) -> int:
        """Requests received (faulted and rejected ones included) for a repo path and/or kind; None = any."""
        with self._stats_lock:
            kinds = [kind] if kind is not None else list(self._counts)
            return sum(
                sum(self._counts[k].values()) if path is None else self._counts[k].get(path, 0)
                for k in kinds
                if k in self._counts
            )

    def get_counts(self, kind: Optional[str] = None) -> Dict[str, int]:
        """``{repo_path: count}`` for one kind (None: summed over kinds)."""
        with self._stats_lock:
            total: Counter = Counter()
            for k, counter in self._counts.items():
                if kind is None or k == kind:
                    total.update(counter)
            return dict(total)

    def all_counts(self) -> Dict[str, Dict[str, int]]:
        """``{kind: {key: count}}`` for every kind that saw a request."""
        with self._stats_lock:
            return {k: dict(c) for k, c in self._counts.items() if c}

    def reset_counts(self) -> None:
        """Zero the counters, clear the request log and re-arm ``fail_first`` (and DagsHubLike's ``*_first``)."""
        with self._stats_lock:
            for counter in self._counts.values():
                counter.clear()
            self._log.clear()
        self._faults.reset_consumed()
        if self._dagshub_like is not None:
            self._dagshub_like.reset_consumed()

    @property
    def request_log(self) -> List[Dict[str, Any]]:
        """A copy of the log, one dict per finished request: ``method, kind, path, status, range, has_auth, auth,
        query, fault, in_flight, started`` (``fault``: None or "fail_path"/"fail_first"/"error"/"throttle"/"drop"/
        "drip"/"redirect"/"rate_limit"; ``in_flight``: requests of its kind in flight when it arrived, itself
        included; ``started``: its time.monotonic() at arrival); kind "presigned" entries are requests to the
        presigned origin."""
        with self._stats_lock:
            return [dict(e) for e in self._log]
