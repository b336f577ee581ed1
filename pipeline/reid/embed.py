"""Turning a PVEN and masked shards into features: one extraction, an in-memory or an on-disk sink.

:func:`embed_shards` is the one extraction loop: every sample of a list of shards ->
feature arrays (``global`` (N, C) after the BN neck, ``local`` (N, 4, C),
``visibility`` (N, 4), ``ids``, ``cams``, ``keys``), through a ``forward`` callable
(:func:`model_forward` for a trained model; the training loop passes its backend).
Two sinks split the shards across ranks by :meth:`DistInfo.share`:

* :func:`gather_features` (in-loop validation): each rank embeds its shards, rank 0
  receives all features as a :class:`~pipeline.evaluation.features.FeatureSet`;
* :func:`extract_split` (the evaluate stage): each rank writes one part file per
  shard into a staging folder on the (shared) filesystem; after a barrier rank 0
  concatenates the parts in manifest order into an embedding folder
  (:mod:`pipeline.evaluation.features`). The result is the same array, in the same
  order, as one process would produce, and no rank holds another rank's features
  (VERI-Wild's gallery is 128k images).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic
from pipeline.data.shards import eval_pipeline, shard_urls
from pipeline.data.transforms import normalize_images
from pipeline.dist.env import DistInfo, barrier, gather_to_main
from pipeline.evaluation.features import ARRAYS, FeatureSet, write_feature_folder
from pipeline.progress import progress
from pipeline.reid.data import EvalTransform, collate

# (images (B, 3, H, W) uint8, masks (B, H, W) uint8) -> the PVEN output dict (see pipeline.reid.model)
Forward = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def model_forward(model: torch.nn.Module, channels_last: bool = False) -> Forward:
    """A trained PVEN as a :data:`Forward`: eval mode, inputs normalised and cast to the weights' dtype."""
    def forward(images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        model.eval()
        weight = next(model.parameters())
        x = normalize_images(images.to(weight.device), channels_last).to(weight.dtype)
        return model(x, masks.to(weight.device))
    return forward


@torch.no_grad()
def embed_shards(forward: Forward, urls: list[str], *, size: tuple[int, int], batch_size: int = 64,
                 num_workers: int = 1, desc: str = "embed", show: bool = False) -> dict[str, np.ndarray]:
    """Every sample of ``urls`` (in shard order, one loader) -> :data:`ARRAYS` + ``keys`` arrays.

    ``size`` is the model's input (height, width) in px. Raises ValueError when the
    shards hold no sample.
    """
    loader = torch.utils.data.DataLoader(eval_pipeline(urls, map_fn=EvalTransform(size)), batch_size=batch_size,
                                         num_workers=min(num_workers, len(urls)), collate_fn=collate)
    out: dict[str, list] = {name: [] for name in (*ARRAYS, "keys")}
    with progress(desc=desc, unit="img", enabled=show) as bar:
        for batch in loader:
            feats = forward(batch["images"], batch["masks"])
            out["global"].append(feats["neck"].float().cpu().numpy())
            out["local"].append(feats["local"].float().cpu().numpy())
            out["visibility"].append(feats["visibility"].float().cpu().numpy())
            out["ids"].append(batch["vids"].numpy())
            out["cams"].append(batch["cameras"].numpy())
            out["keys"] += batch["keys"]
            bar.update(len(batch["keys"]))
    if not out["keys"]:
        raise ValueError(f"{', '.join(urls)}: no samples")
    arrays = {name: np.concatenate(out[name]) for name in ARRAYS}
    arrays["keys"] = np.array(out["keys"])
    return arrays


def gather_features(forward: Forward, shard_dir: Path, split: str, info: DistInfo, *, size: tuple[int, int],
                    batch_size: int = 64, num_workers: int = 1) -> FeatureSet | None:
    """The split's features on rank 0 (None on other ranks); every rank embeds its share of the shards."""
    mine = info.share(shard_urls(shard_dir, split))
    local = embed_shards(forward, mine, size=size, batch_size=batch_size, num_workers=num_workers) if mine else None
    parts = [p for p in gather_to_main(local, info) or [] if p is not None]
    if not info.is_main:
        return None
    a = {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}
    return FeatureSet(a["ids"], a["cams"], a["global"], a["local"], a["visibility"])


def extract_split(forward: Forward, shard_dir: Path, split: str, out_dir: Path, info: DistInfo, *,
                  size: tuple[int, int], batch_size: int = 64, num_workers: int = 1) -> Path:
    """Embed every sample of ``split`` (all ranks take part); rank 0 writes ``out_dir/split/``.

    Returns the split's embedding folder. Other ranks return once rank 0 has written it.
    """
    urls = shard_urls(shard_dir, split)
    staging = Path(out_dir) / f".{split}.parts"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(info)
    indices = info.share(range(len(urls)))
    with progress(desc=f"embed {split}", unit="shard", total=len(indices), enabled=info.is_main) as bar:
        for index in indices:   # one loader per shard: a part file per shard, whatever the rank count
            arrays = embed_shards(forward, [urls[index]], size=size, batch_size=batch_size, num_workers=num_workers)
            with atomic.replacing(staging / f"{index:06d}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a path
            bar.update()
    barrier(info)
    final = Path(out_dir) / split
    if info.is_main:
        parts = [np.load(staging / f"{i:06d}.npz") for i in range(len(urls))]
        write_feature_folder(final, {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS},
                             [k for p in parts for k in p["keys"].tolist()])
        shutil.rmtree(staging, ignore_errors=True)
    barrier(info)
    return final
