"""``streamloader login``: check a DagsHub access token and store it in the dagshub token cache.

The token is never echoed. ``--token -`` reads it from stdin (``echo "$T" | streamloader login --token -``);
without ``--token`` on a terminal it is asked for with a hidden prompt (empty answer: browser OAuth).
"""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import Optional


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``login`` sub-command."""
    parser = subparsers.add_parser(
        "login",
        help="check a DagsHub access token and store it in the dagshub token cache",
        description=(
            "Validate a DagsHub access token against HOST (GET /api/v1/user) and store it in the dagshub token "
            "cache, where streamloader and the official dagshub client find it. Without --token: a hidden prompt "
            "on a terminal, else DAGSHUB_TOKEN / DAGSHUB_USER_TOKEN / the cache."
        ),
    )
    parser.add_argument(
        "--token",
        metavar="T",
        help="the access token; '-' reads it from stdin (keeps it out of shell history and the process list)",
    )
    parser.add_argument(
        "--host", metavar="H", help="DagsHub host (default: $DAGSHUB_CLIENT_HOST or https://dagshub.com)"
    )
    parser.add_argument("--no-validate", action="store_true", help="store the token without checking it")
    parser.set_defaults(func=run)


def _read_token(option: Optional[str]) -> Optional[str]:
    """The token the user gave: the option, stdin for '-', a hidden prompt on a terminal, else None."""
    if option == "-":
        text = sys.stdin.read().strip()
        if not text:
            raise ValueError("--token -: nothing was read from stdin")
        if len(text.split()) != 1:
            raise ValueError("--token -: expected a single token on stdin")
        return text
    if option is not None:
        return option
    if sys.stdin is not None and sys.stdin.isatty():
        entered = getpass.getpass("DagsHub access token (leave empty to log in with the browser): ").strip()
        return entered or None
    return None


def run(args: argparse.Namespace) -> int:
    """Validate and store the token; print one line (never the token)."""
    from streamloader import auth
    from streamloader.remote.urls import default_host, normalize_host

    host = normalize_host(args.host) if args.host else default_host()
    token = auth.login(_read_token(args.token), host, validate=not args.no_validate)
    who = f" as {token.user}" if token.user else ""
    if token.source in (auth.ARGUMENT_SOURCE, auth.OAUTH_SOURCE):
        where = f"stored in {auth.token_cache_path()}"
    else:
        where = f"from {token.source}"
    checked = "" if args.no_validate else ", checked"
    print(f"Logged in to {host}{who} (token {where}{checked}).")
    return 0
