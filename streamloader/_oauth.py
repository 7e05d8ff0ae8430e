"""The browser OAuth login through the dagshub package, and one login per machine under ``torchrun``.

:func:`streamloader.auth.resolve_token` calls these when no token was found and the process is interactive. Under
torchrun (``LOCAL_RANK`` set) only local rank 0 opens the browser; every other rank polls the token cache for the
token rank 0 stores there, for at most ``$STREAMLOADER_OAUTH_WAIT`` seconds (default 300), then fails with a
message that says to set ``DAGSHUB_TOKEN`` for cluster jobs. The cache reader and writer are passed in, so this
module does not import :mod:`streamloader.auth`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

from streamloader.errors import AuthenticationError, DataFormatError

__all__ = ["OAUTH_WAIT_ENV", "local_rank", "oauth_token", "oauth_wait", "wait_for_local_rank_0"]

log = logging.getLogger("streamloader.auth")

OAUTH_WAIT_ENV = "STREAMLOADER_OAUTH_WAIT"
DEFAULT_OAUTH_WAIT = 300.0
_POLL = 0.25


def oauth_token(host: str, store: Callable[[str, str, str, str], str]) -> str:
    """Run the dagshub package's browser OAuth flow for ``host``; ``store(value, host, type, expiry)`` it and return
    the token."""
    log.info("no DagsHub token found for %s; starting OAuth in the browser", host)
    from dagshub.auth import oauth

    try:
        token_obj = oauth.oauth_flow(host)
    except Exception as exc:  # the dagshub package raises bare Exception / httpx errors
        raise AuthenticationError(f"OAuth login with {host} failed ({type(exc).__name__}: {exc})") from exc
    value = token_obj.token_text
    try:
        path = store(value, host, token_obj.token_type, token_obj.serialize()["expiry"])
        log.info("stored the OAuth token for %s in the dagshub token cache %s", host, path)
    except (OSError, DataFormatError) as exc:
        log.warning("could not store the OAuth token in the dagshub token cache (%s); OAuth will run again, and "
                    "other torchrun ranks cannot use it", exc)
    return value


def local_rank() -> Optional[int]:
    """This process's ``LOCAL_RANK`` under torchrun; None outside it (or if the variable is not an integer)."""
    try:
        return int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        return None


def oauth_wait() -> float:
    """How long a rank other than local rank 0 waits for its token: ``$STREAMLOADER_OAUTH_WAIT`` or 300 s."""
    try:
        return max(0.0, float(os.environ.get(OAUTH_WAIT_ENV) or DEFAULT_OAUTH_WAIT))
    except ValueError:
        return DEFAULT_OAUTH_WAIT


def wait_for_local_rank_0(host: str, path: str, rank: int, why: str, read: Callable[[], Optional[str]]) -> str:
    """Poll ``read()`` (the token cache at ``path``) until local rank 0's login stored a token for ``host``.

    Bounded by :func:`oauth_wait`; then :class:`AuthenticationError`, starting with ``why`` (why a token is needed).
    """
    wait = oauth_wait()
    log.warning("%s; under torchrun only local rank 0 logs in: local rank %d waits up to %.0f s for the token it "
                "stores in %s (set DAGSHUB_TOKEN for cluster jobs)", why, rank, wait, path)
    deadline = time.monotonic() + wait
    while True:
        cached = read()
        if cached:
            log.info("local rank %d: using the token local rank 0 stored for %s", rank, host)
            return cached
        left = deadline - time.monotonic()
        if left <= 0:
            raise AuthenticationError(
                f"{why}: under torchrun only local rank 0 starts the OAuth login, and local rank {rank} waited "
                f"{wait:.0f} s ({OAUTH_WAIT_ENV}) in vain for it to store a token in the dagshub token cache ({path})"
            )
        time.sleep(min(_POLL, left))
