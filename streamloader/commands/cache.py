"""``streamloader cache info|prune|clear``: inspect and trim the local cache."""
from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``cache`` sub-command."""
    parser = subparsers.add_parser(
        "cache", help="show, prune or clear the local cache",
        description="Manage the streamloader cache ($STREAMLOADER_CACHE or the user cache dir). 'prune' evicts the "
                    "least recently used files until the cache fits --max-size and removes temp files left by "
                    "killed processes; 'clear' removes every cached file. Files being downloaded are never removed.")
    parser.add_argument("action", choices=["info", "prune", "clear"])
    parser.add_argument("--cache-dir", help="cache directory (default: $STREAMLOADER_CACHE or the user cache dir)")
    parser.add_argument("--max-size", help="for prune: target size, e.g. 10GB or 500MiB")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    from streamloader.cache import FileCache

    cache = FileCache(args.cache_dir)
    if args.action == "info":
        info = cache.info()
        print(f"cache: {info['root']}\nfiles: {info['files']:,}\nsize:  {info['bytes'] / 1e6:,.1f} MB"
              f"\ntemp files: {info['temp_files']}")
    elif args.action == "prune":
        if not args.max_size:
            args.parser.error("prune needs --max-size (e.g. --max-size 10GB)")
        result = cache.prune(args.max_size)
        print(f"removed {result['removed']} cached files and {result['temp_removed']} stale temp files")
    else:
        print(f"removed {cache.clear()} files from {cache.root}")
    return 0
