"""Hooks follow the process into its children, without the user doing anything.

- ``fork``: the child inherits the patched functions and the registry as they are (the client rebuilds its HTTP
  session per pid).
- ``spawn`` / ``forkserver`` (e.g. ``DataLoader(..., multiprocessing_context="spawn")``): while hooks are installed,
  ``multiprocessing.spawn.get_preparation_data`` adds one entry to the data every new process receives first. That
  entry unpickles as a call to :func:`_activate`, which re-installs the parent's hooks in the child before it
  re-imports ``__main__`` and before it unpickles its target (the Dataset). The pickled hooks carry the parent's
  pinned commit sha, its listings and its token (through the pipe, never the environment), so every worker reads
  the same snapshot with no extra request.
- any other Python child (``subprocess``): :data:`ENV_VAR` holds the hooks' configuration as JSON (no token;
  the child finds its own from ``DAGSHUB_TOKEN`` or the dagshub token cache). The child opts in with
  ``streamloader.hooks.activate_from_env()``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, List

from streamloader.errors import DataFormatError

if TYPE_CHECKING:
    from streamloader.hooks.router import HookedRoot

log = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "PREPARATION_KEY", "activate_from_env", "export_env", "wrap_get_preparation_data"]

ENV_VAR = "STREAMLOADER_HOOKS"
PREPARATION_KEY = "streamloader_hooks"


class _Activation:
    """Unpickles as ``_activate(hooks)``: the child installs the hooks while it reads its preparation data."""

    __slots__ = ("hooks",)

    def __init__(self, hooks: List["HookedRoot"]):
        self.hooks = hooks

    def __reduce__(self) -> Any:
        return _activate, (self.hooks,)


def _activate(hooks: List["HookedRoot"]) -> None:
    """Install hooks received from the parent process (runs in a freshly spawned child)."""
    from streamloader.hooks.install import adopt  # the lifecycle ships itself: see tests/test_layers.py

    for hook in hooks:
        adopt(hook)


def wrap_get_preparation_data(original: Callable[..., Any]) -> Callable[..., Any]:
    """``multiprocessing.spawn.get_preparation_data`` that also ships the active hooks to the child."""

    def get_preparation_data(name: str, *args: Any, **kwargs: Any) -> Any:
        data = original(name, *args, **kwargs)
        from streamloader.hooks.router import hooked

        hooks = hooked()
        if hooks and isinstance(data, dict):
            # prepare() in the child ignores keys it does not know; unpickling this one is what installs the hooks
            data[PREPARATION_KEY] = _Activation(hooks)
        return data

    get_preparation_data.__wrapped__ = original  # type: ignore[attr-defined]
    return get_preparation_data


def export_env(hooks: List["HookedRoot"]) -> None:
    """Publish the active hooks' configuration (no token) in :data:`ENV_VAR`, or remove it when there is none."""
    if hooks:
        os.environ[ENV_VAR] = json.dumps([hook.config.to_json() for hook in hooks], sort_keys=True)
    else:
        os.environ.pop(ENV_VAR, None)


def activate_from_env() -> List["HookedRoot"]:
    """Install the hooks a parent process published in ``$STREAMLOADER_HOOKS``; [] when it is unset.

    For Python processes started with ``subprocess`` by a process that had hooks installed::

        from streamloader.hooks import activate_from_env
        activate_from_env()
        open("data/labels.tsv")        # streams from the parent's repository at the parent's commit
    """
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return []
    from streamloader.hooks.install import install_config
    from streamloader.hooks.router import HookConfig

    try:
        items = json.loads(raw)
        configs = [HookConfig.from_json(item) for item in items]
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataFormatError(f"${ENV_VAR} does not hold a valid hooks configuration ({type(exc).__name__})") from None
    return [install_config(config, inherited=True) for config in configs]
