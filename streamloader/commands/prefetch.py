"""``streamloader prefetch URL_OR_LIST``: warm the local cache for remote files, concurrently, with progress."""
from __future__ import annotations

import argparse
from typing import Any, List

from streamloader.commands.ls import add_remote_arguments, storage_options


def register(subparsers: Any) -> None:
    """Add the ``prefetch`` sub-command."""
    parser = subparsers.add_parser(
        "prefetch", help="download remote files into the local cache",
        description="Warm the streamloader cache. URL_OR_LIST is a dagshub://OWNER/REPO/PATH file or directory "
                    "(directories are walked recursively), or a local text file with one dagshub:// URL per line.")
    parser.add_argument("target", metavar="URL_OR_LIST")
    add_remote_arguments(parser)
    parser.add_argument("--cache-dir", help="cache directory (default: $STREAMLOADER_CACHE or the user cache dir)")
    parser.add_argument("-j", "--max-concurrency", type=int, default=32, help="parallel downloads (default 32)")
    parser.add_argument("--skip-errors", action="store_true", help="report failed files and carry on")
    parser.set_defaults(func=run)


def _targets(fs: Any, target: str) -> List[str]:
    if target.startswith("dagshub://"):
        path = fs._strip_protocol(target)
        return fs.find(path) if fs.isdir(path) else [path]
    with open(target, encoding="utf-8") as f:
        urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    bad = [u for u in urls if not u.startswith("dagshub://")]
    if bad:
        raise ValueError(f"{target}: expected dagshub:// URLs, got {bad[0]!r}")
    return [fs._strip_protocol(u) for u in urls]


def run(args: argparse.Namespace) -> int:
    from streamloader.remote.filesystem import DagsHubFileSystem

    fs = DagsHubFileSystem(cache_dir=args.cache_dir, max_concurrency=args.max_concurrency, **storage_options(args))
    paths = _targets(fs, args.target)
    result = fs.prefetch(paths, max_concurrency=args.max_concurrency, progress=True,
                         on_error="skip" if args.skip_errors else "raise")
    print(f"prefetched {result}")
    for path, exc in result.failed.items():
        print(f"  failed: {path}: {exc}")
    return 1 if result.failed else 0
