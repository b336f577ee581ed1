"""What the parser stages report: metrics files and pictures (raw 0..4 label PNGs look black,
colour overlays are what people read).

:func:`overlay_sheet` lays out one row per image: the image, then a colour overlay per
label map given (e.g. prediction, ground truth), each tile resized to ``tile`` px high.
"""
from __future__ import annotations

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
from pipeline.viz import draw_text, label_legend, overlay_labels, text_size, title_band


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
    return overlay_sheet([(im, [gt, p]) for (im, gt), p in zip(pairs, preds)],
                         columns=["image", "ground truth", "prediction"],
                         title=f"Part parser on {len(pairs)} held-out training images (val split, by identity)")


def overlay_sheet(rows: list[tuple[np.ndarray, list[np.ndarray | None]]], tile: int = 128,
                  alpha: float = 0.55, *, columns: list[str] | None = None,
                  title: str | None = None) -> np.ndarray:
    """rows of (image (H, W, 3) uint8, [labels (H, W) uint8 or None, ...]) -> one RGB uint8 picture.

    Each row is the image, then its colour overlay per label map, every tile ``tile`` px
    high (the images' aspect kept). A None label map leaves its tile grey, marked "no
    labels" (e.g. no ground truth for that image). ``columns`` names the columns (one per
    tile of the widest row, e.g. ["image", "ground truth", "prediction"]), drawn above
    them; ``title`` heads the picture. A legend at the bottom shows each label's colour
    with its number and name (background: not tinted).
    """
    if not rows:
        raise ValueError("overlay_sheet: no rows")
    count = 1 + max(len(labels) for _, labels in rows)
    if columns is not None and len(columns) != count:
        raise ValueError(f"overlay_sheet: {len(columns)} column titles {list(columns)} for {count} columns "
                         f"(the image and {count - 1} label maps)")
    lines, widths = [], [0] * count
    for image, labels in rows:
        width = max(1, round(image.shape[1] * tile / image.shape[0]))
        tiles = [_fit(image, tile, width)]
        for lab in labels:
            tiles.append(_no_labels(tile, width) if lab is None
                         else _fit(overlay_labels(image, lab, alpha), tile, width))
        tiles += [np.full((tile, width, 3), 96, np.uint8)] * (count - len(tiles))
        widths = [max(w, t.shape[1]) for w, t in zip(widths, tiles)]
        lines.append(tiles)
    # Columns as wide as their widest tile (narrower tiles padded black), so titles sit over them;
    # a white gap of ``_GAP`` px between tiles tells one image from the next.
    widths = [w + _GAP for w in widths]
    lines = [np.pad(np.concatenate([np.pad(t, ((0, 0), (0, w - _GAP - t.shape[1]), (0, 0)))
                                    for t, w in zip(tiles, widths)], axis=1), ((0, _GAP), (0, 0), (0, 0)))
             for tiles in lines]
    for line in lines:  # the gaps: white, not the black of the padding
        line[-_GAP:] = 255
        for edge in itertools.accumulate(widths):
            line[:, edge - _GAP:edge] = 255
    total = sum(widths)
    parts = []
    if title:
        parts.append(np.asarray(title_band(total, [title], size=15)))
    if columns is not None:
        parts.append(_column_titles(columns, widths))
    parts += lines
    parts.append(np.asarray(label_legend(total)))
    width = max(p.shape[1] for p in parts)
    parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in parts]
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


_GAP = 2  # px between the tiles of overlay_sheet


def _column_titles(columns: list[str], widths: list[int], size: int = 13) -> np.ndarray:
    """A white band with each column's title centred over its column."""
    band = Image.new("RGB", (sum(widths), text_size("Ag", size)[1] + 8), (255, 255, 255))
    x = 0
    for name, w in zip(columns, widths):
        draw_text(band, (x + w / 2, 4), name, size, align="center")
        x += w
    return np.asarray(band)


def _no_labels(height: int, width: int) -> np.ndarray:
    grey = Image.new("RGB", (width, height), (96, 96, 96))
    if width >= text_size("no labels", 12)[0] + 4 and height >= 20:
        draw_text(grey, (width / 2, height / 2 - 8), "no labels", 12, fill=(220, 220, 220), align="center")
    return np.asarray(grey)


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


def save_png(path: str | Path, picture: np.ndarray) -> Path:
    """Write an RGB array as PNG, atomically."""
    return atomic.write_png(path, Image.fromarray(picture))


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
    return overlay_sheet([(d["image"], [d["mask"], truth.get(d["key"])]) for d in chosen],
                         columns=["image", "predicted mask", "ground truth"],
                         title=f"Predicted view masks, split {split!r} (ground truth where the data has it)")
