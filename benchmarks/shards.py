"""Decode throughput: WebDataset shard reader vs a folder-of-JPEGs map-style loader, same images.

    .venv/bin/python benchmarks/shards.py --images 2000 --size 256 --workers 2

Renders ``--images`` synthetic vehicles at ``--size`` px (the real renderer), shards them
with the shard stage's writer, then times one full pass of each reader through a
``torch.utils.data.DataLoader`` with ``--workers`` processes. Both decode every JPEG
to an RGB array (and the label PNG where there is one); files are read once before
timing so both run from the page cache (the shards' real gain, sequential reads on
shared or remote storage, does not show on a local disk). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import SynthConfig
from pipeline.data.shards import ShardOptions, decode_sample, eval_pipeline, shard_urls, write_shards
from pipeline.data.sources import read_synthetic
from pipeline.data.synthetic import render_dataset


class FolderDataset(torch.utils.data.Dataset):
    """The usual map-style loader: one file open + decode per image (and its label PNG)."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        with Image.open(rec.image) as im:
            image = np.array(im.convert("RGB"))
        mask = None
        if rec.label is not None:
            with Image.open(rec.label) as im:
                mask = np.array(im)
        return {"key": rec.key, "image": image, "mask": mask}


def timed_pass(dataset, workers: int) -> tuple[int, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         collate_fn=lambda s: s)
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return count, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="approximate number of training images")
    ap.add_argument("--size", type=int, default=256, help="render size, px")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ids = max(4, args.images // 10)  # about 10 images per identity with the settings below
    cfg = SynthConfig(train_ids=ids, test_ids=2, cameras=8, cameras_per_id=(4, 4),
                      images_per_camera=(2, 3), image_size=args.size, label_fraction=0.5, workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        render_dataset(cfg, root, seed=0)
        records = read_synthetic(root)["train"]
        workers = max(1, args.workers)
        write_shards({"train": records}, Path(tmp) / "shards", ShardOptions(samples_per_shard=250,
                     min_shards=2 * workers), seed=0, workers=2)
        urls = shard_urls(Path(tmp) / "shards", "train")
        for path in [*urls, *(r.image for r in records)]:
            Path(path).read_bytes()  # page cache, for both
        rows = []
        for name, make in (("WebDataset shards", lambda: eval_pipeline(urls, map_fn=decode_sample)),
                           ("folder of JPEGs (map-style)", lambda: FolderDataset(records))):
            for _ in range(args.repeats):
                count, seconds = timed_pass(make(), args.workers)
                rows.append((name, count, seconds))
    print(f"| reader | images | seconds | images/s |  (size {args.size} px, {args.workers} workers)")
    print("| --- | ---: | ---: | ---: |")
    for name, count, seconds in rows:
        print(f"| {name} | {count} | {seconds:.2f} | {count / seconds:.0f} |")


if __name__ == "__main__":
    main()
