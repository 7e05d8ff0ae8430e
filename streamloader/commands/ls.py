"""``streamloader ls URL``: list a remote directory (``dagshub://owner/repo/dir``, a repo URL, or any fsspec URL)."""
from __future__ import annotations

import argparse
from typing import Any

# add_remote_arguments and storage_options are re-exported: older code imports them from here
from streamloader.commands._remote import (  # noqa: F401
    add_remote_arguments, is_remote, remote_argument, storage_options)


def register(subparsers: Any) -> None:
    """Add the ``ls`` sub-command."""
    parser = subparsers.add_parser(
        "ls", help="list a remote directory",
        description="List URL with sizes: dagshub://OWNER/REPO[/DIR] (host: --host, else $DAGSHUB_CLIENT_HOST, else "
                    "https://dagshub.com), a repo URL https://HOST/OWNER/REPO[/DIR] (host from the URL; a web-UI "
                    "address .../src/BRANCH/DIR names the branch too), or any other fsspec URL.")
    parser.add_argument("url", metavar="URL")
    add_remote_arguments(parser)
    parser.add_argument("-l", "--long", action="store_true", help="show type and size")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import fsspec

    url, opts = remote_argument(args.url, args) if is_remote(args.url) else (args.url, {})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    for info in fs.ls(path, detail=True):
        is_dir = info["type"] == "directory"
        name = info["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if is_dir else "")
        if args.long:
            size = "" if is_dir else f"{info.get('size') or 0:,}"
            print(f"{'dir' if is_dir else 'file':4}  {size:>13}  {name}")
        else:
            print(name)
    return 0
