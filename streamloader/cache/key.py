"""What names a cache entry: :class:`CacheKey` (kind + digest), and the check of a file against it."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from streamloader._files import recorded_sha256
from streamloader.cache.verify import Verifier

__all__ = ["CacheKey", "HEX", "file_matches"]

HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class CacheKey:
    """Identity of cached content: ``kind`` names how ``digest`` was made ("git" blob sha1, "md5", "opaque": a hash
    nothing checks, or "path")."""

    kind: str
    digest: str

    @classmethod
    def from_hash(cls, versioning: Optional[str], value: str,
                  scope: Union[str, Sequence[str], None] = None) -> "CacheKey":
        """A key from a listing's content hash (git blob sha1 for "git", md5 for "dvc").

        The cache checks "git" and "md5" keys against the bytes, so identical content is shared by every repo. Any
        other hash (sha256, ``sha256:...``, a 40-hex DVC hash, ...) is "opaque": nothing checks it, so a repo could
        announce another repo's hash for its own bytes. ``scope`` (where the content comes from, e.g. the repo URL
        or (host, owner, repo)) is mixed into opaque keys, so such an entry is only ever read back by the same repo;
        RemoteRepo always passes it. Without a scope an opaque key is shared by whoever uses the same hash.
        """
        value = value.lower()
        hexlike = bool(HEX.match(value)) and 16 <= len(value) <= 128
        if hexlike and len(value) == 40 and versioning in (None, "git"):
            return cls("git", value)
        if hexlike and len(value) == 32:
            return cls("md5", value)
        if scope is None:  # unscoped: the hash itself (made a safe file name when it is not hex)
            return cls("opaque", value if hexlike else hashlib.sha256(f"{versioning}:{value}".encode()).hexdigest())
        # length-prefixed fields, so no two (scope, hash) pairs frame alike; ~1 us (the str case is one f-string)
        if isinstance(scope, str):
            framed = f"{len(scope)}:{scope}{len(value)}:{value}{versioning}"
        else:
            framed = "".join([f"{len(p)}:{p}" for p in (*scope, value)]) + str(versioning)
        return cls("opaque", hashlib.sha256(framed.encode()).hexdigest())

    @classmethod
    def from_location(cls, *parts: str) -> "CacheKey":
        """A key for content known only by where it lives (e.g. host, repo, commit sha, path)."""
        return cls("path", hashlib.sha256("\x00".join(parts).encode()).hexdigest())

    def hasher(self) -> Optional["Verifier"]:
        if self.kind == "git":
            return Verifier("sha1", self.digest, git_blob=True)
        if self.kind == "md5":
            return Verifier("md5", self.digest)
        return None


def file_matches(key: CacheKey, path: str) -> bool:
    """Whether the file at ``path`` hashes to ``key`` (DVC's md5-dos2unix counts); for a kind no hash checks
    ("path", "opaque"), whether it hashes to the sha256 noted on it as it was stored (False when none is noted;
    True where the file system keeps no such notes: nothing can be checked there)."""
    verifier = key.hasher()
    try:
        if verifier is None:
            noted = recorded_sha256(path)
            return noted is None or Verifier("sha256", noted).check_file(path)
        return verifier.verify(path, streamed=False)
    except OSError:  # evicted meanwhile: dropping finds nothing, the caller downloads
        return False
