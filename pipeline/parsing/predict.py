"""Batched parser inference, and the masks stage's shard-to-shard mask writer (distributed).

:func:`write_masked_shards` reads every shard of ``shard_dir`` (all splits) and writes,
for each input shard, an output shard of the same name in ``out_dir`` holding the same
samples in the same order: the same ``jpg`` bytes, the ``json`` meta plus
``"mask_source": "parser"``, and ``mask.png``, the *predicted* uint8 label map (0..4) at
the image's resolution or at ``mask_size`` (height, width). Ground-truth masks are not
copied (ReID stages see what the parser sees); where one exists it only scores the
prediction. The one exception is the ablation ``source="labels"`` (``masks.source``):
every sample's own label map is written instead (``"mask_source": "labels"``), which
isolates the parser's contribution; a sample without a label is then an error.

Distribution: rank r of N takes input shards r, r+N, ... of the list of all shards
(splits in manifest order; :meth:`DistInfo.share`); rank 0 writes the merged ``manifest.json`` (the
shard manifest's format) and swaps the folder in. Batches never cross a shard boundary,
so a shard's bytes do not depend on N (1 rank or many give identical files). Ranks
write into one staging folder beside ``out_dir``: several nodes need a shared filesystem.

An image that cannot be decoded is skipped (left out of its output shard) and listed in
the manifest's ``skipped``; the stage goes on.
"""
from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import atomic
from pipeline.cli import InputError
from pipeline.data.shards import (
    MANIFEST,
    decode_failure,
    decode_image,
    decode_mask,
    index_tar,
    read_manifest,
    read_members,
    write_tar,
)
from pipeline.data.transforms import resize_image, resize_labels
from pipeline.dist.env import SINGLE, DistInfo, all_gather, barrier
from pipeline.parsing.metrics import MaskStats, confusion_matrix
from pipeline.parsing.model import load_checkpoint, logit_bias, to_input
from pipeline.progress import progress

MASK_SOURCES = ("parser", "labels")


class MissingLabelError(InputError):
    """``masks.source: labels`` met a sample without a label map."""


# --------------------------------------------------------------------------- inference

@torch.no_grad()
def forward(model: torch.nn.Module, images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch (B, S, S, 3) -> float32 logits (B, C, S, S) on the CPU, plus ``bias`` (C, 1, 1) if given."""
    logits = model(to_input(images).to(device)).float().cpu()
    return logits if bias is None else logits + bias


def logits_to_labels(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One image's logits (C, S, S) -> uint8 labels (height, width) = ``size``.

    Logits are upsampled bilinearly before the argmax, which gives smoother part
    boundaries than upsampling the argmax labels.
    """
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return logits.argmax(0).to(torch.uint8).numpy()


def predict_labels(model: torch.nn.Module, images: list[np.ndarray], image_size: int,
                   device: torch.device | str = "cpu", bias: torch.Tensor | None = None) -> list[np.ndarray]:
    """Predicted label maps (H, W) uint8 for RGB images (H, W, 3) uint8 of any sizes, in one batch."""
    batch = np.stack([resize_image(im, image_size) for im in images])
    logits = forward(model, batch, device, bias)
    return [logits_to_labels(lg, im.shape[:2]) for lg, im in zip(logits, images)]


# --------------------------------------------------------------------------- reading shards

@dataclass(frozen=True)
class _Item:
    shard: int                                 # index into the rank's shard list
    key: str
    members: dict[str, tuple[int, int]]        # extension -> (byte offset, size) in the tar


class _ShardItems(torch.utils.data.Dataset):
    """Decodes one sample: raw bytes, the resized network input, ground truth if any, or an error."""

    def __init__(self, paths: list[Path], items: list[_Item], image_size: int):
        self.paths, self.items, self.size = paths, items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        raw = read_members(self.paths[item.shard], item.members)
        out = {"index": i, "key": item.key, "raw": raw, "input": None, "truth": None, "error": None}
        try:
            if "jpg" not in raw or "json" not in raw:
                raise ValueError(f"sample has {sorted(raw)}, expected jpg and json")
            image = decode_image(raw["jpg"])
            out["meta"] = json.loads(raw["json"])  # a bad json skips the sample like a bad image
            out["size"] = image.shape[:2]
            out["input"] = resize_image(image, self.size)
            if "mask.png" in raw:
                out["truth"] = decode_mask(raw["mask.png"])
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            out["error"] = decode_failure(exc)
        return out


def _shard_batches(items: list[_Item], batch_size: int) -> list[list[int]]:
    """Batches of item indices that never span two shards (keeps outputs independent of rank count)."""
    batches, start = [], 0
    while start < len(items):
        stop = start
        while stop < len(items) and items[stop].shard == items[start].shard and stop - start < batch_size:
            stop += 1
        batches.append(list(range(start, stop)))
        start = stop
    return batches


# --------------------------------------------------------------------------- the masks stage

def _all_shards(shard_dir: Path) -> list[tuple[str, str]]:
    """(split, shard name) of every input shard, splits in manifest order."""
    manifest = read_manifest(shard_dir)
    return [(split, s["name"]) for split, info in manifest["splits"].items() for s in info["shards"]]


def _peek(iterator: Iterator):
    """An iterator with one item of look-ahead: returns (peek(), next())."""
    buffer: list = []

    def peek():
        if not buffer:
            buffer.append(next(iterator, None))
        return buffer[0]

    def take():
        value = peek()
        buffer.clear()
        return value

    return peek, take


def write_masked_shards(shard_dir: str | Path, out_dir: str | Path, checkpoint: str | Path, *,
                        batch_size: int = 32, mask_size: tuple[int, int] | None = None,
                        num_workers: int = 0, info: DistInfo = SINGLE,
                        show_progress: bool = False, source: str = "parser") -> dict[str, Any] | None:
    """Predict masks for every sample of ``shard_dir`` into ``out_dir`` (see module docstring).

    ``source`` 'parser' (the pipeline) or 'labels' (each sample's own label map, an ablation).

    Every rank must call this (it synchronises through torch.distributed when
    ``info.world_size`` > 1); the model runs on ``info.device``. Returns, on rank 0,
    ``{"manifest", "metrics"}``; None elsewhere.
    """
    if source not in MASK_SOURCES:
        raise ValueError(f"masks.source: got {source!r}, expected one of {MASK_SOURCES}")
    device = info.device
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    shards = _all_shards(shard_dir)
    model, config, _ = load_checkpoint(checkpoint, device)
    bias = logit_bias(config)
    staging = out_dir.with_name(f".{out_dir.name}.staging")  # one name for all ranks
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(info)
    mine = info.share(shards)
    paths = [shard_dir / name for _, name in mine]
    items = [_Item(i, key, members) for i, p in enumerate(paths) for key, members in index_tar(p)]
    loader = torch.utils.data.DataLoader(_ShardItems(paths, items, int(config["image_size"])),
                                         batch_sampler=_shard_batches(items, batch_size),
                                         num_workers=num_workers, collate_fn=list)
    stats, skipped, written = MaskStats(), [], []
    ids: dict[str, dict[str, set]] = {}  # split -> vehicle ids and cameras written
    started = time.time()
    bar = progress(loader, total=len(loader.batch_sampler), desc="masks", unit="batch",
                   enabled=show_progress and info.is_main)
    peek, take = _peek(iter(bar))
    for i, (split, name) in enumerate(mine):
        seen = ids.setdefault(split, {"vids": set(), "cameras": set()})

        def samples(i=i, split=split, name=name, seen=seen):
            # The loader yields whole batches in order and a batch never spans shards,
            # so shard i's samples are exactly the batches until the shard index changes.
            while peek() is not None and items[peek()[0]["index"]].shard == i:
                yield from _masked_batch(take(), model, bias, device, mask_size, split, name, stats, skipped, seen,
                                         source)
        written.append({"split": split, **write_tar(staging / name, samples())})
    seconds = time.time() - started
    local = {"written": written, "stats": stats, "skipped": skipped, "seconds": seconds, "ids": ids}
    bar.close()
    gathered = all_gather(local, info)
    if not info.is_main:
        barrier(info)
        return None
    result = _finish(shard_dir, staging, out_dir, shards, gathered, config, mask_size, checkpoint, source)
    barrier(info)
    return result


def _masked_batch(batch: list[dict], model, bias, device, mask_size, split: str, shard: str,
                  stats: MaskStats, skipped: list, seen: dict[str, set], source: str) -> Iterator[dict[str, Any]]:
    """Output samples for one decoded batch, in order; undecodable samples go to ``skipped``."""
    good = [b for b in batch if b["error"] is None]
    for b in batch:
        if b["error"] is not None:
            skipped.append({"split": split, "shard": shard, "key": b["key"], "reason": b["error"]})
            stats.skip(split)
    if source == "labels":
        missing = [b["key"] for b in good if b["truth"] is None]
        if missing:
            raise MissingLabelError(f"masks.source=labels: {split} shard {shard} sample {missing[0]} (and "
                                    f"{len(missing) - 1} more in this batch) has no label mask.png; every image "
                                    f"needs one (synthetic: synth.label_fraction=1.0), or use masks.source=parser")
        logits = []
    else:
        logits = forward(model, np.stack([b["input"] for b in good]), device, bias) if good else []
    done = dict(zip((b["index"] for b in good), logits))
    for b in batch:
        if b["error"] is not None:
            continue
        if source == "labels":
            labels = _fit(b["truth"], tuple(b["size"]))
            stored = labels if mask_size is None else resize_labels(labels, tuple(mask_size))
        else:
            lg = done[b["index"]]
            labels = logits_to_labels(lg, b["size"])
            stored = labels if mask_size is None else logits_to_labels(lg, mask_size)
        conf = None if b["truth"] is None else confusion_matrix(labels, _fit(b["truth"], labels.shape))
        stats.add(split, stored, conf)
        meta = {**b["meta"], "mask_source": source}
        seen["vids"].add(meta["vid"])
        if meta.get("camera", -1) >= 0:
            seen["cameras"].add(meta["camera"])
        yield {"__key__": b["key"], "jpg": b["raw"]["jpg"],
               "json": json.dumps(meta, sort_keys=True).encode(), "mask.png": _png(stored)}


def _fit(truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return truth if truth.shape == shape else resize_labels(truth, shape)


def _png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _finish(shard_dir: Path, staging: Path, out_dir: Path, shards: list[tuple[str, str]],
            gathered: list[dict], config: dict, mask_size, checkpoint, source: str) -> dict[str, Any]:
    """Rank 0: merge the ranks' results into the manifest and metrics, swap the folder in."""
    by_name = {w["name"]: w for g in gathered for w in g["written"]}
    stats = MaskStats()
    for g in gathered:
        stats.merge(g["stats"])
    manifest: dict[str, Any] = {"format": 1, "source": str(shard_dir), "mask_source": source,
                                "parser": {"checkpoint": str(checkpoint), **config},
                                "mask_size": None if mask_size is None else list(mask_size),
                                "splits": {}, "skipped": []}
    for split in dict.fromkeys(s for s, _ in shards):
        infos = [by_name[name] for s, name in shards if s == split]
        vids = set().union(*(g["ids"].get(split, {}).get("vids", set()) for g in gathered))
        cams = set().union(*(g["ids"].get(split, {}).get("cameras", set()) for g in gathered))
        count = sum(i["samples"] for i in infos)
        manifest["splits"][split] = {"samples": count, "identities": len(vids), "cameras": len(cams),
                                     "labels": count,
                                     "shards": [{k: i[k] for k in ("name", "samples", "sha256")} for i in infos]}
    order = {name: i for i, (_, name) in enumerate(shards)}
    manifest["skipped"] = sorted((s for g in gathered for s in g["skipped"]),
                                 key=lambda s: (order[s["shard"]], s["key"]))
    seconds = max(g["seconds"] for g in gathered)
    atomic.write_json(staging / MANIFEST, manifest)
    atomic.swap_dir(staging, out_dir)
    images = sum(v["samples"] for v in manifest["splits"].values())
    metrics = {"images": images, "skipped": len(manifest["skipped"]), "seconds": round(seconds, 2),
               "images_per_s": round(images / max(seconds, 1e-9), 1), "ranks": len(gathered), **stats.summary()}
    return {"manifest": manifest, "metrics": metrics}
