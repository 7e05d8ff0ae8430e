"""Connected storage buckets of the local server, served under the same API paths as dagshub.com serves them.

``DagsHubServer(root, storage={"s3/my-bucket": DIR})`` (CLI: ``--storage s3/my-bucket=DIR``) serves DIR as the bucket
``my-bucket`` of protocol ``s3``; with the dagshub-like mode on, every name in its ``storage_buckets`` knob is
connected too (an empty bucket unless ``storage`` gives it a folder). Every connected bucket is in ``GET .../storage``
and, as a ``type: "storage"`` entry, in the root listing; the official client mounts it at
``.dagshub/storage/<protocol>/<bucket>``. Routes (``{base}`` = ``/api/v1/repos/{owner}/{repo}``)::

    GET {base}/storage                                   [{"name", "protocol", "list_path"}, ...]
    GET {base}/storage/content/{proto}/{bucket}/{path}   {"entries": [...], "next_token": "100" | null}
        pages of 100 (``limit`` to change it; ``from_token`` = the previous page's token); always paged, with or
        without ``paging=true``. Entries: ``path`` "proto/bucket/key", real ``size``, ``hash`` = the md5 of the
        content (what S3 gives as a single-part object's ETag), ``versioning: "bucket"``. A file path answers that
        file's own entry (one object, as the repo content API does).
    GET|HEAD {base}/storage/raw/{proto}/{bucket}/{path}  the bytes (``Range`` honoured unless the dagshub-like mode
        ignores it), with the md5 as ETag

ServerFaults ``storage_token_repeats`` makes every page answer the same ``next_token`` (a server bug a client must
survive without looping forever).
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote

from streamloader.server.blobs import Blob, send_blob
from streamloader.server.repo import RepoEntry, RepoFolder, split_repo_path
from streamloader.server.routes import HTTPError, Route

if TYPE_CHECKING:  # pragma: no cover
    from streamloader.server.app import DagsHubServer

__all__ = ["ServedBuckets", "bucket_name_ok", "records", "root_row", "serve"]

DEFAULT_PAGE = 100
_MAX_PAGE = 10_000
_HASH_CHUNK = 1 << 20


def bucket_name_ok(name: str) -> bool:
    """``"s3/my-bucket"``: a protocol and a bucket name, each one plain path segment."""
    protocol, _, bucket = str(name).partition("/")
    return all(part and part not in (".", "..") and "/" not in part and "\\" not in part and "\x00" not in part
               for part in (protocol, bucket))


class ServedBuckets:
    """The buckets served from local folders (``{"s3/bucket": DIR}``), with the objects' md5 cached by stat."""

    def __init__(self, storage: Optional[Mapping[str, str]] = None):
        self.folders: Dict[str, RepoFolder] = {}
        for name, folder in (storage or {}).items():
            if not bucket_name_ok(name):
                raise ValueError(f"storage buckets are named like 's3/my-bucket', got {name!r}")
            self.folders[str(name)] = RepoFolder(str(folder))
        self._lock = threading.Lock()
        self._md5: Dict[str, Tuple[Tuple[int, int, int, int], str]] = {}

    def names(self, app: "DagsHubServer") -> List[str]:
        """Every connected bucket: the served ones, then the dagshub-like mode's ``storage_buckets``."""
        names = list(self.folders)
        mode = app.dagshub_like
        for name in (mode.storage_buckets if mode is not None else ()):
            if name not in names:
                names.append(name)
        return names

    def md5(self, real: str, st: os.stat_result) -> str:
        """The md5 of a file's content, cached by (size, mtime_ns, ctime_ns, inode)."""
        signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self._md5.get(real)
        if cached is not None and cached[0] == signature:
            return cached[1]
        digest = hashlib.md5()
        with open(real, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        with self._lock:
            self._md5[real] = (signature, digest.hexdigest())
        return digest.hexdigest()


def _api(handler: Any) -> str:
    app = handler.app
    return f"{handler._base_url()}/api/v1/repos/{quote(app.owner)}/{quote(app.repo)}/storage"


def records(handler: Any) -> List[Dict[str, str]]:
    """``GET storage``: one record per connected bucket."""
    api = _api(handler)
    out = []
    for name in handler.app.buckets.names(handler.app):
        protocol, _, bucket = name.partition("/")
        out.append({"name": bucket, "protocol": protocol, "list_path": f"{api}/content/{quote(name)}"})
    return out


def root_row(handler: Any, name: str) -> Dict[str, Any]:
    """The root listing's entry for a connected bucket (which the official client skips)."""
    api = _api(handler)
    return {"path": name, "type": "storage", "size": 0, "hash": "", "versioning": "bucket",
            "download_url": f"{api}/raw/{quote(name)}", "content_url": f"{api}/content/{quote(name)}"}


def _entry_json(handler: Any, entry: RepoEntry) -> Dict[str, Any]:
    api, path = _api(handler), quote(entry.path, safe="/")
    return {"path": entry.path, "type": entry.type, "size": entry.size, "hash": entry.hash,
            "versioning": "bucket", "download_url": f"{api}/raw/{path}", "content_url": f"{api}/content/{path}"}


def _locate(handler: Any, key: str) -> Tuple[str, Optional[RepoFolder], str]:
    """(bucket name, its folder or None for an empty bucket, the path inside it); 404 for an unknown bucket."""
    segments = split_repo_path(key)
    if len(segments) < 2:
        raise HTTPError(404, "expected storage/{content|raw}/{protocol}/{bucket}/{path}")
    name = "/".join(segments[:2])
    app = handler.app
    if name not in app.buckets.names(app):
        raise HTTPError(404, f"no storage bucket {name!r} is connected to this repository")
    return name, app.buckets.folders.get(name), "/".join(segments[2:])


def serve(handler: Any, route: Route, query: Dict[str, List[str]]) -> None:
    """``GET storage/content/...`` or ``GET|HEAD storage/raw/...`` (``route.key`` is ``content/...``/``raw/...``)."""
    action, _, key = route.key.partition("/")
    name, folder, inner = _locate(handler, key)
    if action == "raw":
        _raw(handler, name, folder, inner)
    elif action == "content":
        _content(handler, name, folder, inner, query)
    else:
        raise HTTPError(404, "not found")


def _raw(handler: Any, name: str, folder: Optional[RepoFolder], inner: str) -> None:
    if folder is None or not inner:
        raise HTTPError(404, "NoSuchKey")
    real = folder.resolve(inner)
    if os.path.isdir(real):
        raise HTTPError(404, "NoSuchKey")
    mode = handler.app.dagshub_like
    with Blob.open(real) as blob:
        st = os.fstat(blob.fh.fileno())  # type: ignore[union-attr]
        etag = handler.app.buckets.md5(real, st)
        send_blob(handler, blob, honour_range=not (mode is not None and mode.ignore_range),
                  headers={"ETag": f'"{etag}"'})


def _content(handler: Any, name: str, folder: Optional[RepoFolder], inner: str,
             query: Dict[str, List[str]]) -> None:
    app = handler.app
    prefix = f"{name}/{inner}" if inner else name
    if folder is None:
        if inner:
            raise HTTPError(404, "not found")
        entries: List[RepoEntry] = []
    else:
        real = folder.resolve(inner)
        if not os.path.isdir(real):
            st = os.stat(real)
            handler._send_json(200, _entry_json(handler, RepoEntry(prefix, "file", st.st_size,
                                                                   app.buckets.md5(real, st))))
            return
        listed = folder.list_dir(inner, lambda path, real_path, st: (app.buckets.md5(real_path, st), "bucket"))
        entries = [RepoEntry(f"{name}/{e.path}", e.type, e.size, e.hash if e.type == "file" else "")
                   for e in listed]
    try:
        limit = int(query.get("limit", [DEFAULT_PAGE])[-1])
        start = int(query.get("from_token", ["0"])[-1] or 0)
    except ValueError:
        raise HTTPError(400, "limit and from_token must be integers") from None
    if not 0 < limit <= _MAX_PAGE or start < 0:
        raise HTTPError(400, f"limit must be in [1, {_MAX_PAGE}] and from_token >= 0")
    page = entries[start:start + limit]
    more = start + limit < len(entries)
    if app.faults.storage_token_repeats and more:
        next_token: Optional[str] = str(limit)  # every page names the second one again
    else:
        next_token = str(start + limit) if more else None
    handler._send_json(200, {"entries": [_entry_json(handler, e) for e in page], "next_token": next_token})
