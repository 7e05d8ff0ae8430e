"""DagsHubLike: knobs that make the local server answer the way dagshub.com really does (not the way our client
would like), so tests and benchmarks can meet dagshub.com's behaviour on loopback.

Pass one to ``DagsHubServer(root, dagshub_like=DagsHubLike(...))`` (``True`` = every default). Like ServerFaults it
is plain data that may be mutated while the server runs (``srv.dagshub_like.max_in_flight = 8``). Every behaviour
is its own knob and every knob defaults to what dagshub.com does::

    DagsHubLike(synthetic={"data": 540_000})     # + 540k generated JPEGs in data/, never written to disk
    DagsHubLike(ignore_range=False, max_in_flight=0, dvc_paths=())   # only some of the differences

Without a DagsHubLike (the default) the server keeps its own, client-friendly answers.
"""
from __future__ import annotations

import email.utils
import fnmatch
import math
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from streamloader.server.repo import RepoPathError, split_repo_path
from streamloader.server.storage import bucket_name_ok
from streamloader.server.synth import MAX_SYNTHETIC, SyntheticFolder

__all__ = ["DagsHubLike"]

_TUPLE_KNOBS = ("storage_buckets", "dvc_paths")
# knobs whose consumed count restarts when they are assigned (deterministic test knobs)
_COUNTED_KNOBS = ("expire_first", "rate_limit_first")


@dataclass
class DagsHubLike:
    """dagshub.com's behaviour, knob by knob (defaults = dagshub.com).

    Listings (``content/{rev}/{path}``):
        ``unpaged_listings``: a repo folder lists as ONE JSON array; ``paging``/``limit``/``from_token`` are ignored.
        ``sizes_need_include_size``: ``size`` is 0 unless the request has ``include_size=true``; such requests cost
        ``size_cost_per_entry`` seconds per listed entry before the answer starts (20 us: 540k entries ~ 11 s).
        ``file_content_object``: ``content`` of a FILE path answers one JSON object for it (not 404).
        ``storage_buckets``: ``"protocol/bucket"`` names of connected buckets, besides those the server serves
        (``DagsHubServer(storage=...)``); each adds a ``type: "storage"``, ``versioning: "bucket"`` entry (path
        ``"s3/bucket"``) to the root listing and a record to ``GET .../storage``, and is an empty bucket unless
        ``storage`` gives it a folder (server/storage.py).
        ``dvc_paths``: fnmatch patterns (``*`` also matches ``/``) of DVC-tracked paths; matching files get
        ``versioning: "dvc"`` and ``hash`` = DVC 2's md5 (md5-dos2unix for text files, see server/dvc.py), matching
        folders ``<md5>.dir``. Default ``("data/*",)``: everything below ``data/`` (as in the LAION-Aesthetics
        repo), while ``data/`` itself and everything outside it stay git-tracked (git blob sha1).
        ``synthetic``: ``{folder: N}`` adds N generated JPEGs ``{folder}/000000000.jpg`` ... (1.1 KB each, PIL
        decodable, all different) to a folder, with no disk space used; real files there are still listed and
        served, and the folder need not exist on disk (see server/synth.py).
    Raw downloads (``raw/{rev}/{path}``):
        ``presign_dvc_raw``: a DVC-tracked file answers ``redirect_status`` (302) to a presigned URL on a second
        loopback origin (another port) that needs no token, answers 403 once ``presigned_ttl`` seconds have passed
        or if the signature is wrong, and (``presigned_rejects_auth``) 400 to a request that carries an
        Authorization header (as S3 does: the bearer token must not follow the redirect). ``expire_first=N``: the
        next N presigned URLs handed out are already expired.
        ``ignore_range``: ``Range`` is ignored on raw and presigned downloads (200, whole body).
    Every request:
        ``max_in_flight``: above this many concurrent requests the server answers 429 (0 = no limit);
        ``rate_limit_first=N``: the next N requests answer 429. 429s carry ``Retry-After`` of ``retry_after``
        seconds, written as an HTTP date (``retry_after_format="date"``) or as seconds (``"seconds"``). Every
        request to the API origin counts, OAuth included; the presigned origin (the "bucket") is not limited.
    """

    unpaged_listings: bool = True
    sizes_need_include_size: bool = True
    size_cost_per_entry: float = 20e-6
    file_content_object: bool = True
    storage_buckets: Tuple[str, ...] = ("s3/streamloader-bucket",)
    dvc_paths: Tuple[str, ...] = ("data/*",)
    synthetic: Dict[str, int] = field(default_factory=dict)
    presign_dvc_raw: bool = True
    redirect_status: int = 302
    presigned_ttl: float = 300.0
    presigned_rejects_auth: bool = True
    expire_first: int = 0
    ignore_range: bool = True
    max_in_flight: int = 64
    rate_limit_first: int = 0
    retry_after: float = 1.0
    retry_after_format: str = "date"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _TUPLE_KNOBS and not isinstance(value, tuple):
            value = (value,) if isinstance(value, str) else tuple(value)
        if name == "synthetic":
            value = {str(k).strip("/"): int(v) for k, v in (value or {}).items()}
        object.__setattr__(self, name, value)
        if name in _COUNTED_KNOBS and "_used" in self.__dict__:
            self._used[name] = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_used", {name: 0 for name in _COUNTED_KNOBS})
        object.__setattr__(self, "_folders", ((), {}))
        self.validate()

    def __getstate__(self) -> Dict[str, Any]:  # knobs only: internal state starts fresh
        return self.to_dict()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self.__post_init__()

    def validate(self) -> None:
        """Raise ValueError if a knob is out of range."""
        for name in ("size_cost_per_entry", "presigned_ttl", "retry_after"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"DagsHubLike.{name} must be >= 0")
        for name in ("expire_first", "max_in_flight", "rate_limit_first"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"DagsHubLike.{name} must be >= 0")
        if self.retry_after_format not in ("date", "seconds"):
            raise ValueError("DagsHubLike.retry_after_format must be 'date' or 'seconds'")
        if self.redirect_status not in (301, 302, 303, 307, 308):
            raise ValueError("DagsHubLike.redirect_status must be a redirect status (301/302/303/307/308)")
        for bucket in self.storage_buckets:
            if not bucket_name_ok(bucket):
                raise ValueError(f"DagsHubLike.storage_buckets entries look like 's3/bucket', got {bucket!r}")
        for folder, count in self.synthetic.items():
            try:
                split_repo_path(folder)
            except RepoPathError as exc:
                raise ValueError(f"DagsHubLike.synthetic folder {folder!r}: {exc.message}") from None
            if not 0 <= count <= MAX_SYNTHETIC:
                raise ValueError(f"DagsHubLike.synthetic counts must be in [0, {MAX_SYNTHETIC}]")

    # -- (de)serialisation for the admin endpoint and the CLI ------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The knobs as JSON-compatible data."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TUPLE_KNOBS:
            out[name] = list(out[name])
        out["synthetic"] = dict(self.synthetic)
        return out

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the given knobs (unknown names raise ValueError); validates, rolling back on error."""
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DagsHubLike knobs {sorted(unknown)}; known: {sorted(known)}")
        before = self.to_dict()
        try:
            for name, value in values.items():
                setattr(self, name, value)
            self.validate()
        except (TypeError, ValueError) as exc:
            for name in values:
                setattr(self, name, before[name])
            raise ValueError(str(exc)) from None

    # -- questions the server asks ----------------------------------------------------------------------------
    def is_dvc(self, repo_path: str) -> bool:
        """Whether a repo path is DVC-tracked (matches one of ``dvc_paths``)."""
        return any(fnmatch.fnmatchcase(repo_path, pattern) for pattern in self.dvc_paths)

    def synthetic_folders(self) -> Dict[str, SyntheticFolder]:
        """``{folder: SyntheticFolder}`` for the current ``synthetic`` knob (rebuilt only when it changes)."""
        key = tuple(sorted(self.synthetic.items()))
        cached_key, folders = self._folders
        if cached_key != key:
            folders = {path: SyntheticFolder(path, count) for path, count in key if count > 0}
            object.__setattr__(self, "_folders", (key, folders))
        return folders

    def take(self, name: str) -> bool:
        """Consume one of ``expire_first`` / ``rate_limit_first``: True while some are left (thread-safe)."""
        with self._lock:
            if self._used[name] < int(getattr(self, name)):
                self._used[name] += 1
                return True
            return False

    def reset_consumed(self) -> None:
        """Re-arm ``expire_first`` and ``rate_limit_first``."""
        with self._lock:
            for name in _COUNTED_KNOBS:
                self._used[name] = 0

    def retry_after_header(self, now: Optional[float] = None) -> str:
        """The Retry-After value of a 429: an HTTP date ``retry_after`` s ahead, or the seconds."""
        seconds = float(self.retry_after)
        if self.retry_after_format == "date":
            # dates have 1 s resolution: round up, so the date is never sooner than ``retry_after`` from now
            moment = math.ceil((time.time() if now is None else now) + seconds)
            return email.utils.formatdate(moment, usegmt=True)
        return str(int(seconds)) if seconds.is_integer() else repr(seconds)
