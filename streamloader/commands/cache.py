"""``streamloader cache info|prune|clear``: inspect and trim the local cache."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional


def _size(text: str) -> int:
    from streamloader.cache import parse_size

    try:
        return int(parse_size(text) or 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: Any) -> None:
    """Add the ``cache`` sub-command."""
    parser = subparsers.add_parser(
        "cache", help="show, prune or clear the local cache",
        description="Manage the streamloader cache ($STREAMLOADER_CACHE or the user cache dir). 'info' shows each "
                    "part (downloaded files, listings, features, temp files, locks) and each repository; 'prune' "
                    "removes temp files left by killed processes and, with --max-size, evicts the least recently "
                    "used files until the cache fits; 'clear' removes every cached file, listing and feature vector. Files "
                    "being downloaded are never removed; neither command creates a missing cache directory.")
    parser.add_argument("action", choices=["info", "prune", "clear"])
    parser.add_argument("--cache-dir", help="cache directory (default: $STREAMLOADER_CACHE or the user cache dir)")
    parser.add_argument("--max-size", type=_size, help="for prune: target size, e.g. 10GB or 500MiB (default: evict nothing)")
    parser.set_defaults(func=run, parser=parser)


def _root(cache_dir: Optional[str]) -> str:
    from streamloader.cache import default_cache_dir

    return os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()


def run(args: argparse.Namespace) -> int:
    from streamloader._units import plural
    from streamloader.cache.report import cache_report, clear_cache

    root = _root(args.cache_dir)
    if os.path.exists(root) and not os.path.isdir(root):
        print(f"streamloader cache: error: {root} is not a directory", file=sys.stderr)
        return 2
    if args.action == "info":
        print(cache_report(root).format())
        return 0
    if not os.path.isdir(root):
        print(f"nothing to {args.action}: {root} does not exist")
        return 0
    if args.action == "prune":
        from streamloader.cache import FileCache

        result = FileCache(root).prune(args.max_size)  # without --max-size: only the temp files of dead processes
        print(f"removed {plural(result['removed'], 'cached file')} and "
              f"{plural(result['temp_removed'], 'stale temp file')}")
    else:
        removed = clear_cache(root)
        parts = ", ".join(f"{n:,} {part}" for part, n in removed.items())
        print(f"removed {plural(sum(removed.values()), 'file')} from {root} ({parts})")
    return 0
