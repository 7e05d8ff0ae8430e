"""Fixture-free helpers shared by the test modules and by the processes they start (no pytest import).

The fixtures and the test-repo builders are in tests/conftest.py; what is here can also be imported by a job
script or a spawned worker (``tests/`` is on their ``sys.path``: it is their script's folder, or inherited).

Hashes
    git_blob_sha1(data)     the git blob id of some bytes: the server's listing hash of a git-tracked file
    git_key(data)           the cache's "git" CacheKey of a file with these bytes
Processes
    child_pids(pid)         the live (not zombie) child processes of ``pid``, from /proc
Jobs (a real training job in its own processes: tests/resume_job.py, tests/multinode_job.py)
    free_port()             a TCP port free on 127.0.0.1 just now (for a gloo / torchrun rendezvous)
    job_env(cache, ...)     the environment of a job: this checkout first on PYTHONPATH, its own cache, a token
    start_job(argv, env)    ``python argv...`` in a new session (so the whole job can be killed), output piped
    finish_job(proc)        wait for a job; assert it succeeded (with the tail of its output); returns the output
    write_rank_report / rank_reports   each rank's JSON report in a folder: written by a rank, read by the test
    gather_from_gloo_ranks(dir, body, world, *args)   ``work(rank, world, *args)`` of ``body`` in ``world`` gloo
                            ranks (torch.multiprocessing.spawn, fresh interpreter); what each rank returned
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

_CHECKOUT = str(Path(__file__).resolve().parents[1])  # the tree under test, whatever is installed


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data``: sha1 of ``b"blob <size>\\0" + data`` (what git and DagsHub list as its hash)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_key(data: bytes) -> Any:
    """The cache key of a git-tracked file with these bytes (``CacheKey.from_hash("git", git_blob_sha1(data))``)."""
    from streamloader.cache import CacheKey

    return CacheKey.from_hash("git", git_blob_sha1(data))


def child_pids(pid: int) -> List[int]:
    """Pids of the live (not zombie) child processes of ``pid``, read from /proc (Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


@contextlib.contextmanager
def held_by_another_thread(*locks: ContextManager[Any]) -> Iterator[None]:
    """Another thread is inside ``locks`` (entered in order) for the whole block: what a fork meanwhile inherits
    (the child has no thread that would ever release them)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10), "the holding thread never got the locks"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(cache: PathLike, token: str, **extra: str) -> Dict[str, str]:
    """``os.environ`` plus DAGSHUB_TOKEN=token, STREAMLOADER_CACHE=cache, OMP_NUM_THREADS=1 (ranks share two
    cores), this checkout first on PYTHONPATH, and ``extra``."""
    pythonpath = os.pathsep.join(p for p in (_CHECKOUT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "DAGSHUB_TOKEN": token, "STREAMLOADER_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": pythonpath, **extra}


def start_job(argv: Sequence[PathLike], env: Dict[str, str], merge_stderr: bool = False) -> subprocess.Popen:
    """``sys.executable argv...`` with ``env``, in a session of its own (``kill_job`` ends all its processes);
    stdout and stderr are piped as text (``merge_stderr``: stderr into stdout)."""
    return subprocess.Popen([sys.executable, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            start_new_session=True, stdin=subprocess.DEVNULL)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group (every rank and worker) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def finish_job(proc: subprocess.Popen, timeout: float) -> str:
    """Wait up to ``timeout`` s for a job (killed past it); assert it exited 0; returns its stdout (+ stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        raise AssertionError(f"the job ran past {timeout} s: {(out or '')[-2000:]}{(err or '')[-3000:]}")
    output = (out or "") + (err or "")
    assert proc.returncode == 0, f"the job failed ({proc.returncode}): {output[-4000:]}"
    return output


def write_rank_report(out_dir: PathLike, rank: int, report: Dict[str, Any]) -> None:
    """A rank's report: ``out_dir/rank<R>.json`` (written whole, then renamed into place)."""
    path = os.path.join(str(out_dir), f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, **report}, f)
    os.replace(path + ".tmp", path)


def rank_reports(out_dir: PathLike, ranks: Optional[int] = None) -> List[Dict[str, Any]]:
    """The reports of ranks 0..ranks-1 in ``out_dir`` (default: every ``rank*.json`` there), in rank order."""
    folder = Path(out_dir)
    if ranks is None:
        ranks = len(list(folder.glob("rank*.json")))
    missing = [r for r in range(ranks) if not (folder / f"rank{r}.json").exists()]
    assert ranks and not missing, f"no report from ranks {missing or 'any'} in {folder}"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(ranks)]


_GLOO_HARNESS = """
import datetime, json, os, sys
import torch.distributed as dist
import torch.multiprocessing as mp

{body}

def _rank(rank, world, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    mine = work(rank, world, *args)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mp.spawn(_rank, args=(world, port, out, sys.argv[4:]), nprocs=world)
"""


def gather_from_gloo_ranks(folder: PathLike, body: str, world: int, *args: str, timeout: float = 120) -> List[Any]:
    """Run ``work(rank, world, *args)`` (defined by the source ``body``; ``args`` are strings) in ``world`` ranks of
    a gloo process group on 127.0.0.1, started by ``torch.multiprocessing.spawn`` in a fresh interpreter; returns
    what each rank's ``work`` returned (JSON), by rank. A failing rank fails the run (CalledProcessError)."""
    script, out = Path(folder) / "gloo_ranks.py", Path(folder) / "gloo_ranks.json"
    script.write_text(_GLOO_HARNESS.format(body=body))
    subprocess.run([sys.executable, str(script), str(world), str(free_port()), str(out), *map(str, args)],
                   check=True, timeout=timeout)
    return json.loads(out.read_text())
