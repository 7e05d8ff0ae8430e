"""The ``streamloader`` command line.

Each sub-command lives in its own module under :mod:`streamloader.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args; returns an exit
code). Command modules must import heavy libraries (torch, PIL) inside ``func``, not at module level, so that
``streamloader --help`` stays fast.

Exit codes: 0 ok, 1 runtime failure, 2 usage error. User-facing failures print one line; ``--debug`` shows the
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import List, Optional

from streamloader import __version__
from streamloader.errors import StreamloaderError

log = logging.getLogger("streamloader")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamloader",
        description="Stream a DagsHub (or any fsspec) dataset repository as if it were on local disk.",
    )
    parser.add_argument("--version", action="version", version=f"streamloader {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import streamloader.commands as commands_pkg

    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"streamloader.commands.{info.name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (StreamloaderError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"streamloader {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
