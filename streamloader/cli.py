"""The ``streamloader`` command line.

Each sub-command lives in its own module under :mod:`streamloader.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args; returns an exit
code). Command modules must import heavy libraries (torch, PIL) inside ``func``, not at module level, so that
``streamloader --help`` stays fast.

Exit codes: 0 ok (also when stdout is closed early, as by ``| head``), 1 runtime failure, 2 usage error (argparse's
own, and :class:`~streamloader.commands._remote.UsageError` raised by a command). User-facing failures print one
line; ``--debug`` shows the traceback. ``--debug`` and ``-v`` are accepted before and after the sub-command. Log
lines go through ``tqdm.write``, so they never break a progress bar.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from typing import List, Optional

from streamloader import __version__
from streamloader.commands._remote import UsageError
from streamloader.errors import StreamloaderError

log = logging.getLogger("streamloader")


def _add_global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log what the library does (INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamloader",
        description="Stream a DagsHub (or any fsspec) dataset repository as if it were on local disk.",
    )
    parser.add_argument("--version", action="version", version=f"streamloader {__version__}")
    _add_global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import streamloader.commands as commands_pkg

    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"streamloader.commands.{info.name}").register(sub)
    for command_parser in sub.choices.values():
        # also after the sub-command; SUPPRESS keeps a flag given before it from being reset to False
        _add_global_flags(command_parser, argparse.SUPPRESS)
    return parser


class _TqdmHandler(logging.Handler):
    """Writes log lines to the current ``sys.stderr`` with ``tqdm.write``: above an active progress bar instead of
    through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from streamloader._progress import write

            write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(level: int) -> logging.Handler:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: trust the error
        return True


def _stdout_closed() -> None:
    """After a broken pipe on stdout: point it at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    root = logging.getLogger()
    level = root.level
    handler = _configure_logging(logging.DEBUG if args.debug else (logging.INFO if args.verbose else logging.WARNING))
    try:
        return _run(args)
    finally:  # main() may be called again in the same process (tests, scripts)
        root.removeHandler(handler)
        root.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that went away (| head) is noticed here, not at exit
        return code
    except KeyboardInterrupt:
        logging.disable(logging.CRITICAL)  # background threads stay quiet after the last line
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if _stdout_is_broken():
            _stdout_closed()  # the reader of our output closed it (| head): a normal end, nothing to report
            return 0
        if args.debug:
            raise
        print(f"streamloader {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"streamloader {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (StreamloaderError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"streamloader {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
