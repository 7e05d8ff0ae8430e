"""``streamloader mount``: a read-only FUSE mount of a repo folder, for readers that bypass Python's hooks.

C/C++ readers (cv2.imread, TensorFlow, DALI, ffmpeg, tar, rsync) open files through the kernel, where the hooks
cannot see them; the mount serves them the same verified cache (one download per file for the mount, the hooks
and every process), real sizes, the commit's time, concurrent reads and folder read-ahead::

    with streamloader.mount("dagshub://user/repo/data", "/mnt/data"):
        subprocess.run("find /mnt/data -name '*.jpg' | xargs -P 8 cat > /dev/null", shell=True, check=True)

Layout: :mod:`.control` (checks, foreground server, background process, umount), :mod:`.ops` (the FUSE
operations; imports libfuse through mfusepy), :mod:`.readahead` (prefetch of the next files of a folder).
Needs Linux, ``/dev/fuse``, libfuse (``apt-get install fuse3``) and ``pip install 'streamloader[mount]'``.
"""
from streamloader.fusemount.control import (MountHandle, MountOptions, check_fuse, check_mountpoint, is_mounted,
                                            load_binding, mount, serve, start, unmount)

__all__ = ["mount", "unmount", "MountHandle", "MountOptions", "check_fuse", "check_mountpoint", "is_mounted",
           "load_binding", "serve", "start"]
