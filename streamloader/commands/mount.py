"""``streamloader mount dagshub://OWNER/REPO[/PATH] MOUNTPOINT``: a read-only FUSE mount for non-Python readers."""
from __future__ import annotations

import argparse
from typing import Any

from streamloader.commands._remote import int_at_least, remote_argument
from streamloader.commands.ls import add_remote_arguments


def register(subparsers: Any) -> None:
    """Add the ``mount`` sub-command."""
    parser = subparsers.add_parser(
        "mount", help="mount a repo folder read-only (FUSE) for programs that do not use Python",
        description="Mount dagshub://OWNER/REPO[/PATH] read-only at MOUNTPOINT (an empty directory). Reads go "
                    "through streamloader's cache (each file is downloaded once, shared with the hooks and every "
                    "process). Without --foreground the mount runs in a background process and this command "
                    "returns once it answers; remove it with `streamloader umount MOUNTPOINT`. Needs /dev/fuse, "
                    "libfuse (apt-get install fuse3) and pip install 'streamloader[mount]'.")
    parser.add_argument("url", metavar="dagshub://OWNER/REPO[/PATH]",
                        help="the folder to mount (a https://HOST/OWNER/REPO web address works too)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_remote_arguments(parser)
    parser.add_argument("--cache-dir", help="cache directory (default: $STREAMLOADER_CACHE or the user cache dir)")
    parser.add_argument("--foreground", action="store_true",
                        help="serve in this process until Ctrl-C / SIGTERM (then unmount)")
    parser.add_argument("--prefetch-dir-on-open", type=int_at_least(0), default=32, metavar="N",
                        help="when a program opens a folder's files in listing order, download the next N "
                             "in the background (default 32; 0 = off)")
    parser.add_argument("--whole-file-max", type=int_at_least(0), default=None, metavar="BYTES",
                        help="files up to this size are downloaded whole on open, larger ones read by ranges "
                             "(default: the dagshub:// filesystem's, 256 MiB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamloader.fusemount import MountOptions, serve, start

    url, opts = remote_argument(args.url, args)  # (a web address or dagshub://; UsageError for a malformed one)
    options = MountOptions(url, args.mountpoint, branch=opts.get("branch"), revision=opts.get("revision"),
                           host=opts.get("host"), cache_dir=args.cache_dir, read_ahead=args.prefetch_dir_on_open,
                           whole_file_max=args.whole_file_max)
    if args.foreground:
        serve(options)
        return 0
    handle = start(options)
    print(f"Mounted {args.url} at {handle.mountpoint} (process {handle.pid}, log {handle.log_path}); "
          f"unmount with: streamloader umount {handle.mountpoint}")
    return 0
