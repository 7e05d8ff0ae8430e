"""Stream a DagsHub repository through unchanged file-access code: ``open``, ``os.stat``, ``os.listdir``,
``os.scandir``, ``os.walk``, ``glob``, ``pathlib``, PIL, numpy, pandas, tarfile.

A drop-in for ``dagshub.streaming.install_hooks`` (same parameter names)::

    from streamloader import install_hooks
    install_hooks(project_root=".", repo_url="https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus",
                  branch="main")
    with open("data/labels.tsv") as f:        # not on disk: read from the repo at the pinned commit, via the cache
        rows = f.readlines()

Rules: under ``project_root`` a path that exists locally is served locally; one that does not is looked up in the
repository (``exclude_globs``, ``.git``, ``.dvc`` and ``site-packages`` never are); paths outside every hooked root
never cause any network access. Listings are the union of local and remote entries, writes always go to local
files. Hooks follow DataLoader workers started with ``fork`` and with ``spawn`` (see :mod:`.spawn`).
Paths are mapped lexically (POSIX), relative ones against the cwd at the time of the call.
"""
from __future__ import annotations

from streamloader.hooks.install import hooked_roots, install_hooks, uninstall_hooks
from streamloader.hooks.router import HookedRoot
from streamloader.hooks.spawn import ENV_VAR, activate_from_env

__all__ = ["install_hooks", "uninstall_hooks", "activate_from_env", "hooked_roots", "HookedRoot", "ENV_VAR"]
