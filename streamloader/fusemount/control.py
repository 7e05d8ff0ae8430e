"""Making and removing mounts: checks with clear errors, the foreground server, the background process, umount.

``serve()`` runs the mount in this process until it is unmounted or gets SIGINT/SIGTERM (libfuse's handlers then
unmount cleanly). ``start()`` runs ``streamloader mount --foreground`` as a detached child process and returns
once the mount answers (or raises the child's own error message); ``mount()`` wraps that in a context manager.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from streamloader.errors import MountError

log = logging.getLogger(__name__)

__all__ = ["MountOptions", "MountHandle", "check_fuse", "check_mountpoint", "is_mounted", "load_binding", "serve",
           "start", "unmount", "mount"]

FUSE_DEVICE = "/dev/fuse"
START_TIMEOUT = 60.0  # seconds a background mount may take to answer


@dataclass
class MountOptions:
    """What to mount where: ``url`` is ``dagshub://OWNER/REPO[/PATH]`` (see ``streamloader mount --help``)."""

    url: str
    mountpoint: str
    branch: Optional[str] = None
    revision: Optional[str] = None
    host: Optional[str] = None
    cache_dir: Optional[str] = None
    read_ahead: int = 32
    whole_file_max: Optional[int] = None
    fuse_options: Dict[str, Any] = field(default_factory=dict)

    def argv(self) -> List[str]:
        """``streamloader mount`` arguments that run these options in the foreground (no token in them)."""
        args = ["mount", self.url, self.mountpoint, "--foreground", "--prefetch-dir-on-open", str(self.read_ahead)]
        for flag, value in (("--branch", self.branch), ("--revision", self.revision), ("--host", self.host),
                            ("--cache-dir", self.cache_dir), ("--whole-file-max", self.whole_file_max)):
            if value is not None:
                args += [flag, str(value)]
        return args


# -- checks ---------------------------------------------------------------------------------------------------------
def load_binding() -> Any:
    """Import mfusepy (which loads libfuse); a missing package or library becomes a MountError saying what to do."""
    if not sys.platform.startswith("linux"):
        raise MountError(f"streamloader mount needs Linux with FUSE (this is {sys.platform}); use the hooks instead")
    from ctypes.util import find_library

    # mfusepy picks libfuse 2 when both are installed; prefer 3 (bigger reads, maintained) unless told otherwise
    prefer3 = not (os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME")) \
        and "mfusepy" not in sys.modules and find_library("fuse3")
    if prefer3:
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        import mfusepy
    except ImportError:
        raise MountError("the mount needs the mfusepy package: pip install 'streamloader[mount]'") from None
    except (OSError, AttributeError) as exc:  # mfusepy loads libfuse when imported
        raise MountError(f"libfuse is missing or unusable ({exc}); install it from the OS packages, e.g. "
                         "`apt-get install fuse3` (or run scripts/setup.sh as root)") from None
    finally:
        if prefer3:
            os.environ.pop("FUSE_LIBRARY_NAME", None)
    return mfusepy


def check_fuse(device: str = FUSE_DEVICE) -> None:
    """Raise MountError unless this process can mount: the FUSE device, and fusermount when not root."""
    if not os.path.exists(device):
        raise MountError(f"{device} is missing: this machine or container has no FUSE device (a container needs "
                         "--device /dev/fuse --cap-add SYS_ADMIN, or run the mount on the host)")
    try:
        os.close(os.open(device, os.O_RDWR))
    except OSError as exc:
        raise MountError(f"cannot open {device} ({exc.strerror}): this user may not use FUSE here") from None
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        raise MountError("fusermount3 is missing (non-root mounts need it): install the fuse3 OS package")


def _mount_table() -> List[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) > 1:  # octal escapes for blanks, as the kernel writes them
            points.append(parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                          .replace("\\134", "\\"))
    return points


def is_mounted(mountpoint: str) -> bool:
    """Whether something (alive or dead) is mounted at ``mountpoint`` (from /proc/self/mounts)."""
    return os.path.abspath(mountpoint) in _mount_table()


def check_mountpoint(mountpoint: str) -> str:
    """The absolute mount point, if it is an empty directory with nothing mounted on it; else a MountError."""
    path = os.path.abspath(os.path.expanduser(mountpoint))
    if is_mounted(path):
        try:
            os.scandir(path).close()  # asks the file system (a stat may be answered from the kernel's cache)
            state = "busy: something is already mounted there"
        except OSError:
            state = "a dead mount (its process is gone)"
        raise MountError(f"mount point {path} is {state}; run `streamloader umount {path}` first")
    if not os.path.isdir(path):
        raise MountError(f"mount point {path} is not a directory" if os.path.exists(path)
                         else f"mount point {path} does not exist (create an empty directory first)")
    if os.listdir(path):
        raise MountError(f"mount point {path} is not empty (the mount would hide its files): use an empty directory")
    return path


# -- the foreground server ------------------------------------------------------------------------------------------
def _build_repo(options: MountOptions) -> Any:
    from streamloader.cache import FileCache
    from streamloader.remote.client import DagsHubClient
    from streamloader.remote.repo import RemoteRepo
    from streamloader.remote.urls import RepoRef, normalize_host, split_repo_path

    url = options.url
    if not url.startswith("dagshub://"):
        raise ValueError(f"expected dagshub://OWNER/REPO[/PATH], got {url!r}")
    owner, name, path = split_repo_path(url[len("dagshub://"):])
    host = normalize_host(options.host) if options.host else None
    client = DagsHubClient(RepoRef.parse(f"{owner}/{name}", host=host), branch=options.branch,
                           revision=options.revision)
    repo = RemoteRepo(client, FileCache(options.cache_dir))
    repo.revision()
    if not repo.info(path).is_dir:
        raise MountError(f"{url} is a file; mount a folder (or the whole repo)")
    return repo, path


def serve(options: MountOptions) -> None:
    """Mount in this process and serve until unmounted or SIGINT/SIGTERM (then unmount cleanly)."""
    mfusepy = load_binding()
    check_fuse()
    mountpoint = check_mountpoint(options.mountpoint)
    repo, root = _build_repo(options)
    mtime = None
    if not repo.offline:
        try:
            mtime = repo.client.commit_time()
        except Exception as exc:  # noqa: BLE001 - the time is cosmetic: fall back to the mount's start
            log.debug("no commit time: %s", exc)
    from streamloader.fusemount.ops import RepoFUSE, RepoOperations
    from streamloader.remote.filesystem import WHOLE_FILE_MAX

    ops = RepoOperations(repo, root, whole_file_max=options.whole_file_max or WHOLE_FILE_MAX,
                         read_ahead=max(0, options.read_ahead), mtime=mtime)
    fuse_options = {"ro": True, "fsname": f"streamloader:{repo.client.ref.owner}/{repo.client.ref.repo}",
                    "subtype": "streamloader", "default_permissions": True, "kernel_cache": True,
                    "attr_timeout": 3600, "entry_timeout": 3600, "negative_timeout": 3600,
                    **options.fuse_options}
    log.info("mounting %s at %s (commit %s)", options.url, mountpoint, repo.revision())
    try:
        RepoFUSE(ops, mountpoint, foreground=True, nothreads=False, **fuse_options)
    except RuntimeError as exc:  # libfuse exits with 1 after SIGINT/SIGTERM too: only a mount never made fails
        if not ops.started:
            raise MountError(f"libfuse could not mount {mountpoint} (status {exc}); see its message above") from None
    log.info("unmounted %s", mountpoint)


# -- background mounts ----------------------------------------------------------------------------------------------
class MountHandle:
    """A mount served by a child process (see :func:`start`); ``unmount()`` removes it and ends the process."""

    def __init__(self, mountpoint: str, process: subprocess.Popen, log_path: str):
        self.mountpoint, self.process, self.log_path = mountpoint, process, log_path

    def __repr__(self) -> str:
        return f"MountHandle({self.mountpoint!r}, pid={self.process.pid})"

    @property
    def pid(self) -> int:
        return self.process.pid

    def unmount(self, timeout: float = 30.0) -> None:
        """SIGTERM the mount process (libfuse unmounts on it) and wait; force a lazy unmount if that fails."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if is_mounted(self.mountpoint):
            unmount(self.mountpoint, lazy=True)

    def __enter__(self) -> "MountHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unmount()


def _log_tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


def start(options: MountOptions, token: Optional[str] = None, timeout: float = START_TIMEOUT,
          log_path: Optional[str] = None) -> MountHandle:
    """Run the mount in a detached child process; return once it is mounted (MountError with its message if not)."""
    load_binding()
    check_fuse()
    mountpoint = check_mountpoint(options.mountpoint)
    options = MountOptions(**{**options.__dict__, "mountpoint": mountpoint})
    env = dict(os.environ)
    env.setdefault("STREAMLOADER_NONINTERACTIVE", "1")  # nobody can answer a login prompt in a detached process
    if token:
        env["DAGSHUB_TOKEN"] = token  # the environment, never argv (process lists show argv)
    own_log = log_path is None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="streamloader-mount-", suffix=".log")
        os.close(fd)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "streamloader", *options.argv()], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if process.poll() is not None:
            message = _log_tail(log_path) or f"the mount process exited with status {process.returncode}"
            if own_log:
                with contextlib.suppress(OSError):
                    os.unlink(log_path)
            raise MountError(message.replace("streamloader mount: error: ", ""))
        if time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise MountError(f"{mountpoint} was not mounted within {timeout:.0f} s (log: {log_path})")
        time.sleep(0.02)
    return MountHandle(mountpoint, process, log_path)


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount a FUSE mount (also a dead one whose process was killed); MountError if it is busy or not mounted."""
    path = os.path.abspath(os.path.expanduser(mountpoint))
    if not is_mounted(path):
        raise MountError(f"nothing is mounted at {path}")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    elif os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount"] + (["-l"] if lazy else []) + [path]
    else:
        raise MountError("cannot unmount: fusermount3 is missing (install the fuse3 OS package)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MountError(f"unmounting {path} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        hint = "" if lazy else " (a process may be using it: close it, or use --lazy)"
        raise MountError(f"could not unmount {path}: {detail[-1] if detail else proc.returncode}{hint}")


@contextlib.contextmanager
def mount(url: str, mountpoint: str, *, branch: Optional[str] = None, revision: Optional[str] = None,
          host: Optional[str] = None, token: Optional[str] = None, cache_dir: Optional[str] = None,
          prefetch_dir_on_open: int = 32, whole_file_max: Optional[int] = None,
          timeout: float = START_TIMEOUT) -> Iterator[MountHandle]:
    """Mount ``dagshub://OWNER/REPO[/PATH]`` read-only at ``mountpoint`` (an empty directory) for the block.

    The mount runs in a background process and is unmounted on exit, so any program (C/C++ readers, shell tools)
    can read the files while the block runs, sharing streamloader's cache. ``prefetch_dir_on_open``: files read
    ahead when a program opens a folder's files in listing order (0 = off); ``whole_file_max``: files up to this
    size are downloaded whole on open, larger ones read by HTTP ranges (default 256 MiB). The token (if given)
    reaches the mount process through its environment, never its command line::

        with streamloader.mount("dagshub://user/repo/data", "/mnt/data"):
            subprocess.run(["tar", "cf", "/tmp/data.tar", "-C", "/mnt/data", "."], check=True)
    """
    options = MountOptions(url, mountpoint, branch=branch, revision=revision, host=host, cache_dir=cache_dir,
                           read_ahead=prefetch_dir_on_open, whole_file_max=whole_file_max)
    handle = start(options, token=token, timeout=timeout)
    try:
        yield handle
    finally:
        handle.unmount()
        with contextlib.suppress(OSError):
            os.unlink(handle.log_path)
