"""``streamloader serve DIR``: serve a local folder as a DagsHub repository (for tests, demos and benchmarks).

Example::

    STREAMLOADER_SERVER_TOKEN=t0k streamloader serve ./laion-mini --port 8765
    # Serving ./laion-mini as user/repo at http://127.0.0.1:8765 (repo URL: http://127.0.0.1:8765/user/repo)
    # ... then the two lines to paste into the shell that runs the training code:
    export DAGSHUB_CLIENT_HOST=http://127.0.0.1:8765
    export DAGSHUB_TOKEN="$STREAMLOADER_SERVER_TOKEN"

    # answer like dagshub.com, as a public repo with 540k synthetic JPEGs in data/
    streamloader serve ./repo --dagshub-like --synthetic data=540000 --public

    # with ./images served as the connected S3 bucket my-bucket (.dagshub/storage/s3/my-bucket/... in clients)
    streamloader serve ./repo --storage s3/my-bucket=./images

``--demo-data`` first writes a synthetic LAION-Aesthetics-style repo into DIR (when DIR is empty or missing) and
serves it as DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus, the DagsHub guide's repository.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Dict, Optional

from streamloader.auth import SERVER_TOKEN_ENV as TOKEN_ENV

log = logging.getLogger(__name__)

DEMO_OWNER, DEMO_REPO = "DagsHub-Datasets", "LAION-Aesthetics-V2-6.5plus"
ANY_TOKEN = "any-token"  # what the export line suggests when the server accepts every token


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a local folder as a DagsHub repository (test server)",
        description=(
            "Serve DIR over HTTP as a one-branch DagsHub repository, compatible with streamloader and the official "
            "dagshub client. Binds 127.0.0.1 by default. The token is read from --token or, better (it then stays "
            f"out of the process list), from the {TOKEN_ENV} environment variable; without one, any credentials "
            "are accepted. Runs until interrupted (Ctrl-C / SIGTERM)."
        ),
    )
    parser.add_argument("dir", metavar="DIR", help="folder to serve")
    parser.add_argument("--demo-data", nargs="?", type=int, const=400, default=None, metavar="N",
                        help="first write a synthetic LAION-style repo of N images (default 400) into DIR if it is "
                             "empty or missing, and serve it as the guide's repo "
                             f"{DEMO_OWNER}/{DEMO_REPO} (unless --owner/--repo say otherwise)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=0, help="port (default 0: pick a free one)")
    parser.add_argument("--owner", help="repository owner in URLs (default: user)")
    parser.add_argument("--repo", help="repository name in URLs (default: repo)")
    parser.add_argument("--branch", default="main", help="branch name (default: main)")
    parser.add_argument("--token", default=None, help=f"required access token (prefer the {TOKEN_ENV} env var)")
    parser.add_argument("--storage", action="append", default=[], metavar="PROTOCOL/BUCKET=DIR",
                        help="serve DIR as a connected storage bucket (e.g. s3/my-bucket=./images: listed by "
                             "GET .../storage, read through storage/content and storage/raw); repeatable")
    faults = parser.add_argument_group("fault injection (for robustness tests)")
    faults.add_argument("--latency", type=float, default=0.0, metavar="S", help="delay every answer by S seconds")
    faults.add_argument("--error-rate", type=float, default=0.0, metavar="F", help="fraction of raw answers 5xx")
    faults.add_argument("--throttle-rate", type=float, default=0.0, metavar="F", help="fraction of raw answers 429")
    faults.add_argument("--retry-after", type=float, default=0.0, metavar="S", help="Retry-After of 429 answers")
    faults.add_argument("--drop-rate", type=float, default=0.0, metavar="F",
                        help="fraction of raw downloads cut off after half the body")
    faults.add_argument("--test-knobs", action="store_true",
                        help="enable the unauthenticated /_streamloader/ admin endpoints (counters, live faults)")
    like = parser.add_argument_group(
        "dagshub.com behaviour", "answer the way dagshub.com really does rather than the client-friendly default "
        "(knobs: streamloader/server/mode.py, DagsHubLike)")
    like.add_argument("--dagshub-like", action="store_true",
                      help="turn the mode on: folders list as one unpaged array; sizes are 0 without include_size=true "
                           "(which costs 20 us per entry); a file's content is one object; the root lists a connected "
                           "bucket; files under data/ are DVC-tracked (md5 hashes) and their raw downloads redirect "
                           "(302) to presigned URLs on a second port (403 once expired); Range is ignored; more than "
                           "64 concurrent requests get 429 with Retry-After as an HTTP date")
    like.add_argument("--synthetic", action="append", default=[], metavar="FOLDER=N",
                      help="add N generated JPEGs FOLDER/000000000.jpg ... (never written to disk) to FOLDER; "
                           "repeatable; implies --dagshub-like")
    like.add_argument("--dagshub-knob", action="append", default=[], metavar="NAME=VALUE",
                      help="set one DagsHubLike knob (VALUE as JSON, else a string), e.g. max_in_flight=0, "
                           "ignore_range=false, dvc_paths='[\"data/*.jpg\"]'; repeatable; implies --dagshub-like")
    like.add_argument("--public", action="store_true",
                      help="public repo: requests without an Authorization header may read "
                           "(a wrong token still gets 401)")
    like.add_argument("--anonymous-status", type=int, choices=(401, 404), default=401,
                      help="what a private repo answers requests without credentials (default 401; dagshub.com: 404)")
    parser.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dagshub_like_knobs(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The DagsHubLike knobs the flags ask for (None: mode off); ValueError on a malformed flag."""
    knobs: Dict[str, Any] = {}
    for item in args.dagshub_knob:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--dagshub-knob wants NAME=VALUE, got {item!r}")
        try:
            knobs[name.strip()] = json.loads(text)
        except ValueError:
            knobs[name.strip()] = text
    synthetic: Dict[str, int] = dict(knobs.pop("synthetic", None) or {})
    for item in args.synthetic:
        folder, sep, count = item.rpartition("=")
        if not sep or not count.strip().isdigit():
            raise ValueError(f"--synthetic wants FOLDER=N, got {item!r}")
        synthetic[folder.strip().strip("/")] = int(count)
    if synthetic:
        knobs["synthetic"] = synthetic
    if not (args.dagshub_like or knobs):
        return None
    return knobs


def storage_folders(items: Any) -> Dict[str, str]:
    """``["s3/b=DIR", ...]`` → ``{"s3/b": DIR}``; ValueError on a malformed item or a missing folder."""
    from streamloader.server.storage import bucket_name_ok

    out: Dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not bucket_name_ok(name.strip()):
            raise ValueError(f"--storage wants PROTOCOL/BUCKET=DIR, got {item!r}")
        if not os.path.isdir(folder):
            raise ValueError(f"--storage {name.strip()}: not a directory: {folder}")
        out[name.strip()] = folder
    return out


def _port(text: str) -> int:
    """An argparse ``type=``: a TCP port, 0-65535 (0: pick a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    from streamloader.server import DagsHubLike, DagsHubServer, ServerFaults

    if args.demo_data is not None:
        if args.demo_data < 1:
            print("streamloader serve: error: --demo-data needs at least 1 image", file=sys.stderr)
            return 2
        _write_demo_data(args.dir, args.demo_data)
        args.owner, args.repo = args.owner or DEMO_OWNER, args.repo or DEMO_REPO
    args.owner, args.repo = args.owner or "user", args.repo or "repo"
    if not os.path.isdir(args.dir):
        print(f"streamloader serve: error: not a directory: {args.dir}", file=sys.stderr)
        return 2
    try:
        storage = storage_folders(args.storage)
        faults = ServerFaults(latency=args.latency, error_rate=args.error_rate, throttle_rate=args.throttle_rate,
                              retry_after=args.retry_after, drop_rate=args.drop_rate)
        knobs = dagshub_like_knobs(args)
        mode: Optional[DagsHubLike] = None
        if knobs is not None:
            mode = DagsHubLike()
            mode.update(knobs)
    except ValueError as exc:
        print(f"streamloader serve: error: {exc}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(args.host):
        log.warning("binding %s exposes %s to the network%s", args.host, args.dir,
                    "" if token else " WITHOUT any token")
    server = DagsHubServer(args.dir, owner=args.owner, repo=args.repo, branch=args.branch, token=token,
                           host=args.host, port=args.port, faults=faults, test_knobs=args.test_knobs,
                           dagshub_like=mode, anonymous_read=args.public, anonymous_status=args.anonymous_status,
                           storage=storage)
    stop = threading.Event()

    def _request_stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    try:
        print(f"Serving {args.dir} as {args.owner}/{args.repo} at {server.url} (repo URL: {server.repo_url})",
              flush=True)
        if mode is not None:
            extra = "".join(f", {n} synthetic files in {f or '/'}" for f, n in sorted(mode.synthetic.items()))
            print(f"dagshub-like mode: presigned downloads from {server.presigned_origin or '(off)'}{extra}"
                  f"{'; public' if args.public else ''}", flush=True)
        print(_client_setup(server.url, server.repo_url, args.branch, args.token, token), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _write_demo_data(directory: str, n_images: int) -> None:
    """Fill an empty or missing ``directory`` with a synthetic LAION-style repo; leave a non-empty one alone."""
    if os.path.isdir(directory) and os.listdir(directory):
        log.info("--demo-data: %s is not empty, serving it as it is", directory)
        return
    import time

    from streamloader.synthetic import make_laion_repo

    started = time.perf_counter()
    repo = make_laion_repo(directory, n_images=n_images, n_squirrel=max(1, n_images // 10), image_size=(128, 128),
                           scores="brightness")
    print(f"wrote a synthetic LAION-style repo into {directory}: {len(repo.files)} JPEGs + data/labels.tsv, "
          f"{len(repo.squirrel_files)} squirrel captions, scores follow image brightness "
          f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


def _client_setup(url: str, repo_url: str, branch: str, token_option: Any, token: Any) -> str:
    """The lines that point streamloader and the dagshub client at this server (never the token itself)."""
    if not token:
        value, note = ANY_TOKEN, "  # this server accepts any token"
    elif token_option:
        value, note = "<the --token value>", ""
    else:
        value, note = f'"${TOKEN_ENV}"', ""
    return ("Point streamloader and the dagshub client at it (in the shell that runs your code):\n"
            f"  export DAGSHUB_CLIENT_HOST={url}\n"
            f"  export DAGSHUB_TOKEN={value}{note}\n"
            f"then: install_hooks(project_root='.', repo_url='{repo_url}', branch='{branch}'). Ctrl-C stops it.")
