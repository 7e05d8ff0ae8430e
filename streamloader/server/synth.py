"""Synthetic image folders for the dagshub-like server mode: N JPEG files that exist only as names and formulas.

``SyntheticFolder("data", 540_000)`` stands for ``data/000000000.jpg`` ... ``data/000539999.jpg``: every file is
the same 32x32 JPEG (1.1 KB, decodable by PIL) with its index in a COM segment just before the end-of-image
marker, so all files differ, all have the same size, and their md5 / git blob sha1 cost one tiny hash update each
(the hash state of the shared prefix is computed once). Nothing is written to disk::

    folder = SyntheticFolder("data", 540_000)
    folder.name(7)            # "000000007.jpg"
    folder.index("000000007.jpg")   # 7 (None for names it does not hold)
    folder.body(7)            # the bytes
    folder.md5(7), folder.blob_sha(7)

``write_synthetic_labels(path, n)`` writes a LAION-style labels.tsv whose rows name exactly these files.
"""
from __future__ import annotations

import base64
import hashlib
import os
from typing import Optional, Union

from streamloader.server.dvc import istextblock

__all__ = ["SyntheticFolder", "write_synthetic_labels", "MAX_SYNTHETIC", "NAME_WIDTH"]

NAME_WIDTH = 9
MAX_SYNTHETIC = 10**NAME_WIDTH
_SUFFIX = ".jpg"
_NAME_LEN = NAME_WIDTH + len(_SUFFIX)

# A 32x32 RGB JPEG (gradient plus noise, quality 90), fixed here so every machine serves the same bytes.
_TEMPLATE = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQERMU"
    "FRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU"
    "FBQUFBQUFBT/wAARCAAgACADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUF"
    "BAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVW"
    "V1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi"
    "4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAEC"
    "AxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVm"
    "Z2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq"
    "8vP09fb3+Pn6/9oADAMBAAIRAxEAPwD8+9K8IfOyg+UR/AX+UtgcZyOfm6nj+Vd3ofhlY5YY4xHLtBV1WPJHOPm6AnAY544z7Guy"
    "0fwQjyHckU8BbAdVBUEkY29fTp1G7J4ru9F8PKXjljtyS4BykZZW5znj+7huo/lmpo1tL2ul+f8AVw4e4hu463ZyGk+FJEY4ihdl"
    "4ALFed3RucYIJ+9z7k13Wj+FJEiimRVZpQMoRu+Yj+HHXnp05z7Guy0nwczESQwvHnJZUbiT5w3Byc/e+905HTIrvtG8HN56wwec"
    "0Ej4ZkAJxkZz3IwQO30OcV7VGqtFF/1/Xof1Fw7xGnBO/wDX9bHnPhvwkisryH5Vk2klt2O+ST97P4YI7du70fwX51tF5cYeGXLI"
    "pfZ9VxjJ6epPzD3rstG8KQiZLiNnctIpVQOGzw3A7jnqTz+Vd7o/hNJlaVV2TgDbsO0cY4C549QDxxXw1GtrdK5/l/w/xE3a8u3y"
    "OQ0XwiLectEilHbLln+98x57jsRj2z6Y7vSvBsoGwIWZ1IlLDAzjaQpxz164Hpk8V2mm+E0umbyoY0LHeJDjJOTjHHUAc9h255ru"
    "tM8KPE20fPEQCGYEggnJX+6OST7euCTXtUK12r9T+nuHeIOWzbtb+v6/4B//2Q=="
)
assert _TEMPLATE[:2] == b"\xff\xd8" and _TEMPLATE[-2:] == b"\xff\xd9"
_HEAD = _TEMPLATE[:-2]  # everything before the end-of-image marker
_COM = b"\xff\xfe" + (2 + NAME_WIDTH).to_bytes(2, "big")  # COM marker + segment length (length bytes + payload)
SIZE = len(_HEAD) + len(_COM) + NAME_WIDTH + 2
assert not istextblock(_TEMPLATE[:512])  # DVC hashes these as binary: plain md5, no dos2unix
_MD5_HEAD = hashlib.md5(_HEAD)
_SHA_HEAD = hashlib.sha1(b"blob %d\0" % SIZE + _HEAD)


def _tail(index: int) -> bytes:
    return _COM + b"%0*d" % (NAME_WIDTH, index) + b"\xff\xd9"


class SyntheticFolder:
    """``count`` generated JPEGs inside repo folder ``path`` (see module docstring). Immutable, thread-safe."""

    size = SIZE

    def __init__(self, path: str, count: int):
        if not 0 <= count <= MAX_SYNTHETIC:
            raise ValueError(f"count must be in [0, {MAX_SYNTHETIC}], got {count}")
        self.path = path.strip("/")
        self.count = int(count)

    def __repr__(self) -> str:
        return f"SyntheticFolder({self.path!r}, {self.count})"

    @staticmethod
    def name(index: int) -> str:
        """File name of entry ``index``: zero-padded to 9 digits, ``.jpg``."""
        return f"{index:0{NAME_WIDTH}d}{_SUFFIX}"

    def repo_path(self, index: int) -> str:
        """Full repo path of entry ``index``."""
        return f"{self.path}/{self.name(index)}" if self.path else self.name(index)

    def index(self, name: str) -> Optional[int]:
        """Index of a file name in this folder, or None if the folder holds no such synthetic file."""
        if len(name) != _NAME_LEN or not name.endswith(_SUFFIX):
            return None
        digits = name[:NAME_WIDTH]
        if not (digits.isascii() and digits.isdigit()):
            return None
        value = int(digits)
        return value if value < self.count else None

    def count_below(self, name: str) -> int:
        """How many synthetic names sort before ``name`` (names sort in index order: fixed width)."""
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.name(mid) < name:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @staticmethod
    def body(index: int) -> bytes:
        """The file's bytes (``SIZE`` of them)."""
        return _HEAD + _tail(index)

    @staticmethod
    def md5(index: int) -> str:
        """md5 of the bytes (what DVC records: the files are binary)."""
        digest = _MD5_HEAD.copy()
        digest.update(_tail(index))
        return digest.hexdigest()

    @staticmethod
    def blob_sha(index: int) -> str:
        """git blob sha1 of the bytes."""
        digest = _SHA_HEAD.copy()
        digest.update(_tail(index))
        return digest.hexdigest()


def write_synthetic_labels(path: Union[str, "os.PathLike[str]"], count: int, **kwargs: int) -> int:
    """Write a LAION-style labels.tsv (name, caption, score, url) with one row per synthetic file, in order.

    Rows name ``SyntheticFolder.name(i)`` (relative to the folder, as LAION's ``data/labels.tsv`` does); captions
    come from ``streamloader.synthetic.make_labels_file`` (rows 0, 4696, 9392, ... mention "Squirrel"; pass
    ``squirrel_every=``, ``seed=``, ``tab_every=`` through). Returns the number of squirrel rows.
    Usage: ``write_synthetic_labels(repo / "data" / "labels.tsv", 540_000)`` (about a second) next to
    ``DagsHubLike(synthetic={"data": 540_000})``.
    """
    from streamloader.synthetic import make_labels_file

    info = make_labels_file(path, count, **kwargs)
    with open(path, "rb") as fh:  # make_labels_file owns the naming; fail loudly if it ever stops matching ours
        first = fh.readline().split(b"\t", 1)[0].decode("ascii", "replace")
    if count and first != SyntheticFolder.name(0):
        raise RuntimeError(f"labels name {first!r} does not match synthetic name {SyntheticFolder.name(0)!r}")
    return info.n_squirrel
