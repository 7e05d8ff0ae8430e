"""``streamloader demo``: the DagsHub guide end to end on an embedded server (or on DagsHub itself).

Builds a small synthetic LAION-Aesthetics-style repo, serves it with ``streamloader serve`` on a free 127.0.0.1
port, authenticates with a demo token, hooks it, runs the guide's squirrel filter, prefetches the matches,
precomputes features and trains the aesthetic regressor for a few epochs — printing each step and its figures.
The synthetic images are noise whose brightness sets their score (6.5 dark .. 8.5 bright), so the regressor has
something real to learn and its validation loss falls well below that of predicting the mean score.
With ``--repo-url https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus`` (and DAGSHUB_TOKEN set) the same
steps run against DagsHub.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any, List, Tuple

GUIDE_REPO = ("DagsHub-Datasets", "LAION-Aesthetics-V2-6.5plus")


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo", help="run the DagsHub guide end to end (embedded server + synthetic data by default)",
        description=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--repo-url", help="stream this repository instead of the embedded synthetic one")
    parser.add_argument("--branch", default="main", help="branch (default: main)")
    parser.add_argument("--keyword", default="squirrel", help="caption keyword of the guide's filter")
    parser.add_argument("--images", type=int, default=400, help="synthetic repo size (default 400 images)")
    parser.add_argument("--squirrels", type=int, default=40, help="synthetic captions mentioning squirrels")
    parser.add_argument("--latency", type=float, default=0.02,
                        help="per-request latency the embedded server adds, to feel like a network (default 0.02 s)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N matching rows")
    parser.add_argument("--workdir", help="keep the synthetic repo, project dir and cache here (default: a temp dir)")
    parser.set_defaults(func=run)


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="streamloader-demo-")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    old_cwd = os.getcwd()
    try:
        with ExitStack() as stack:
            repo_url = args.repo_url or _start_embedded(args, workdir, stack)
            _run_guide(args, repo_url, workdir, stack)
    finally:
        os.chdir(old_cwd)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _start_embedded(args: argparse.Namespace, workdir: str, stack: ExitStack) -> str:
    from streamloader.server import ServerFaults, ServerProcess
    from streamloader.synthetic import make_laion_repo

    t0 = time.perf_counter()
    root = os.path.join(workdir, "repo")
    recipe = json.dumps({"images": args.images, "squirrels": args.squirrels, "size": 128, "scores": "brightness"})
    recipe_file, port_file = os.path.join(workdir, "repo-recipe.json"), os.path.join(workdir, "server-port")
    port = 0
    if _read_text(recipe_file) == recipe and os.path.isfile(os.path.join(root, "data", "labels.tsv")):
        # the same files (same commit) at the same address: every file and feature of the last run is a cache hit
        verb = "reused the synthetic LAION-style repo of the last run"
        port = _free_port(_read_text(port_file))
    else:  # a rebuilt repo is a new commit, so nothing of an earlier run's cache would apply
        shutil.rmtree(root, ignore_errors=True)
        make_laion_repo(root, n_images=args.images, n_squirrel=args.squirrels, image_size=(128, 128),
                        scores="brightness")
        with open(recipe_file, "w", encoding="utf-8") as f:
            f.write(recipe)
        verb = "built a synthetic LAION-style repo"
    data = os.path.join(root, "data")
    size = sum(os.path.getsize(os.path.join(data, name)) for name in os.listdir(data))
    _say("1 data", f"{verb}: {args.images} JPEGs + data/labels.tsv, {size / 1e6:.1f} MB, in "
                   f"{time.perf_counter() - t0:.1f} s ({root})")
    _say("1 data", f"the images are random noise; {args.squirrels} captions mention squirrels; each score is "
                   "6.5 + 2 x the image's brightness, so features can predict it (real LAION scores come from "
                   "people; run with --repo-url for the real dataset)")
    token = "demo-" + secrets.token_hex(8)
    server = ServerProcess(root, owner=GUIDE_REPO[0], repo=GUIDE_REPO[1], branch=args.branch, token=token,
                           port=port, faults=ServerFaults(latency=args.latency))
    stack.callback(server.stop)
    server.start()
    with open(port_file, "w", encoding="utf-8") as f:
        f.write(str(server.port))
    _say("2 serve", f"`streamloader serve` is serving it as {GUIDE_REPO[0]}/{GUIDE_REPO[1]} at {server.url} "
                    f"(+{args.latency * 1000:.0f} ms per request)")
    # Exactly what a headless training job does: the token comes from DAGSHUB_TOKEN.
    os.environ["DAGSHUB_TOKEN"] = token
    os.environ["DAGSHUB_CLIENT_HOST"] = server.url
    return server.repo_url


def _free_port(text: str) -> int:
    """``text`` as a port when 127.0.0.1 can bind it now, else 0 (any free port)."""
    import socket

    try:
        port = int(text)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
            probe.bind(("127.0.0.1", port))
        return port
    except (ValueError, OSError, OverflowError):
        return 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _run_guide(args: argparse.Namespace, repo_url: str, workdir: str, stack: ExitStack) -> None:
    from streamloader import filter_labels, install_hooks, prefetch
    from streamloader.auth import resolve_token, validate_token
    from streamloader.remote.urls import RepoRef

    host = RepoRef.parse(repo_url).host
    token = resolve_token(host)
    user = validate_token(token, host)
    _say("3 auth", f"authenticated to {host} as {user.get('login') or user.get('username')!r} "
                   f"(token from {token.source}; never printed)")

    project = os.path.join(workdir, "project")
    os.makedirs(project, exist_ok=True)
    os.chdir(project)
    hook = install_hooks(project_root=".", repo_url=repo_url, branch=args.branch,
                         cache_dir=os.path.join(workdir, "cache"))
    stack.callback(hook.uninstall)
    _say("4 hooks", f"install_hooks(project_root='.', repo_url={repo_url!r}, branch={args.branch!r}) -> "
                    f"commit {hook.revision[:12]}; the empty project dir now lists {sorted(os.listdir('.'))}")

    # The guide's loop, unchanged: plain open() streams data/labels.tsv from the repo.
    t0 = time.perf_counter()
    squirrel_files: List[str] = []
    with open("data/labels.tsv") as f:
        for row in f.readlines():
            image_name, caption = row.split("\t")[:2]
            if args.keyword in caption.lower():
                squirrel_files.append(image_name)
    guide_s = time.perf_counter() - t0
    result = filter_labels("data/labels.tsv", args.keyword, on_error="skip")
    _say("5 filter", f"the guide's loop finds {len(squirrel_files)} images mentioning {args.keyword!r} "
                     f"({guide_s:.2f} s, first read streamed); streamloader.filter_labels: {result.summary()}")
    if len(result.files) != len(squirrel_files):
        _say("5 filter", "the counts differ because some captions contain tabs: the guide's row.split('\\t')[:2] "
                         "drops caption text after a tab, filter_labels keeps it (README: 'Stream a subset')")

    paths = [os.path.join("data", name) for name in result.files][: args.limit]
    warmed = prefetch(paths, max_concurrency=32, progress=sys.stderr.isatty())
    rate = (f" ({warmed.files_per_s:.0f} files/s, 32 requests in flight through the shared cache)"
            if warmed.downloaded else "")
    _say("6 prefetch", f"{len(paths)} images: {warmed}{rate}")
    t0 = time.perf_counter()
    from PIL import Image

    for name in paths:
        Image.open(name).convert("RGB")  # the guide's second loop: now served from the local cache
    _say("6 prefetch", f"Image.open(...).convert('RGB') over all {len(paths)} matches: "
                       f"{time.perf_counter() - t0:.2f} s (cache hits, no network)")

    from streamloader import LaionAestheticsDataset, precompute_features, tiny_cnn_extractor, train_valid_split
    from streamloader.data.train import train_regressor

    dataset = LaionAestheticsDataset("data/labels.tsv", "data", tiny_cnn_extractor(), args.limit,
                                     keywords=args.keyword, cache_dir=os.path.join(workdir, "cache"))
    computed = precompute_features(dataset, batch_size=256, num_workers=2, progress=sys.stderr.isatty())
    _say("7 features", f"TinyCNN demo extractor, batched, images decoded in 2 DataLoader workers: "
                       f"{_features_line(computed)}")
    train_set, valid_set = train_valid_split(dataset, valid_fraction=0.2, seed=0)
    train_set, valid_set = _standardized(train_set, valid_set)
    baseline = _mean_baseline(train_set, valid_set)
    _say("8 train", f"aesthetic regressor (MLP) on {len(train_set)} cached feature vectors (standardized), "
                    f"validating on {len(valid_set)}; predicting the mean score gives validation MSE {baseline:.4f}")
    trained = train_regressor(train_set, valid_set, epochs=args.epochs, batch_size=8, lr=3e-3,
                              on_epoch=lambda st: _say("8 train", str(st)))
    final = trained.history[-1].valid_loss
    _say("8 train", f"final validation MSE {final:.4f} ({final / baseline:.0%} of the mean-score baseline). Swap in "
                    "EfficientNet/CLIP through streamloader.FeatureExtractor for real predictions (README).")


def _features_line(result: Any) -> str:
    """One line on the precompute (PrecomputeResult), without a rate when nothing had to be computed."""
    failed = f", {len(result.failed)} failed" if result.failed else ""
    if not result.computed:
        return f"all {result.cached} feature vectors read from the feature cache, nothing to compute{failed}"
    return (f"{result.computed} computed in {result.seconds:.2f} s ({result.images_per_s:.0f} images/s on "
            f"{result.device}), {result.cached} already in the feature cache{failed}")


class _Standardize:
    """(features, score) items with the features shifted and scaled by the training set's mean and spread."""

    def __init__(self, data: Any, mean: Any, std: Any):
        self.data, self.mean, self.std = data, mean, std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        features, score = self.data[index]
        return (features - self.mean) / self.std, score


def _standardized(train_set: Any, valid_set: Any) -> Tuple[Any, Any]:
    """Standardize both splits with the training set's statistics (a toy CNN's raw features are tiny numbers)."""
    import torch

    stacked = torch.stack([train_set[i][0] for i in range(len(train_set))])
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6) if len(train_set) > 1 else torch.ones(1)
    return _Standardize(train_set, mean, std), _Standardize(valid_set, mean, std)


def _mean_baseline(train_set: Any, valid_set: Any) -> float:
    """Validation MSE of always predicting the training set's mean score."""
    mean = sum(float(train_set[i][1]) for i in range(len(train_set))) / len(train_set)
    return sum((float(valid_set[i][1]) - mean) ** 2 for i in range(len(valid_set))) / max(1, len(valid_set))
