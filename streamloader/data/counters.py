"""Named integer counters that DataLoader workers add to and the parent process reads (skip counts, stats).

Shared memory, not messages: a worker's ``add`` is visible at once in the parent and in the other workers, with
any ``multiprocessing`` start method::

    counters = SharedCounters(("missing_image", "decode_error"))
    counters.add("missing_image")            # in a DataLoader worker
    counters.as_dict()                       # in the parent: {"missing_image": 1, "decode_error": 0}
"""
from __future__ import annotations

import multiprocessing
from multiprocessing.context import get_spawning_popen
from typing import Any, Dict, List, Sequence

__all__ = ["SharedCounters"]


def _shared_array(values: List[int]) -> Any:
    # A spawn-context lock also works in forked children; a fork-context one cannot go to spawned workers.
    return multiprocessing.get_context("spawn").Array("q", values, lock=True)


class SharedCounters:
    """Named int64 counters shared by the DataLoader workers of one process tree.

    Backed by a ``multiprocessing.Array`` so counts made in worker processes are visible in the parent. Pickled
    outside of process spawning (``copy.deepcopy``, ``pickle.dumps``) it degrades to a detached snapshot.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._share(_shared_array([0] * len(self.names)))

    def _share(self, values: Any) -> None:
        # the synchronized wrapper's own indexing takes its lock once more per access: under our one ``with lock``
        # the raw shared array is read and written directly (one lock round trip per add, not three)
        self._values, self._raw, self._lock = values, values.get_obj(), values.get_lock()

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        i = self._index[name]
        with self._lock:
            self._raw[i] += n

    def set(self, name: str, value: int) -> None:
        """Set counter ``name`` to ``value``."""
        with self._lock:
            self._raw[self._index[name]] = value

    def get(self, name: str) -> int:
        """Current value of counter ``name``."""
        with self._lock:
            return int(self._raw[self._index[name]])

    def as_dict(self) -> Dict[str, int]:
        """Snapshot of all counters."""
        with self._lock:
            return {name: int(self._raw[i]) for i, name in enumerate(self.names)}

    def reset(self) -> None:
        """Set every counter to zero."""
        with self._lock:
            for i in range(len(self.names)):
                self._raw[i] = 0

    def __getstate__(self) -> Dict[str, Any]:
        if get_spawning_popen() is not None:  # handing over to a child process: share the memory
            return {"names": self.names, "values": self._values}
        return {"names": self.names, "snapshot": list(self.as_dict().values())}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.names = state["names"]
        self._index = {name: i for i, name in enumerate(self.names)}
        self._share(state["values"] if "values" in state else _shared_array(state["snapshot"]))
