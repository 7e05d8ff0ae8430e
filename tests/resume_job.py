"""A training job's data loop for tests/test_resume.py, run as a real process (killed with SIGKILL, then resumed).

``python resume_job.py CONFIG.json``. Phase "first" checkpoints ``{"keys", "loader"}`` atomically after every
batch (as a training loop saves model + loader state) and prints READY after ``stop_after`` batches, then waits
to be killed. Phase "resume" loads the checkpoint into a fresh StatefulDataLoader, finishes the epoch and writes
``{"before", "after", "io"}`` as ``OUT/rank<R>.json`` (tests/_helpers.py). With ``ranks`` > 1 every rank (gloo,
forked by torch.multiprocessing) does the same with its own files.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict

from _helpers import write_rank_report  # tests/ is this script's folder


def _dataset(config: Dict[str, Any]) -> Any:
    if config["kind"] == "tar":
        from streamloader.data.tar_embeddings import ImageEmbeddingDataset

        return ImageEmbeddingDataset(config["tar_url"], config["emb_url"], shard_width=4, extra_keys=("__key__",),
                                     shuffle_num=config.get("shuffle_num", 0), seed=7)
    from streamloader.data.laion import LaionAestheticsDataset

    class Keyed(LaionAestheticsDataset):  # items also carry their file name, to check what was delivered
        def __getitem__(self, idx: Any) -> Any:
            image, score = super().__getitem__(idx)
            return image, score, self.files[int(idx)]

    return Keyed("dagshub://user/repo/data/labels.tsv", "dagshub://user/repo/data",
                 storage_options={"host": config["host"], "skip_instance_cache": True})


def run(rank: int, config: Dict[str, Any]) -> None:
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    ranks = config.get("ranks", 1)
    if ranks > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(config["port"]))
        dist.init_process_group("gloo", rank=rank, world_size=ranks)
    dataset = _dataset(config)
    options: Dict[str, Any] = {"batch_size": config["batch_size"], "num_workers": config["workers"]}
    if config["kind"] == "laion":
        options["shuffle"] = True
        options["generator"] = torch.Generator().manual_seed(3)
    loader = StatefulDataLoader(dataset, **options)
    ckpt = f"{config['ckpt']}.{rank}"
    if config["phase"] == "first":
        keys: list = []
        for number, batch in enumerate(loader, 1):
            keys += list(batch[-1])
            torch.save({"keys": keys, "loader": loader.state_dict()}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
            if number == config["stop_after"]:
                print("READY", flush=True)
                time.sleep(120)  # the test kills us long before; never wait forever
        raise SystemExit("the epoch ended before stop_after batches")
    saved = torch.load(ckpt, weights_only=True)
    loader.load_state_dict(saved["loader"])
    after = [key for batch in loader for key in batch[-1]]
    write_rank_report(config["out"], rank, {"before": saved["keys"], "after": after,
                                            "io": getattr(dataset, "io_stats", {})})


def main() -> None:
    config = json.load(open(sys.argv[1]))
    if config.get("ranks", 1) > 1:
        import torch.multiprocessing as mp

        # fork: the ranks start in milliseconds instead of importing torch again each
        mp.start_processes(run, args=(config,), nprocs=config["ranks"], start_method="fork")
    else:
        run(0, config)


if __name__ == "__main__":
    main()
