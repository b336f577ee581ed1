"""Turning a PVEN and masked shards into features: one extraction, an in-memory or an on-disk sink.

:func:`embed_shards` is the one extraction loop: every sample of a list of shards ->
feature arrays (``global`` (N, C) after the BN neck, ``local`` (N, 4, C),
``visibility`` (N, 4), ``ids``, ``cams``, ``keys``, and ``views`` (N,): the azimuth in
degrees from the sample json's ``view.azimuth_deg``, NaN where a sample has none),
through a ``forward`` callable (:func:`model_forward` for a trained model; the training
loop passes its backend). A split none of whose samples has a view gets no views
(``FeatureSet.views`` None, no ``views.npy``).
Two sinks split the shards across ranks by :meth:`DistInfo.share`:

* :func:`gather_features` (in-loop validation): each rank embeds its shards, rank 0
  receives all features as a :class:`~pipeline.evaluation.features.FeatureSet`;
* :func:`extract_split` (the evaluate stage): each rank writes one part file per
  shard into a staging folder on the (shared) filesystem; after a barrier rank 0
  concatenates the parts in manifest order, one at a time, into an embedding folder
  (:mod:`pipeline.evaluation.features`). The result is the same array, in the same
  order, as one process would produce, and no rank holds another rank's features
  (VERI-Wild's gallery is 128k images).
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic
from pipeline.data.shards import decode_sample, eval_pipeline, shard_urls
from pipeline.data.transforms import normalize_images
from pipeline.dist.env import DistInfo, barrier, gather_to_main
from pipeline.evaluation.features import ARRAYS, VIEWS, FeatureSet, merge_part_files
from pipeline.progress import progress
from pipeline.reid.data import EvalTransform, collate

# (images (B, 3, H, W) uint8, masks (B, H, W) uint8) -> the PVEN output dict (see pipeline.reid.model)
Forward = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def sample_azimuth(meta: dict[str, Any]) -> float:
    """A sample json's ``view.azimuth_deg`` in degrees (wrapped into (-180, 180] if outside); NaN without one."""
    view = meta.get("view")
    value = view.get("azimuth_deg") if isinstance(view, dict) else None
    if value is None or not math.isfinite(float(value)):
        return math.nan
    value = float(value)
    return value if -180.0 < value <= 180.0 else 180.0 - (180.0 - value) % 360.0


@dataclass(frozen=True)
class _EvalSample:
    """Raw sample -> the prepared eval sample plus its ``azimuth`` (a picklable ``map_fn``)."""
    size: tuple[int, int]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        decoded = decode_sample(sample)
        return {**EvalTransform(self.size)(decoded), "azimuth": sample_azimuth(decoded["meta"])}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {**collate(samples), "views": torch.tensor([s["azimuth"] for s in samples], dtype=torch.float64)}


def _views_or_none(views: np.ndarray) -> np.ndarray | None:
    """None when no image of the split has a view angle."""
    return views if np.isfinite(views).any() else None


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
    """Every sample of ``urls`` (in shard order, one loader) -> :data:`ARRAYS` + ``keys`` + ``views`` arrays.

    ``size`` is the model's input (height, width) in px. Raises ValueError when the
    shards hold no sample.
    """
    loader = torch.utils.data.DataLoader(eval_pipeline(urls, map_fn=_EvalSample(tuple(size))), batch_size=batch_size,
                                         num_workers=min(num_workers, len(urls)), collate_fn=_collate)
    out: dict[str, list] = {name: [] for name in (*ARRAYS, VIEWS, "keys")}
    with progress(desc=desc, unit="img", enabled=show) as bar:
        for batch in loader:
            feats = forward(batch["images"], batch["masks"])
            out["global"].append(feats["neck"].float().cpu().numpy())
            out["local"].append(feats["local"].float().cpu().numpy())
            out["visibility"].append(feats["visibility"].float().cpu().numpy())
            out["ids"].append(batch["vids"].numpy())
            out["cams"].append(batch["cameras"].numpy())
            out[VIEWS].append(batch["views"].numpy())
            out["keys"] += batch["keys"]
            bar.update(len(batch["keys"]))
    if not out["keys"]:
        raise ValueError(f"{', '.join(urls)}: no samples")
    arrays = {name: np.concatenate(out[name]) for name in (*ARRAYS, VIEWS)}
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
    a = {name: np.concatenate([p[name] for p in parts]) for name in (*ARRAYS, VIEWS)}
    return FeatureSet(a["ids"], a["cams"], a["global"], a["local"], a["visibility"], _views_or_none(a[VIEWS]))


def embed_parts(jobs: Sequence[Any], embed: Callable[[Any], dict[str, np.ndarray]], staging: Path, info: DistInfo,
                *, desc: str) -> list[Path] | None:
    """Every rank embeds its share of ``jobs`` (:meth:`DistInfo.share`), one part file per job in ``staging``.

    ``embed(job)`` returns the job's arrays (:data:`ARRAYS`, ``views``, ``keys``, and any
    extra arrays the caller wants to read back). All ranks take part; after a barrier rank 0
    gets the part files in job order (other ranks None): the same arrays whatever the rank
    count. ``staging`` (on a filesystem every rank sees) is emptied first.
    """
    staging = Path(staging)
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(info)
    indices = info.share(range(len(jobs)))
    with progress(desc=desc, unit="part", total=len(indices), enabled=info.is_main) as bar:
        for index in indices:
            arrays = embed(jobs[index])
            with atomic.replacing(staging / f"{index:06d}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a path
            bar.update()
    barrier(info)
    return [staging / f"{i:06d}.npz" for i in range(len(jobs))] if info.is_main else None


def extract_split(forward: Forward, shard_dir: Path, split: str, out_dir: Path, info: DistInfo, *,
                  size: tuple[int, int], batch_size: int = 64, num_workers: int = 1) -> Path:
    """Embed every sample of ``split`` (all ranks take part); rank 0 writes ``out_dir/split/``.

    One part per shard (whatever the rank count). Returns the split's embedding folder.
    Other ranks return once rank 0 has written it.
    """
    final = Path(out_dir) / split
    staging = final.with_name(f".{split}.parts")
    parts = embed_parts(shard_urls(shard_dir, split), lambda url: embed_shards(
        forward, [url], size=size, batch_size=batch_size, num_workers=num_workers), staging, info,
        desc=f"embed {split}")
    if parts is not None:
        merge_part_files(parts, final)
        shutil.rmtree(staging, ignore_errors=True)
    barrier(info)
    return final
