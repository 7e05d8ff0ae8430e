"""``streamloader prefetch TARGET``: warm the local cache for remote files, concurrently, with progress.

TARGET is a remote file or directory, or a list (a file, or ``-`` for stdin) that ``streamloader filter`` can
write: ``streamloader filter dagshub://o/r/data/labels.tsv -k squirrel | streamloader prefetch --base
dagshub://o/r/data -``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, List, Tuple

from streamloader.commands._remote import (
    UsageError, add_remote_arguments, int_at_least, is_remote, remote_argument, storage_options)

EPILOG = """\
examples:
  streamloader prefetch dagshub://OWNER/REPO/data                 every file under data/, recursively
  streamloader prefetch https://dagshub.com/OWNER/REPO/data       the same, host taken from the URL
  streamloader filter dagshub://OWNER/REPO/data/labels.tsv -k squirrel \\
      | streamloader prefetch --base dagshub://OWNER/REPO/data -   the images of the matching rows

output: one line per failed file on stderr, then the summary on stdout:
  40 downloaded (1.2 MB), 0 already cached, 0 failed in 0.41 s
Exit codes: 0 ok (with --skip-errors also when some files failed), 1 some files failed, 2 bad usage."""


def register(subparsers: Any) -> None:
    """Add the ``prefetch`` sub-command."""
    parser = subparsers.add_parser(
        "prefetch", help="download remote files into the local cache",
        description="Warm the streamloader cache. TARGET is a remote file or directory (dagshub://OWNER/REPO/PATH "
                    "or https://HOST/OWNER/REPO/PATH; directories are walked recursively), or a list: a text file, "
                    "or '-' for stdin, with one entry per line (# comments and blank lines are skipped). An entry "
                    "is a remote URL or, with --base, a path relative to BASE, such as the file names "
                    "`streamloader filter` prints.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="TARGET", help="remote URL, list file, or - (a list on stdin)")
    parser.add_argument("--base", metavar="URL",
                        help="remote folder the list's relative entries are in, e.g. dagshub://OWNER/REPO/data")
    add_remote_arguments(parser)
    parser.add_argument("--cache-dir", help="cache directory (default: $STREAMLOADER_CACHE or the user cache dir)")
    parser.add_argument("-j", "--max-concurrency", type=int_at_least(1), default=None,
                        help="at most this many parallel downloads (default: as many as the server keeps up with, "
                             "from 32 up to 128)")
    parser.add_argument("--skip-errors", action="store_true",
                        help="report failed files but exit 0 (default: exit 1 when any file failed)")
    parser.set_defaults(func=run)


def _read_list(target: str) -> List[Tuple[int, str]]:
    try:
        if target == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(target, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        shown = "stdin" if target == "-" else target
        raise UsageError(f"the list {shown} is not UTF-8 text (byte {exc.start}): one path per line") from None
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


def _targets(args: argparse.Namespace) -> Tuple[List[str], Dict[str, Any]]:
    """The dagshub:// URLs to fetch and the storage options they share."""
    if is_remote(args.target):
        if args.base:
            raise UsageError("--base applies to a list (a file or -), not to a URL")
        url, opts = remote_argument(args.target, args)
        fs = _filesystem(args, opts)
        path = fs._strip_protocol(url)
        return ["dagshub://" + p for p in (fs.find(path) if fs.isdir(path) else [path])], opts
    if args.base is not None and not is_remote(args.base):
        raise UsageError(f"--base must be a remote folder (dagshub://OWNER/REPO/DIR or a repo URL), got {args.base!r}")
    base, opts = remote_argument(args.base, args) if args.base else ("", storage_options(args))
    urls = []
    shown = "stdin" if args.target == "-" else args.target
    for n, entry in _read_list(args.target):
        if is_remote(entry):
            url, entry_opts = remote_argument(entry, args)
            if any(entry_opts.get(k) != opts.get(k) for k in ("host", "revision") if k in entry_opts):
                raise UsageError(f"{shown}: line {n}: {entry!r} is on another host or revision than the others: "
                                 "prefetch one at a time")
            urls.append(url)
        elif base:
            urls.append(f"{base.rstrip('/')}/{entry.lstrip('/')}")
        else:
            raise UsageError(f"{shown}: line {n}: {entry!r} is not a URL; for names relative to a folder give "
                             "--base dagshub://OWNER/REPO/DIR")
    return urls, opts


def _filesystem(args: argparse.Namespace, opts: Dict[str, Any]) -> Any:
    from streamloader.remote.filesystem import DagsHubFileSystem

    return DagsHubFileSystem(cache_dir=args.cache_dir, max_concurrency=args.max_concurrency or 32, **opts)


class _FailuresReportedHere(logging.Filter):
    """Drops the library's per-file failure warnings: this command prints each failure once, after the bar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "prefetch_failure")


def run(args: argparse.Namespace) -> int:
    from streamloader.errors import HostUnreachableError
    from streamloader.hooks.warmup import prefetch

    urls, opts = _targets(args)
    if not urls:
        print("nothing to prefetch (the list is empty)")
        return 0
    quiet = _FailuresReportedHere()
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        result = prefetch(urls, max_concurrency=args.max_concurrency, progress=sys.stderr.isatty(), on_error="skip",
                          storage_options=dict(opts, cache_dir=args.cache_dir,
                                               max_concurrency=args.max_concurrency or 32))
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    unreachable = [exc for exc in result.failed.values() if isinstance(exc, HostUnreachableError)]
    for url, exc in result.failed.items():
        if not isinstance(exc, HostUnreachableError):
            print(f"failed: {url}: {_reason(exc)}", file=sys.stderr)
    if unreachable:  # the job stopped: one line for the host, not one per file
        print(f"failed: {len(unreachable)} files: {unreachable[0]}", file=sys.stderr)
    print(result)
    return 1 if result.failed and not args.skip_errors else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return exc.strerror or "not found"
    return str(exc) or type(exc).__name__
