"""Which credentials a client sends: the token if one is found, else none (public repositories), and a token after
all (OAuth included, when interactive) once the server refuses an anonymous request.

    creds = Credentials(ref, token=None)               # nothing found: requests go out without Authorization
    session.auth = OriginBearerAuth(origin_of(ref.host), creds.secret)
    ...                                                  # a 401 (or a private repo's 404) to an anonymous request:
    creds.refused(401, session.auth)                   # finds a token and raises TokenAcquired (send it again), or
                                                         # raises AuthenticationError naming DAGSHUB_TOKEN

``token=False`` means anonymous for good. Never an empty ``Bearer`` header, never the token in a message.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Optional, Tuple, Union

import requests

from streamloader.errors import AuthenticationError
from streamloader.remote.transport import origin_of
from streamloader.remote.urls import RepoRef, split_credentials

__all__ = ["Credentials", "OriginBearerAuth", "TokenAcquired", "take_url_token"]

log = logging.getLogger("streamloader.remote.client")

# Serialises the switch from anonymous reads to a token (one OAuth prompt, however many threads hit a 401).
_escalation_lock = threading.Lock()


class TokenAcquired(Exception):
    """An anonymous request was refused and a token has been found since: run the request again, with it."""


class OriginBearerAuth(requests.auth.AuthBase):
    """Adds the bearer token only to requests for the API origin (never to a redirect target elsewhere); without a
    token it adds nothing. ``sent_token()`` says whether this thread's last request to the API origin carried the
    token, so that a 401 to an anonymous request is told apart from a rejected token."""

    def __init__(self, origin: str, token_getter: Callable[[], Optional[str]]):
        self.origin = origin
        self._prefix = origin + "/"  # a URL that starts with it is of the origin (no urlsplit per request)
        self._token_getter = token_getter
        self._sent = threading.local()

    def headers_for(self, url: str) -> Dict[str, str]:
        """The Authorization header for a request to ``url``: empty for any origin but the API's."""
        if url.startswith(self._prefix) or origin_of(url) == self.origin:
            secret = self._token_getter()
            self._sent.token = bool(secret)
            if secret:
                return {"Authorization": f"Bearer {secret}"}
        return {}

    def sent_token(self) -> bool:
        """Whether the last request this thread sent to the API origin carried the token."""
        return getattr(self._sent, "token", True)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.headers_for(request.url))
        return request


def take_url_token(repo_url: Any, host: Optional[str]) -> Tuple[Any, Optional[str], Optional[str]]:
    """(repo_url, host, password) with ``user:password@`` taken out of both URLs (the password is the token)."""
    url_token = None
    if isinstance(repo_url, str):
        repo_url, url_token = split_credentials(repo_url)
    if host:
        host, host_token = split_credentials(host)
        url_token = url_token or host_token
    return repo_url, host, url_token


class Credentials:
    """The token of one client (see module docstring): ``token`` is what the caller passed (None: look it up,
    False: anonymous, a str or :class:`~streamloader.auth.Token`); ``url_token`` a password from the repo URL."""

    def __init__(self, ref: RepoRef, token: Union[str, Any, None] = None, url_token: Optional[str] = None):
        self.ref = ref
        if url_token and token is None:
            from streamloader.auth import URL_SOURCE, Token

            token = Token(url_token, URL_SOURCE)
        self.requested = token
        self.token: Any = None  # the resolved Token, False while anonymous, None before the first request
        self.public: Optional[bool] = None  # whether the repo record answers anonymous requests (asked on a 404)

    def secret(self) -> Optional[str]:
        """The token to send, or None (anonymous); looked up (no OAuth, no network) on the first call."""
        if self.token is None:
            from streamloader.auth import find_token

            found = None if self.requested is False else find_token(self.ref.host, self.requested)
            if found is None and self.requested is not False:
                log.info("no DagsHub token found for %s: reading %s anonymously (enough for a public repository)",
                         self.ref.host, self.ref)
            self.token = found or False
        return self.token.reveal() if self.token else None

    def refused(self, status: int, auth: Any) -> None:
        """The API answered 401/403 (or a private repo's 404): raise TokenAcquired once a token is at hand for an
        anonymous request, else AuthenticationError (naming the token's source, never its value)."""
        anonymous = isinstance(auth, OriginBearerAuth) and not auth.sent_token()
        if anonymous and self.requested is not False:
            with _escalation_lock:
                if not self.token:  # no other thread got one meanwhile
                    from streamloader.auth import resolve_token

                    self.token = resolve_token(self.ref.host,
                                               reason=f"{self.ref} refused anonymous access (HTTP {status})")
            raise TokenAcquired()
        if anonymous:
            raise AuthenticationError(f"{self.ref} refused anonymous access (HTTP {status}; token=False was given)")
        source = getattr(self.token, "source", "the configured token")
        raise AuthenticationError(f"{self.ref} rejected the token from {source} (HTTP {status})")

    def may_hide_private_repo(self, url: str, session: requests.Session, timeout: Any) -> bool:
        """Whether a 404 to an anonymous request to ``url`` may stand for "private": true unless the repo record
        answers anonymous requests (asked once, without credentials)."""
        auth = session.auth
        if self.requested is False or not isinstance(auth, OriginBearerAuth) or auth.sent_token():
            return False
        if url == self.ref.api_base:
            return True
        if self.public is None:
            try:
                resp = session.get(self.ref.api_base, auth=_no_auth, allow_redirects=False, timeout=timeout)
                resp.close()
            except requests.RequestException:
                return False  # cannot tell: report the 404 as it is
            if resp.status_code in (200, 401, 403, 404):
                self.public = resp.status_code == 200
        return self.public is False


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request
