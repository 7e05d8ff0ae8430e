"""Find the DagsHub access token, the same way for every entry point.

Order: explicit token > ``DAGSHUB_TOKEN`` > ``DAGSHUB_USER_TOKEN`` > the dagshub package's token cache (what
``dagshub.auth.add_app_token`` writes) > OAuth through the dagshub package when the process is interactive >
otherwise :class:`~streamloader.errors.AuthenticationError` at once. A headless job never waits on OAuth::

    token = resolve_token("https://dagshub.com")
    requests.get(url, headers=auth_headers(token))

:func:`find_token` is the same search without OAuth and without an error: the REST client reads anonymously when
it finds nothing (public repositories need no token) and calls :func:`resolve_token` only once the server asks for
credentials. Under ``torchrun`` only local rank 0 starts OAuth; the other ranks wait (bounded by
``$STREAMLOADER_OAUTH_WAIT``, default 300 s) for the token it stores in the token cache.

The secret lives only inside :class:`Token`; it never appears in logs, exception text, ``repr``, URLs or paths.
The dagshub package is imported only for OAuth (it takes ~0.4-0.7 s to import).
"""
from __future__ import annotations

import hmac
import logging
import os
import re
import sys
import threading
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple, Union

from streamloader._files import atomic_write
from streamloader.errors import AuthenticationError, DataFormatError, InvalidTokenError, RemoteError
from streamloader.remote.urls import default_host, normalize_host

__all__ = [
    "Token",
    "auth_headers",
    "find_token",
    "is_interactive",
    "login",
    "resolve_token",
    "token_cache_path",
    "validate_token",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "DAGSHUB_TOKEN"
USER_TOKEN_ENV = "DAGSHUB_USER_TOKEN"
TOKENS_CACHE_ENV = "DAGSHUB_CLIENT_TOKENS_CACHE"
NONINTERACTIVE_ENV = "STREAMLOADER_NONINTERACTIVE"
# the token `streamloader serve` requires, handed over by ServerProcess in the environment (never in argv: ps)
SERVER_TOKEN_ENV = "STREAMLOADER_SERVER_TOKEN"
CACHE_SOURCE = "dagshub token cache"
OAUTH_SOURCE = "oauth"
ARGUMENT_SOURCE = "argument"
URL_SOURCE = "the password in the URL"

# Token types the dagshub package writes, in the order its TokenStorage hands them out (app tokens first).
_CACHE_TYPE_PRIORITY = {"app-token": 0, "bearer": 1}
_TRUE_VALUES = {"1", "true", "yes", "on"}
# (connect, read) seconds for the token check; a login must not hang on a dead host.
VALIDATE_TIMEOUT = (10.0, 30.0)

# One OAuth flow at a time per process: concurrent first requests must not open several browser tabs.
_oauth_lock = threading.Lock()


class Token:
    """A DagsHub access token that does not leak: ``repr``/``str`` hide the value; ``reveal()`` returns it.

    ``source`` says where it came from ("argument", "DAGSHUB_TOKEN", "DAGSHUB_USER_TOKEN", "dagshub token cache",
    "oauth"); ``user`` is the account name once :func:`login` has validated it. Picklable, so DataLoader workers
    started with ``spawn`` receive it.
    """

    __slots__ = ("_value", "source", "user")

    def __init__(self, value: str, source: str, user: Optional[str] = None):
        if not isinstance(value, str) or not value.strip():
            raise InvalidTokenError(f"the DagsHub token from {source} is empty (a token must be a non-empty string)")
        value = value.strip()
        bad = next((c for c in value if not "\x21" <= c <= "\x7e"), None)
        if bad is not None:  # it would end up in an HTTP header, where requests quotes it in its error message
            raise InvalidTokenError(f"the DagsHub token from {source} contains {_describe(bad)}, so it cannot be "
                                    "sent; copy the token again (it is one line of printable characters)")
        self._value = value
        self.source = source
        self.user = user

    def reveal(self) -> str:
        """The secret itself; the only way to get it."""
        return self._value

    def __repr__(self) -> str:
        return f"Token(source={self.source!r}, value=***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Token):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


def _describe(char: str) -> str:
    if char in "\r\n":
        return "a line break"
    if char.isspace():
        return "whitespace"
    return "a non-ASCII character" if ord(char) > 0x7E else "a control character"


def token_cache_path() -> str:
    """Where the dagshub package keeps its tokens: ``$DAGSHUB_CLIENT_TOKENS_CACHE`` or its per-user cache file."""
    override = os.environ.get(TOKENS_CACHE_ENV)
    if override:
        return override
    try:  # the dagshub package computes its default with appdirs; use the same to land on the same file
        import appdirs

        cache_dir = appdirs.user_cache_dir("dagshub")
    except ImportError:
        import platformdirs

        cache_dir = platformdirs.user_cache_dir("dagshub")
    return os.path.join(cache_dir, "tokens")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE_VALUES


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # closed or replaced streams
        return False


def _in_ipython_kernel() -> bool:
    ipython = sys.modules.get("IPython")  # never import IPython just to ask
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a half-initialised IPython must not break token resolution
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def is_interactive() -> bool:
    """True in Colab, a Jupyter/IPython kernel, or with stdin and stdout on a terminal.

    ``STREAMLOADER_NONINTERACTIVE=1`` or ``CI=true`` force False, so OAuth is never attempted there.
    """
    if _env_true(NONINTERACTIVE_ENV) or _env_true("CI"):
        return False
    if "google.colab" in sys.modules or _in_ipython_kernel():
        return True
    return _isatty(sys.stdin) and _isatty(sys.stdout)


def _parse_expiry(value: Any) -> Optional[datetime]:
    """The dagshub cache's ``expiry`` as an aware datetime; None for "never"; raises ValueError if unreadable."""
    if isinstance(value, datetime):  # an unquoted timestamp in a hand-edited YAML file
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str):
        raise ValueError("expiry is not a string")
    text = value.strip()
    if text == "never":
        return None
    # dagshub writes "%Y-%m-%dT%H:%M:%S.%fZ"; older versions wrote 9 fraction digits, which fromisoformat rejects.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _load_cache(path: str) -> Optional[Dict[Any, Any]]:
    """The cache file as a dict; None if it does not exist. Raises DataFormatError if it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataFormatError(f"cannot read the dagshub token cache {path}: {exc.strerror}") from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        # The YAML error text quotes the offending line, which may hold a token: never pass it on.
        raise DataFormatError(f"the dagshub token cache {path} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or str(data.get("version", "1")) != "1":
        raise DataFormatError(f"the dagshub token cache {path} is not in the format this version understands")
    return data


def _host_entries(data: Dict[Any, Any], host: str) -> List[Tuple[str, Any]]:
    """The (key, entries) pairs of the cache whose host key normalizes to ``host``."""
    found = []
    for key, entries in data.items():
        if key == "version" or not isinstance(key, str) or not isinstance(entries, list):
            continue
        if normalize_host(key) == host:
            found.append((key, entries))
    return found


def _read_cached_token(host: str, path: str) -> Optional[str]:
    """The best unexpired token the dagshub cache holds for ``host``, without any network or OAuth."""
    try:
        data = _load_cache(path)
    except DataFormatError as exc:
        log.warning("ignoring the dagshub token cache: %s", exc)
        return None
    if not data:
        return None
    now = datetime.now(timezone.utc)
    candidates: List[Tuple[int, int, str]] = []
    skipped = 0
    for _key, entries in _host_entries(data, host):
        for entry in entries:
            if not isinstance(entry, dict):
                skipped += 1
                continue
            value, token_type = entry.get("access_token"), entry.get("token_type")
            priority = _CACHE_TYPE_PRIORITY.get(token_type) if isinstance(token_type, str) else None
            if not isinstance(value, str) or not value.strip() or priority is None:
                skipped += 1
                continue
            try:
                expiry = _parse_expiry(entry.get("expiry"))
            except (ValueError, TypeError):
                skipped += 1
                continue
            if expiry is not None and expiry <= now:
                skipped += 1
                continue
            candidates.append((priority, len(candidates), value))
    if skipped:
        log.debug("skipped %d expired or unreadable token(s) for %s in %s", skipped, host, path)
    return min(candidates)[2] if candidates else None


def _store_in_cache(value: str, host: str, token_type: str = "app-token", expiry: str = "never") -> str:
    """Put a token first in the dagshub cache for ``host`` (so it wins next time); returns the cache path."""
    import yaml

    path = token_cache_path()
    data = _load_cache(path) or {"version": "1"}
    matches = _host_entries(data, host)
    key = matches[0][0] if matches else host
    existing = data.get(key)
    existing = existing if isinstance(existing, list) else []
    entries = [e for e in existing if not (isinstance(e, dict) and e.get("access_token") == value)]
    data[key] = [{"access_token": value, "expiry": expiry, "token_type": token_type}] + entries
    # Write-then-rename so a reader never sees half a file; created owner-only (it holds secrets).
    atomic_write(path, yaml.safe_dump(data, default_flow_style=False).encode("utf-8"))
    return path


def _found(token: Token, host: str) -> Token:
    log.debug("using the DagsHub token from %s for %s", token.source, host)
    return token


def find_token(host: Optional[str] = None, token: Union[str, Token, None] = None) -> Optional[Token]:
    """The token for ``host`` from the argument, the environment or the dagshub cache; None when there is none.

    No OAuth, no network, no error for a missing token (an empty ``token`` argument is an error)::

        find_token("https://dagshub.com")      # None -> read public repositories anonymously
    """
    host = normalize_host(host) if host else default_host()
    if isinstance(token, Token):
        return _found(token, host)
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise AuthenticationError("The token argument is empty")
        return _found(Token(token, ARGUMENT_SOURCE), host)
    for name in (TOKEN_ENV, USER_TOKEN_ENV):
        value = os.environ.get(name)
        if value and value.strip():
            return _found(Token(value, name), host)
        if value is not None:
            log.debug("%s is set but empty; ignoring it", name)
    cached = _read_cached_token(host, token_cache_path())
    return _found(Token(cached, CACHE_SOURCE), host) if cached else None


def resolve_token(
    host: Optional[str] = None, token: Union[str, Token, None] = None, *, interactive: Optional[bool] = None,
    reason: Optional[str] = None,
) -> Token:
    """Find the token for ``host``: argument > env > dagshub cache > OAuth (interactive only) > error.

    ``interactive=None`` autodetects (:func:`is_interactive`). Without a token in a headless process this raises
    :class:`AuthenticationError` at once, without network access; ``reason`` (why a token is needed, e.g. "x
    refused anonymous access (HTTP 401)") starts its message. Under torchrun only local rank 0 runs OAuth::

        token = resolve_token("https://dagshub.com")   # Token(source='DAGSHUB_TOKEN', value=***)
    """
    host = normalize_host(host) if host else default_host()
    found = find_token(host, token)
    if found is not None:
        return found
    path = token_cache_path()
    if interactive is None:
        interactive = is_interactive()
    why = f"{reason} and no DagsHub token was found" if reason else f"No DagsHub token for {host}"
    if not interactive:
        raise AuthenticationError(
            f"{why}: {TOKEN_ENV} and {USER_TOKEN_ENV} are unset, the dagshub token cache ({path}) has none, and "
            "this process is not interactive, so OAuth was not attempted"
        )
    from streamloader import _oauth

    local_rank = _oauth.local_rank()
    if local_rank:  # torchrun: one login per machine, by local rank 0
        waited = _oauth.wait_for_local_rank_0(host, path, local_rank, why, lambda: _read_cached_token(host, path))
        return _found(Token(waited, CACHE_SOURCE), host)
    with _oauth_lock:
        cached = _read_cached_token(host, path)  # another thread may have finished OAuth while we waited
        if cached:
            return _found(Token(cached, CACHE_SOURCE), host)
        return _found(Token(_oauth.oauth_token(host, _store_in_cache), OAUTH_SOURCE), host)


def auth_headers(token: Optional[Token]) -> Dict[str, str]:
    """``{"Authorization": "Bearer ..."}`` for a token, ``{}`` for None (anonymous access to public repos)."""
    return {"Authorization": f"Bearer {token.reveal()}"} if token is not None else {}


def validate_token(token: Token, host: Optional[str] = None) -> Dict[str, Any]:
    """Check ``token`` with ``GET {host}/api/v1/user``; return the user record.

    Raises :class:`AuthenticationError` on 401/403 and :class:`RemoteError` if the host cannot be reached.
    """
    import requests

    host = normalize_host(host) if host else default_host()
    url = f"{host}/api/v1/user"
    log.debug("checking the DagsHub token from %s against %s", token.source, url)
    try:
        resp = requests.get(url, headers=auth_headers(token), timeout=VALIDATE_TIMEOUT)
    except requests.RequestException as exc:
        raise RemoteError(f"cannot reach DagsHub to check the token ({type(exc).__name__})", url=url) from None
    if resp.status_code in (401, 403):
        raise AuthenticationError(
            f"{host} rejected the token from {token.source} (HTTP {resp.status_code}); check that it is a valid, "
            f"unrevoked access token ({host}/user/settings/tokens)",
            hint=False,
        )
    if resp.status_code != 200:
        raise RemoteError("unexpected answer while checking the token", status=resp.status_code, url=url)
    try:
        user = resp.json()
    except ValueError:
        user = None
    if not isinstance(user, dict) or not (user.get("username") or user.get("login")):
        raise RemoteError("the token check did not return a DagsHub user record", status=resp.status_code, url=url)
    return user


def login(token: Union[str, Token, None] = None, host: Optional[str] = None, *, validate: bool = True) -> Token:
    """Resolve (OAuth allowed when interactive), validate and remember the DagsHub token for ``host``.

    An explicit token is stored first in the dagshub token cache, so later runs and the official client find it;
    tokens from environment variables are not written to disk. Sets nothing in ``os.environ``::

        streamloader.login(token="...")        # or streamloader.login() in Colab for the browser flow
    """
    host = normalize_host(host) if host else default_host()
    resolved = resolve_token(host, token)
    if validate:
        user = validate_token(resolved, host)
        resolved.user = user.get("username") or user.get("login")
        log.info("logged in to %s as %s (token from %s)", host, resolved.user, resolved.source)
    if resolved.source == ARGUMENT_SOURCE:
        path = _store_in_cache(resolved.reveal(), host)
        log.info("stored the token for %s in the dagshub token cache %s", host, path)
    return resolved
