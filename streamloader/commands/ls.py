"""``streamloader ls URL``: list a remote directory (``dagshub://owner/repo/dir`` or any fsspec URL)."""
from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``ls`` sub-command."""
    parser = subparsers.add_parser(
        "ls", help="list a remote directory",
        description="List URL (dagshub://OWNER/REPO/DIR, or any fsspec URL) with sizes. For dagshub:// the host is "
                    "--host, else $DAGSHUB_CLIENT_HOST, else https://dagshub.com.")
    parser.add_argument("url", metavar="URL")
    add_remote_arguments(parser)
    parser.add_argument("-l", "--long", action="store_true", help="show type and size")
    parser.set_defaults(func=run)


AUTH_EPILOG = ("Public repositories need no token. For a private one set DAGSHUB_TOKEN (or run `streamloader "
               "login`); without a token, a terminal session opens the DagsHub OAuth page when the repository asks "
               "for one, and a headless one fails at once saying so.")


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """The --host/--branch/--revision flags shared by commands that read dagshub:// URLs (and how auth works)."""
    if parser.epilog is None:
        parser.epilog = AUTH_EPILOG
    parser.add_argument("--host", help="DagsHub host (default: $DAGSHUB_CLIENT_HOST or https://dagshub.com)")
    parser.add_argument("--branch", help="branch to read (default: the repo's default branch)")
    parser.add_argument("--revision", help="commit sha to read")


def storage_options(args: argparse.Namespace) -> dict:
    """fsspec storage options for a dagshub:// URL from the common --host/--branch/--revision flags."""
    opts = {}
    for name in ("host", "branch", "revision"):
        value = getattr(args, name, None)
        if value:
            opts[name] = value
    return opts


def run(args: argparse.Namespace) -> int:
    import fsspec

    url = args.url
    fs, path = fsspec.core.url_to_fs(url, **(storage_options(args) if url.startswith("dagshub://") else {}))
    for info in fs.ls(path, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if info["type"] == "directory" else "")
        if args.long:
            print(f"{info['type'][:4]:4}  {info.get('size') or 0:>12,}  {name}")
        else:
            print(name)
    return 0
