"""What the sub-commands share: usage errors, and remote arguments given as ``dagshub://`` or pasted repo URLs.

Wherever a command takes a ``dagshub://OWNER/REPO[/PATH]`` URL it also takes ``https://HOST/OWNER/REPO[/PATH]``
(the form ``install_hooks`` asks for, and the address bar of the DagsHub web UI: ``.../src/BRANCH/PATH`` names the
branch too); the host then comes from the URL::

    url, opts = remote_argument("https://dagshub.com/o/r/data", args)   # "dagshub://o/r/data", {"host": ...}
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Tuple

__all__ = ["UsageError", "add_remote_arguments", "int_at_least", "is_remote", "remote_argument", "storage_options"]


class UsageError(Exception):
    """A mistake in the command line: :func:`streamloader.cli.main` prints it in one line and exits with 2."""


AUTH_EPILOG = ("Public repositories need no token. For a private one set DAGSHUB_TOKEN (or run `streamloader "
               "login`); without a token, a terminal session opens the DagsHub OAuth page when the repository asks "
               "for one, and a headless one fails at once saying so.")


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """The --host/--branch/--revision flags shared by commands that read remote URLs (and how auth works)."""
    if parser.epilog is None:
        parser.epilog = AUTH_EPILOG
    parser.add_argument("--host", help="DagsHub host for dagshub:// URLs (default: $DAGSHUB_CLIENT_HOST or "
                                       "https://dagshub.com); an https:// repo URL names its own")
    parser.add_argument("--branch", help="branch to read (default: the repo's default branch)")
    parser.add_argument("--revision", help="commit sha (or branch or tag name) to read")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: the integer in the argument, which must be ``>= minimum``.

    ``parser.add_argument("--limit", type=int_at_least(0))`` turns ``--limit -1`` into a usage error (exit 2).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def storage_options(args: argparse.Namespace) -> Dict[str, Any]:
    """fsspec storage options for a dagshub:// URL from the common --host/--branch/--revision flags."""
    opts = {}
    for name in ("host", "branch", "revision"):
        value = getattr(args, name, None)
        if value:
            opts[name] = value
    if "host" in opts:
        _check_host(opts["host"])
    return opts


def _check_host(host: str) -> None:
    """UsageError unless ``host`` names an http(s) origin (``dagshub.com``, ``http://127.0.0.1:8080``): a space, another
    scheme or a path would otherwise fail later as an unreachable host or an odd redirect."""
    from urllib.parse import urlsplit

    from streamloader.remote.urls import normalize_host

    parts = urlsplit(normalize_host(host))
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or \
            any(c.isspace() for c in host) or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--host {host!r} is not a host: give one like https://dagshub.com or http://127.0.0.1:8080")


def is_remote(url: str) -> bool:
    """Whether ``url`` names a place in a DagsHub repository (dagshub://, http:// or https://)."""
    return url.startswith(("dagshub://", "http://", "https://"))


def remote_argument(url: str, args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    """``(dagshub:// URL, storage options)`` for a remote URL argument; UsageError for a malformed URL or flags
    that contradict it (``--host`` other than the URL's host, ``--branch`` other than a web-UI address's)."""
    from streamloader.remote.urls import normalize_host, parse_repo_location

    opts = storage_options(args)
    try:
        location = parse_repo_location(url, host=normalize_host(opts["host"]) if "host" in opts else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not url.startswith("dagshub://"):
        if "host" in opts and normalize_host(opts["host"]) != location.ref.host:
            raise UsageError(f"--host {opts['host']} contradicts the host of {location.ref.url}: give one of them")
        opts["host"] = location.ref.host
    if location.revision:
        for flag in ("branch", "revision"):
            if opts.get(flag) and opts[flag] != location.revision:
                raise UsageError(f"--{flag} {opts[flag]} contradicts the URL, which names {location.revision!r}")
        opts.pop("branch", None)
        opts["revision"] = location.revision  # a branch name, a tag or a commit: the client tells them apart
    return location.dagshub_url, opts
