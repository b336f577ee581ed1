"""Embedding extraction from masked shards, one rank or many, and the on-disk embedding files.

Under torchrun each rank embeds the shards ``rank::world_size`` of a split and writes
one part file per shard into a staging folder on the (shared) filesystem; after a
barrier rank 0 concatenates the parts in manifest order. The result is the same
array, in the same order, as a single process would produce, and no rank ever holds
another rank's features in memory (VERI-Wild's gallery is 128k images).

On disk, per split ``<dir>/<split>/``: ``global.npy`` (N, C) float32, ``local.npy``
(N, 4, C) float32, ``visibility.npy`` (N, 4) float32 (mask pixels of each view on the
feature map), ``ids.npy`` (N,) int64, ``cams.npy`` (N,) int64 (-1: unknown),
``keys.txt`` (one sample key a line).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic
from pipeline.data.shards import eval_pipeline, shard_urls
from pipeline.dist.env import DistInfo, barrier
from pipeline.evaluation.distance import FeatureSet
from pipeline.reid.data import EvalTransform, collate
from pipeline.reid.model import embed

ARRAYS = ("global", "local", "visibility", "ids", "cams")


def _embed_shard(model: torch.nn.Module, url: str, size: tuple[int, int], batch_size: int,
                 num_workers: int, channels_last: bool) -> dict[str, np.ndarray]:
    """All samples of one shard -> feature arrays and keys, in shard order."""
    loader = torch.utils.data.DataLoader(eval_pipeline([url], map_fn=EvalTransform(size)),
                                         batch_size=batch_size, num_workers=min(num_workers, 1),
                                         collate_fn=collate)
    out: dict[str, list] = {name: [] for name in (*ARRAYS, "keys")}
    for batch in loader:
        feats = embed(model, batch, channels_last=channels_last)
        for name in ("global", "local", "visibility"):
            out[name].append(feats[name].float().cpu().numpy())
        out["ids"].append(batch["vids"].numpy())
        out["cams"].append(batch["cameras"].numpy())
        out["keys"] += batch["keys"]
    if not out["keys"]:
        raise ValueError(f"{url}: no samples")
    arrays = {name: np.concatenate(out[name]) for name in ARRAYS}
    arrays["keys"] = np.array(out["keys"])
    return arrays


def extract_split(model: torch.nn.Module, shard_dir: Path, split: str, out_dir: Path, info: DistInfo, *,
                  size: tuple[int, int], batch_size: int = 64, num_workers: int = 1,
                  channels_last: bool = False) -> Path:
    """Embed every sample of ``split`` (all ranks take part); rank 0 writes ``out_dir/split/``.

    Returns the split's embedding folder. Other ranks return once rank 0 has written it.
    """
    urls = shard_urls(shard_dir, split)
    staging = Path(out_dir) / f".{split}.parts"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(info)
    for index in range(info.rank, len(urls), info.world_size):
        arrays = _embed_shard(model, urls[index], size, batch_size, num_workers, channels_last)
        with atomic.replacing(staging / f"{index:06d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a path
    barrier(info)
    final = Path(out_dir) / split
    if info.is_main:
        parts = [np.load(staging / f"{i:06d}.npz") for i in range(len(urls))]
        merged = Path(out_dir) / f".{split}.merged"
        shutil.rmtree(merged, ignore_errors=True)
        merged.mkdir(parents=True)
        for name in ARRAYS:
            np.save(merged / f"{name}.npy", np.concatenate([p[name] for p in parts]))
        atomic.write_text(merged / "keys.txt", "".join(f"{k}\n" for p in parts for k in p["keys"].tolist()))
        atomic.swap_dir(merged, final)
        shutil.rmtree(staging, ignore_errors=True)
    barrier(info)
    return final


def load_features(folder: Path) -> tuple[FeatureSet, list[str]]:
    """An embedding folder -> (FeatureSet with global, part features and visibilities, keys)."""
    folder = Path(folder)
    missing = [n for n in ARRAYS if not (folder / f"{n}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(m + '.npy' for m in missing)}")
    a = {name: np.load(folder / f"{name}.npy") for name in ARRAYS}
    keys = (folder / "keys.txt").read_text().splitlines()
    return FeatureSet(a["ids"], a["cams"], a["global"], a["local"], a["visibility"]), keys
