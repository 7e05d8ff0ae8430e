#!/usr/bin/env python3
"""Train an aesthetic-score predictor on a filtered subset of a LAION-Aesthetics style DagsHub repo.

The DagsHub guide's flow end to end: filter labels.tsv by caption, prefetch the images, precompute image features
(cached on disk: a second run reads them without network or model), train a small MLP, print the validation loss
per epoch. Uses CUDA when present. The built-in extractor is a seeded toy CNN; plug in EfficientNet/CLIP through
``streamloader.data.features.FeatureExtractor`` for real predictions.

    export DAGSHUB_TOKEN=...
    python scripts/train_aesthetic.py --repo-url https://dagshub.com/DagsHub-Datasets/LAION-Aesthetics-V2-6.5plus \\
        --branch main --keyword squirrel --epochs 3
    python scripts/train_aesthetic.py --data-dir ./laion --keyword squirrel        # a local copy
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo-url", help="https://HOST/OWNER/REPO of the dataset repository")
    source.add_argument("--data-dir", help="a local folder holding the repo (labels file and images)")
    parser.add_argument("--branch", default=None, help="branch to read (default: the repo's default branch)")
    parser.add_argument("--revision", default=None, help="commit sha to read (instead of a branch)")
    parser.add_argument("--labels", default="data/labels.tsv", help="labels file inside the repo")
    parser.add_argument("--images", default="data", help="image folder inside the repo")
    parser.add_argument("--keyword", action="append", default=None, help="caption keyword (repeatable: any)")
    parser.add_argument("--exclude", action="append", default=None, help="caption keyword to exclude (repeatable)")
    parser.add_argument("--min-score", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="use the first N matching rows")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--valid-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="streamloader cache root (images and features)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers decoding images for feature extraction (default: min(8, CPUs))")
    parser.add_argument("--no-prefetch", action="store_true", help="stream images on demand instead")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from streamloader.data.train import run_aesthetic_demo
    from streamloader.errors import StreamloaderError

    if args.repo_url:
        from streamloader.remote.urls import RepoRef

        ref = RepoRef.parse(args.repo_url)
        base = f"dagshub://{ref.owner}/{ref.repo}"
        labels, images = f"{base}/{args.labels}", f"{base}/{args.images}"
        options = {"host": ref.host, "branch": args.branch, "revision": args.revision}
    else:
        labels, images = os.path.join(args.data_dir, args.labels), os.path.join(args.data_dir, args.images)
        options = {}
    try:
        result = run_aesthetic_demo(
            labels, images, keywords=args.keyword, exclude=args.exclude, min_score=args.min_score, limit=args.limit,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, valid_fraction=args.valid_fraction,
            seed=args.seed, cache_dir=args.cache_dir, storage_options=options, device=args.device,
            num_workers=args.num_workers, prefetch=not args.no_prefetch, progress=not args.quiet,
            on_epoch=lambda stats: print(stats, flush=True),
        )
    except (StreamloaderError, OSError, ValueError) as exc:
        print(f"train_aesthetic: error: {exc}", file=sys.stderr)
        return 1
    print(f"rows: {result.dataset.filter_result.summary()}")
    if result.prefetch is not None and (result.prefetch.files or result.prefetch.failed):
        print(f"prefetch: {result.prefetch}")
    print(f"features: {result.precompute}")
    print(f"split: {result.train_size} train / {result.valid_size} valid")
    print(f"final valid_loss: {result.train.history[-1].valid_loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
