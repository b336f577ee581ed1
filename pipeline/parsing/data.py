"""Parser training data: the annotated subset of the training shards and aligned augmentations.

Only *training*-split samples that carry a ground-truth ``mask.png`` are used to train and
validate the parser; query/gallery/test labels only score it (masks stage). The
validation part is held out by vehicle identity, so no vehicle is seen in both parts
(paper: 2,665 train / 500 val annotated images).

Samples stay as their encoded bytes in memory (a few tens of kB each) and are decoded in
the loader workers. Geometry is applied to image and label map together (flip, scale,
shift: bilinear for the image, nearest for the labels, so labels stay labels); colour
jitter touches the image only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.shards import decode_image, decode_mask, eval_pipeline, shard_urls
from pipeline.data.transforms import resize_image


@dataclass(frozen=True)
class Annotated:
    """One annotated image: encoded ``jpg`` and ``mask_png`` bytes, its key and vehicle id."""
    key: str
    vid: int
    jpg: bytes
    mask_png: bytes


@dataclass(frozen=True)
class Augment:
    """Random geometry and colour for training. ``scale`` [min, max] zoom factor,
    ``shift`` max translation as a fraction of the side, ``jitter`` max relative change
    of brightness, contrast and saturation, ``flip`` probability of a horizontal flip
    (left and right sides share the label 'side', so a flip keeps labels valid)."""
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.04
    jitter: float = 0.1
    flip: float = 0.5

    @classmethod
    def from_config(cls, cfg) -> Augment:
        """From the params ``parser`` section (scale, shift, jitter, flip; validated by pipeline.config)."""
        return cls(scale=tuple(cfg.scale), shift=cfg.shift, jitter=cfg.jitter, flip=cfg.flip)


def _keep_raw(sample: dict[str, Any]) -> dict[str, Any]:
    return sample


def annotated_subset(shard_dir: str | Path, val_fraction: float, seed: int) -> tuple[list[Annotated], list[Annotated]]:
    """(train, val) annotated samples of the ``train`` split, val held out by identity.

    Identities are shuffled with ``seed`` and moved to val until it holds at least
    ``round(val_fraction * n)`` images (at least one). With a single identity the split
    falls back to images. Raises ValueError when fewer than 2 annotated images exist.
    """
    samples = []
    for raw in eval_pipeline(shard_urls(shard_dir, "train"), map_fn=_keep_raw):
        if "mask.png" in raw:
            meta = json.loads(raw["json"])
            samples.append(Annotated(raw["__key__"], int(meta["vid"]), raw["jpg"], raw["mask.png"]))
    if len(samples) < 2:
        raise ValueError(f"{shard_dir}: {len(samples)} annotated training images (samples with mask.png); "
                         "the parser needs at least 2 (one to train, one to validate)")
    samples.sort(key=lambda s: s.key)  # independent of the shard stage's shuffle
    groups: dict[Any, list[Annotated]] = {}
    by_id = len({s.vid for s in samples}) > 1
    for s in samples:
        groups.setdefault(s.vid if by_id else s.key, []).append(s)
    order = np.random.default_rng([seed, 0xA11]).permutation(len(groups))
    names = sorted(groups)
    target = max(1, round(val_fraction * len(samples)))
    val: list[Annotated] = []
    chosen = set()
    for i in order:
        if len(val) >= target or len(chosen) == len(groups) - 1:
            break
        chosen.add(names[i])
        val += groups[names[i]]
    train = [s for s in samples if (s.vid if by_id else s.key) not in chosen]
    val.sort(key=lambda s: s.key)
    return train, val


def decode_labels(sample: Annotated) -> np.ndarray:
    """The label PNG's bytes -> (H, W) uint8 labels (no image decode)."""
    return decode_mask(sample.mask_png)


def decode_pair(sample: Annotated) -> tuple[np.ndarray, np.ndarray]:
    """Bytes -> (image (H, W, 3) uint8 RGB, labels (H, W) uint8); sizes must agree."""
    image = decode_image(sample.jpg)
    mask = decode_labels(sample)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"sample {sample.key}: mask {mask.shape} and image {image.shape[:2]} differ in size")
    return image, mask


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            aug: Augment) -> tuple[np.ndarray, np.ndarray]:
    """Random flip + scale/shift (same affine map for both) + colour jitter (image only).

    image (H, W, 3) uint8, mask (H, W) uint8 -> same shapes. Pixels moved in from outside
    the frame are black in the image and background (0) in the mask.
    """
    size = image.shape[1], image.shape[0]  # PIL (width, height)
    if rng.random() < aug.flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    s = rng.uniform(*aug.scale)
    tx, ty = rng.uniform(-aug.shift, aug.shift, size=2) * np.array(size)
    cx, cy = (size[0] - 1) / 2, (size[1] - 1) / 2
    # PIL maps each output pixel (x, y) to the input point (a x + b y + c, d x + e y + f):
    # the inverse of "zoom by s about the centre, then move by (tx, ty)".
    coeffs = (1 / s, 0.0, cx - (cx + tx) / s, 0.0, 1 / s, cy - (cy + ty) / s)
    img = Image.fromarray(np.ascontiguousarray(image)).transform(size, Image.AFFINE, coeffs, Image.BILINEAR,
                                                                  fillcolor=(0, 0, 0))
    lab = Image.fromarray(np.ascontiguousarray(mask)).transform(size, Image.AFFINE, coeffs, Image.NEAREST, fillcolor=0)
    out = np.asarray(img, dtype=np.float32)
    if aug.jitter > 0:
        b, c, sat = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3)
        out = out * b
        out = (out - out.mean()) * c + out.mean()
        grey = out @ np.array([0.299, 0.587, 0.114], np.float32)
        out = (out - grey[..., None]) * sat + grey[..., None]
    return np.clip(out, 0, 255).round().astype(np.uint8), np.asarray(lab)


def soft_labels(labels: np.ndarray, size: int, classes: int = 5) -> torch.Tensor:
    """(H, W) uint8 labels -> (classes, size, size) float32 class shares per output pixel.

    Area-averaged one-hot maps: an output pixel that covers two parts gets both, in
    proportion. Training on these instead of nearest-neighbour labels keeps part edges
    where they are (nearest picks one corner of each block: a sub-pixel shift of every
    edge that costs several IoU points once predictions are upsampled back).
    """
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), classes)
    onehot = onehot.permute(2, 0, 1).float()[None]
    if onehot.shape[-2:] == (size, size):
        return onehot[0]
    return torch.nn.functional.interpolate(onehot, size=(size, size), mode="area")[0]


class ParsingDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image (S, S, 3) uint8, soft labels (5, S, S) float32) at ``image_size``.

    Augmentation runs at the stored resolution; the image is then resized to S x S and
    the labels area-averaged to S x S (:func:`soft_labels`).
    With ``aug`` the random draws of item ``i`` come from (seed, epoch, i): the same
    epoch gives the same pictures whatever the number of loader workers. Call
    :meth:`set_epoch` before building each epoch's DataLoader iterator.
    """

    def __init__(self, samples: list[Annotated], image_size: int, aug: Augment | None = None, seed: int = 0):
        self.samples, self.size, self.aug, self.seed = samples, image_size, aug, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, mask = decode_pair(self.samples[i])
        if self.aug is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image, mask = augment(image, mask, rng, self.aug)
        # np.array copies: arrays viewing PIL buffers are read-only, which torch warns about.
        return torch.from_numpy(np.array(resize_image(image, self.size))), soft_labels(mask, self.size)
