"""One rank of a two-node torchrun job for tests/test_multinode.py (each node: its own server alias and cache).

``torchrun --nnodes 2 --node_rank N --nproc_per_node 2 ... multinode_job.py OUT_DIR``: with gloo, every rank runs
precompute_features (split over all ranks, then over this node's ranks into a second extractor's cache), reads
one epoch of tar shards and its make_splits share, and writes ``OUT_DIR/rank<R>.json`` (tests/_helpers.py).
"""
from __future__ import annotations

import os
import sys

from _helpers import write_rank_report  # tests/ is this script's folder


def main() -> None:
    import torch.distributed as dist

    from streamloader.data.features import tiny_cnn_extractor
    from streamloader.data.laion import LaionAestheticsDataset
    from streamloader.data.precompute import precompute_features
    from streamloader.dataloaders import create_image_embedding_dataloader, get_reader, make_splits

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    repo = "dagshub://user/repo"
    report = {"rank": rank, "node": int(os.environ["GROUP_RANK"])}

    def features(seed: int) -> LaionAestheticsDataset:
        return LaionAestheticsDataset(f"{repo}/laion/data/labels.tsv", f"{repo}/laion/data",
                                      tiny_cnn_extractor(input_size=16, seed=seed))

    # a cache shared by every node: each image once in the cluster (global ranks)
    report["global_computed"] = precompute_features(features(0), num_workers=0, progress=False, device="cpu").computed
    # a cache per node: each node fills its own, split over its local ranks
    local = precompute_features(features(1), num_workers=0, progress=False, device="cpu", rank=local_rank,
                                world_size=local_world)
    report["local_computed"] = local.computed

    loader = create_image_embedding_dataloader(f"{repo}/shards/{{0000..0007}}.tar", f"{repo}/shards/img_emb",
                                               num_workers=2, batch_size=4, shard_width=4, extra_keys=("__key__",))
    report["tar_keys"] = [key for batch in loader for key in batch[-1]]

    image_reader, text_reader = get_reader(False, img_url=f"{repo}/prior/img_emb", txt_url=f"{repo}/prior/text_emb")
    splits = make_splits(False, batch_size=4, num_data_points=image_reader.count, train_split=0.5, eval_split=0.25,
                         image_reader=image_reader, text_reader=text_reader, rank=rank, world_size=world)
    report["prior_rows"] = [[int(v) for v in img[:, 0].tolist()] for split in splits for img, _txt in split]
    report["prior_batches"] = [len(split) for split in splits]

    write_rank_report(sys.argv[1], rank, report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
