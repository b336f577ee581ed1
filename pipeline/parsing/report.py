"""What the parser stages report: metrics files and pictures (raw 0..4 label PNGs look black,
colour overlays are what people read).

:func:`overlay_sheet` lays out one row per image: the image, then a colour overlay per
label map given (e.g. prediction, ground truth), each tile resized to ``tile`` px high.
"""
from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import atomic
from pipeline.constants import VIEW_NAMES
from pipeline.data.shards import decode_sample, iter_samples, read_manifest
from pipeline.parsing.data import Annotated, decode_pair
from pipeline.parsing.model import load_checkpoint, logit_bias
from pipeline.parsing.predict import predict_labels
from pipeline.viz import LABEL_COLOURS, overlay_labels


def parser_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """metrics/parser.json from :func:`pipeline.parsing.train.train_parser`'s summary: the best
    epoch's val IoU per view, mIoU, pixel accuracy, the class weights and pixel shares."""
    val = result["val"]
    return {"val": {"miou": val["miou"], "pixel_acc": val["pixel_acc"], "iou": dict(zip(VIEW_NAMES, val["iou"]))},
            "best_epoch": result["best_epoch"], "train_images": result["train_images"],
            "val_images": result["val_images"], "seconds": result["seconds"],
            "class_weights": dict(zip(VIEW_NAMES, result["class_weights"])),
            "pixel_freq": dict(zip(VIEW_NAMES, result["pixel_freq"]))}


def val_overlays(checkpoint: Path, val: list[Annotated], count: int = 8) -> np.ndarray:
    """Picture of the saved parser on the first ``count`` val images: image | ground truth | prediction."""
    model, config, _ = load_checkpoint(checkpoint)
    pairs = [decode_pair(s) for s in val[:count]]
    preds = predict_labels(model, [im for im, _ in pairs], config["image_size"], bias=logit_bias(config))
    return overlay_sheet([(im, [gt, p]) for (im, gt), p in zip(pairs, preds)])


def overlay_sheet(rows: list[tuple[np.ndarray, list[np.ndarray | None]]], tile: int = 128,
                  alpha: float = 0.55) -> np.ndarray:
    """rows of (image (H, W, 3) uint8, [labels (H, W) uint8 or None, ...]) -> one (R*tile, C*tile', 3) picture.

    A None label map leaves its tile grey (e.g. no ground truth for that image). A
    legend strip (one colour square per label, background first) is added at the bottom.
    """
    if not rows:
        raise ValueError("overlay_sheet: no rows")
    columns = 1 + max(len(labels) for _, labels in rows)
    lines = []
    for image, labels in rows:
        width = max(1, round(image.shape[1] * tile / image.shape[0]))
        tiles = [_fit(image, tile, width)]
        for lab in labels:
            tiles.append(np.full((tile, width, 3), 96, np.uint8) if lab is None
                         else _fit(overlay_labels(image, lab, alpha), tile, width))
        tiles += [np.full((tile, width, 3), 96, np.uint8)] * (columns - len(tiles))
        lines.append(np.concatenate(tiles, axis=1))
    total = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, total - line.shape[1]), (0, 0))) for line in lines]
    legend = np.zeros((tile // 4, total, 3), np.uint8)
    step = max(1, total // len(LABEL_COLOURS))
    for i, colour in enumerate(LABEL_COLOURS):
        legend[:, i * step:(i + 1) * step] = colour
    return np.concatenate(lines + [legend], axis=0)


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


def save_png(path: str | Path, picture: np.ndarray) -> Path:
    """Write an RGB array as PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return atomic.write_bytes(path, buf.getvalue())


def masks_sheet(masked_dir: str | Path, shard_dir: str | Path, count: int = 8) -> np.ndarray:
    """Overlay picture of the first ``count`` predicted masks of one split.

    Columns: image, prediction, ground truth (grey when the input has none). Prefers a
    held-out split (query, gallery, test) so the picture shows the parser on unseen vehicles.
    """
    masked = read_manifest(masked_dir)["splits"]
    split = next((s for s in ("query", "gallery", "test", "train") if s in masked), None)
    if split is None:
        raise ValueError(f"{masked_dir}: no split to draw")

    def samples_of(folder: Path):
        for shard in read_manifest(folder)["splits"].get(split, {}).get("shards", []):
            yield from iter_samples(Path(folder) / shard["name"])

    chosen = [decode_sample(s) for s in itertools.islice(samples_of(masked_dir), count)]
    # Masked shards keep the input's keys and order: the inputs are found within the first
    # samples of the same split (stop at the last one, found or not: real query sets have no labels).
    pending, truth = {d["key"] for d in chosen}, {}
    for sample in samples_of(shard_dir):
        if sample["__key__"] in pending:
            pending.discard(sample["__key__"])
            if "mask.png" in sample:
                truth[sample["__key__"]] = decode_sample(sample)["mask"]
            if not pending:
                break
    return overlay_sheet([(d["image"], [d["mask"], truth.get(d["key"])]) for d in chosen])
