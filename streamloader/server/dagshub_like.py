"""Answers of the dagshub-like mode (server/mode.py): listings, file records, raw downloads and bucket records as
dagshub.com gives them. Functions take the request handler; the default mode never comes here.

Big listings (a synthetic folder of 540k entries is ~170 MB of JSON) are produced entry by entry and written with
chunked transfer encoding, so the first bytes leave within milliseconds and the server never holds the whole
answer; listings under 1 MB are sent with a Content-Length.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from itertools import islice
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from streamloader.server import payloads, storage
from streamloader.server.blobs import Blob, send_blob
from streamloader.server.httpd import send_head
from streamloader.server.repo import RepoEntry, RepoPathError, split_repo_path
from streamloader.server.routes import HTTPError, Route, page_bounds
from streamloader.server.synth import SyntheticFolder

if TYPE_CHECKING:  # pragma: no cover
    from streamloader.server.app import DagsHubServer
    from streamloader.server.mode import DagsHubLike

__all__ = ["serve_content", "serve_raw", "open_blob"]

_JSON = "application/json; charset=utf-8"
_CHUNK_CHARS = 1 << 20
_HASH_SLOT = "@@streamloader-hash@@"


def _truthy(query: Dict[str, List[str]], name: str) -> bool:
    return query.get(name, [""])[-1].lower() in ("1", "true", "yes")


def _mode(app: "DagsHubServer") -> "DagsHubLike":
    mode = app.dagshub_like
    if mode is None:  # switched off while the request was on its way
        raise HTTPError(503, "dagshub-like mode was switched off")
    return mode


def _synthetic(mode: "DagsHubLike", repo_path: str) -> Optional[Tuple[SyntheticFolder, int]]:
    parent, _, name = repo_path.rpartition("/")
    folder = mode.synthetic_folders().get(parent)
    index = folder.index(name) if folder is not None else None
    return (folder, index) if folder is not None and index is not None else None


def _is_virtual_dir(mode: "DagsHubLike", repo_path: str) -> bool:
    return any(f == repo_path or f.startswith(repo_path + "/") for f in mode.synthetic_folders())


def _locate(app: "DagsHubServer", mode: "DagsHubLike", repo_path: str) -> Tuple[Optional[str], Any]:
    """``(real_path, None)``, ``(None, (folder, index))`` for a synthetic file, ``(None, None)`` for a folder that
    exists only because synthetic files live below it; RepoPathError 404 if nothing is there."""
    clean = "/".join(split_repo_path(repo_path))
    try:
        return app.folder.resolve(clean), None
    except RepoPathError as exc:
        if exc.status != 404:
            raise
        found = _synthetic(mode, clean)
        if found is not None:
            return None, found
        if _is_virtual_dir(mode, clean):
            return None, None
        raise


def open_blob(app: "DagsHubServer", repo_path: str) -> Blob:
    """The bytes of a file, real or synthetic; HTTPError 404 if it is missing or a folder."""
    mode = app.dagshub_like
    try:
        if mode is None:
            real, synthetic = app.folder.resolve(repo_path), None
        else:
            real, synthetic = _locate(app, mode, repo_path)
    except RepoPathError:
        raise HTTPError(404, "NoSuchKey") from None
    if synthetic is not None:
        folder, index = synthetic
        return Blob(data=folder.body(index))
    if real is None or os.path.isdir(real):
        raise HTTPError(404, "NoSuchKey")
    return Blob.open(real)


# -- listing rows -------------------------------------------------------------------------------------------------
class _Rows:
    """The JSON rows of one folder listing, in name order, counted before any is produced."""

    def __init__(self, handler: Any, route: Route, include_size: bool):
        app = handler.app
        self.app, self.mode = app, _mode(app)
        self.base, self.rev, self.include_size = handler._base_url(), route.rev, include_size
        self.key = "/".join(split_repo_path(route.key))
        real, found = _locate(app, self.mode, self.key)
        self.real_dir = real
        self.file: Optional[RepoEntry] = None
        if found is not None or (real is not None and not os.path.isdir(real)):
            self.file = self._file_entry(real, found)
            return
        entries = app.folder.list_dir(self.key, self._classify) if real is not None else []
        names = {e.path.rpartition("/")[2] for e in entries}
        for folder in self.mode.synthetic_folders():  # folders that exist only through synthetic files below
            if folder.startswith(self.key + "/" if self.key else "") and folder != self.key:
                child = folder[len(self.key) + 1 if self.key else 0 :].split("/", 1)[0]
                if child not in names:
                    names.add(child)
                    path = f"{self.key}/{child}" if self.key else child
                    entries.append(RepoEntry(path, "dir", 0, hashlib.sha1(f"virtual\0{path}".encode()).hexdigest()))
        self.entries = sorted((self._dvc_dir(e) for e in entries), key=lambda e: e.path)
        self.synthetic = self.mode.synthetic_folders().get(self.key)
        shadowed = sum(1 for n in names if self.synthetic is not None and self.synthetic.index(n) is not None)
        self.buckets = app.buckets.names(app) if not self.key else []
        self.handler = handler
        self.count = len(self.entries) + len(self.buckets)
        self.count += self.synthetic.count - shadowed if self.synthetic is not None else 0

    def _classify(self, path: str, real: str, st: os.stat_result) -> Tuple[str, str]:
        if self.mode.is_dvc(path):
            return self.app.folder.dvc_md5(real, st), "dvc"
        return self.app.folder.blob_sha(real, st), "git"

    def _dvc_dir(self, entry: RepoEntry) -> RepoEntry:
        if entry.type != "dir" or not self.mode.is_dvc(entry.path):
            return entry
        # DVC names a tracked folder by the md5 of its .dir manifest; this server serves no manifests, so the
        # md5 is of the folder's identity and state, in the same "<md5>.dir" shape
        digest = hashlib.md5(f"{entry.path}\0{entry.hash}".encode("utf-8")).hexdigest()
        return RepoEntry(entry.path, "dir", 0, f"{digest}.dir", "dvc")

    def _file_entry(self, real: Optional[str], found: Any) -> RepoEntry:
        if found is not None:
            folder, index = found
            path = folder.repo_path(index)
            if self.mode.is_dvc(path):
                return RepoEntry(path, "file", folder.size, folder.md5(index), "dvc")
            return RepoEntry(path, "file", folder.size, folder.blob_sha(index), "git")
        assert real is not None
        st = os.stat(real)
        digest, versioning = self._classify(self.key, real, st)
        return RepoEntry(self.key, "file", st.st_size, digest, versioning)

    def _sized(self, entry: RepoEntry) -> RepoEntry:
        if self.mode.sizes_need_include_size and not self.include_size and entry.size:
            return RepoEntry(entry.path, entry.type, 0, entry.hash, entry.versioning)
        return entry

    def entry_json(self, entry: RepoEntry) -> Dict[str, Any]:
        """One row as data."""
        return payloads.content_entry(self.app, self.base, self.rev, self._sized(entry))

    def _synthetic_rows(self, folder: SyntheticFolder, start: int, stop: int) -> Iterator[str]:
        dvc = self.mode.is_dvc(folder.repo_path(0))
        sample = RepoEntry(folder.repo_path(0), "file", folder.size, _HASH_SLOT, "dvc" if dvc else "git")
        text = json.dumps(self.entry_json(sample)).replace("%", "%%")
        template = text.replace(folder.name(0), "%(n)s").replace(_HASH_SLOT, "%(h)s")
        hasher = folder.md5 if dvc else folder.blob_sha
        name = folder.name
        for index in range(start, stop):
            yield template % {"n": name(index), "h": hasher(index)}

    def __iter__(self) -> Iterator[str]:
        cursor = 0
        folder = self.synthetic
        for entry in self.entries:
            if folder is not None:
                name = entry.path.rpartition("/")[2]
                below = folder.count_below(name)
                yield from self._synthetic_rows(folder, cursor, below)
                cursor = below + (1 if folder.index(name) == below else 0)  # a real file shadows its namesake
            yield json.dumps(self.entry_json(entry))
        if folder is not None:
            yield from self._synthetic_rows(folder, cursor, folder.count)
        for bucket in self.buckets:
            yield json.dumps(storage.root_row(self.handler, bucket))


def _batches(rows: Iterator[str]) -> Iterator[List[str]]:
    """``rows`` in lists of about ``_CHUNK_CHARS`` characters; only the last one can be shorter."""
    batch: List[str] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += len(row)
        if size >= _CHUNK_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _send_rows(handler: Any, rows: Iterator[str]) -> None:
    """Write ``[row, row, ...]``: with a Content-Length when small, else streamed in chunks."""
    batches = _batches(rows)
    head = next(batches, [])
    if sum(map(len, head)) < _CHUNK_CHARS:  # the rows ran out before one chunk's worth
        handler._send(200, ("[" + ", ".join(head) + "]").encode("utf-8"), _JSON)
        return
    if not send_head(handler, 200, _JSON, None, {"Transfer-Encoding": "chunked"}):
        return
    write = handler.wfile.write

    def chunk(text: str) -> None:
        data = text.encode("utf-8")
        write(b"%x\r\n%s\r\n" % (len(data), data))

    chunk("[" + ", ".join(head))
    for batch in batches:
        chunk(", " + ", ".join(batch))
    chunk("]")
    write(b"0\r\n\r\n")


def serve_content(handler: Any, route: Route, query: Dict[str, List[str]]) -> None:
    """``GET content/{rev}/{path}``: one unpaged array for a folder, one object for a file."""
    include_size = _truthy(query, "include_size")
    rows = _Rows(handler, route, include_size)
    mode = rows.mode
    cost = float(mode.size_cost_per_entry) if include_size else 0.0
    if rows.file is not None:
        if not mode.file_content_object:
            raise HTTPError(404, "not a directory")
        if cost:
            time.sleep(cost)
        handler._send_json(200, rows.entry_json(rows.file))
        return
    if cost:
        time.sleep(cost * rows.count)  # sizes are slow to compute on dagshub.com
    paging = _truthy(query, "paging") or "limit" in query
    if mode.unpaged_listings or not paging:
        _send_rows(handler, iter(rows))
        return
    start, limit = page_bounds(query)
    page = ", ".join(islice(iter(rows), start, start + limit))
    next_token = json.dumps(str(start + limit) if start + limit < rows.count else None)
    handler._send(200, f'{{"entries": [{page}], "next_token": {next_token}}}'.encode("utf-8"), _JSON)


def serve_raw(handler: Any, route: Route, drop: bool) -> None:
    """``GET|HEAD raw/{rev}/{path}``: DVC files redirect to a presigned URL; Range is ignored (knobs)."""
    app = handler.app
    mode = _mode(app)
    real, found = _locate(app, mode, route.key)
    if found is None and (real is None or os.path.isdir(real)):
        raise HTTPError(404, "is a directory")
    if handler._redirect_fault():
        return
    path = found[0].repo_path(found[1]) if found is not None else "/".join(split_repo_path(route.key))
    if mode.presign_dvc_raw and mode.is_dvc(path):
        location = app.presigned_url(path, host=urlsplit(handler._base_url()).hostname)
        handler._send(int(mode.redirect_status), b"", "text/plain", {"Location": location})
        return
    if found is not None:
        folder, index = found
        blob, sha = Blob(data=folder.body(index)), folder.blob_sha(index)
    else:
        assert real is not None
        blob = Blob.open(real)
        sha = app.folder.etag_sha(real, os.fstat(blob.fh.fileno()))  # type: ignore[union-attr]
    with blob:
        send_blob(handler, blob, honour_range=not mode.ignore_range, headers={"ETag": f'"{sha}"'} if sha else None,
                  drop=drop, drip=handler._drip)
