"""Run under torchrun (gloo): every rank reads the shards the way training and evaluation do.

    torchrun --nproc_per_node 2 tests/workers/shard_reader.py SHARD_DIR OUT_JSON

Training: a collective per batch, as DDP's gradient all-reduce would be; if one rank ran
out of batches before the other, this would hang (the test's timeout catches it).
Evaluation: ranks gather the keys they read; rank 0 writes what it saw.
"""
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.data.shards import TrainStream, eval_pipeline, shard_urls
from pipeline.dist.env import DistInfo


def main(shard_dir: str, out_json: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = TrainStream(shard_urls(shard_dir, "train"), batch_size=3, batches_per_epoch=5,
                         seed=0, rank=rank, num_workers=1, shuffle_buffer=4)
    batches = 0
    train_keys = []
    for epoch in range(2):
        for batch in stream.epoch(epoch):
            step = torch.tensor([1.0])
            dist.all_reduce(step)  # both ranks must be here for every batch
            batches += 1
            train_keys += [s["key"] for s in batch]
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), owns_group=False)
    eval_keys = [s["key"] for s in eval_pipeline(shard_urls(shard_dir, "gallery"), info=info)]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "batches": batches, "train": train_keys, "eval": eval_keys})
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
