"""``streamloader umount MOUNTPOINT``: remove a ``streamloader mount`` (also one whose process was killed)."""
from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``umount`` sub-command."""
    parser = subparsers.add_parser(
        "umount", help="unmount a streamloader mount",
        description="Unmount MOUNTPOINT; the mount's process then exits. Works on a dead mount too (after a kill "
                    "-9: 'Transport endpoint is not connected'). A mount in use by a process fails unless --lazy.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--lazy", action="store_true", help="detach now, finish once nothing uses it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamloader.fusemount import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    print(f"Unmounted {args.mountpoint}")
    return 0
