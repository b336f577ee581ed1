"""ReID samples: decode, resize, joint image/mask augmentation, collation.

A decoded sample (``pipeline.data.shards.decode_sample``) holds ``image`` HxWx3 uint8
and ``mask`` HxW uint8 labels 0..4 (the parser's prediction in the masked shards).
:func:`prepare` resizes both to ``[height, width]`` px (image bilinear, mask nearest,
so labels stay labels); :func:`augment` then applies, with one RNG, the same random
flip and pad + random crop to image and mask, and random erasing to the image only
(the mask keeps the true view layout). A horizontal flip needs no label swap: "side"
covers both the left and the right side.

Images stay uint8 until the training step normalises them (4x less to move between
loader workers and the main process); :func:`collate` stacks samples into
``{"images": (B, 3, H, W) uint8, "masks": (B, H, W) uint8, "vids": (B,) int64,
"cameras": (B,) int64, "keys": [str]}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.constants import IMAGENET_MEAN
from pipeline.data.shards import decode_sample

# Random erasing (Zhong et al.): area share and aspect ratio ranges; fill = mean pixel.
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_FILL = np.array([round(m * 255) for m in IMAGENET_MEAN], dtype=np.uint8)


def read_vid(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw WebDataset sample -> the same with ``vid`` parsed from its json (images stay encoded).

    Used before identity batching: buffers then hold a few KB of JPEG per sample,
    not decoded pixels.
    """
    meta = json.loads(sample["json"])
    return {**sample, "vid": int(meta["vid"])}


def prepare(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Raw or decoded sample -> ``{"key", "image" (H, W, 3) uint8, "mask" (H, W) uint8, "vid", "camera"}``.

    ``size`` is (height, width) px. Raises ValueError naming the sample when it has no
    mask (train_reid reads the masked shards, where every sample has one).
    """
    if "jpg" in sample:
        sample = decode_sample(sample)
    key, meta = sample["key"], sample["meta"]
    if sample["mask"] is None:
        raise ValueError(f"sample {key!r} (vid {meta.get('vid')}, split {meta.get('split')}): no mask.png; "
                         f"the ReID stages read the masked shards (masks stage), where every sample has one")
    image, mask = sample["image"], sample["mask"]
    if mask.shape != image.shape[:2] or image.shape[:2] != tuple(size):
        height, width = size
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        if mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
    return {"key": key, "image": image, "mask": mask, "vid": int(meta["vid"]), "camera": int(meta.get("camera", -1))}


def augment(sample: dict[str, Any], rng: np.random.Generator, pad: int, erase_prob: float) -> dict[str, Any]:
    """Random flip and pad + crop on image and mask together; random erasing on the image only."""
    image, mask = sample["image"], sample["mask"]
    h, w = mask.shape
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if pad > 0:
        # Zero padding: black pixels, background labels; then a crop of the original size.
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        mask = np.pad(mask, pad)
        top, left = rng.integers(0, 2 * pad + 1, size=2)
        image, mask = image[top:top + h, left:left + w], mask[top:top + h, left:left + w]
    image = np.ascontiguousarray(image)
    if rng.random() < erase_prob:
        _erase(image, rng)
    return {**sample, "image": image, "mask": np.ascontiguousarray(mask)}


def _erase(image: np.ndarray, rng: np.random.Generator, tries: int = 100) -> None:
    """Fill one random rectangle of ``image`` (in place) with the mean pixel."""
    h, w = image.shape[:2]
    for _ in range(tries):
        area = rng.uniform(*ERASE_AREA) * h * w
        aspect = np.exp(rng.uniform(np.log(ERASE_ASPECT[0]), np.log(ERASE_ASPECT[1])))
        eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
            image[top:top + eh, left:left + ew] = ERASE_FILL
            return


@dataclass(frozen=True)
class TrainTransform:
    """Raw sample + RNG -> prepared, augmented sample (what :class:`PKBatcher` applies)."""
    size: tuple[int, int]
    pad: int = 10
    erase_prob: float = 0.5

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return augment(prepare(sample, self.size), rng, self.pad, self.erase_prob)


@dataclass(frozen=True)
class EvalTransform:
    """Raw sample -> prepared sample, no randomness (a ``map_fn`` for ``eval_pipeline``)."""
    size: tuple[int, int]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return prepare(sample, self.size)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Prepared samples -> batch tensors (see module docstring)."""
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2)
    return {
        "images": images,
        "masks": torch.from_numpy(np.stack([s["mask"] for s in samples])),
        "vids": torch.tensor([s["vid"] for s in samples], dtype=torch.int64),
        "cameras": torch.tensor([s["camera"] for s in samples], dtype=torch.int64),
        "keys": [s["key"] for s in samples],
    }
