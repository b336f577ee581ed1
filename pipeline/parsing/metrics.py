"""Parser quality: pixel confusion, per-class IoU, and the masks stage's per-split statistics.

IoU of class c = TP / (TP + FP + FN) over all pixels of a set; a class absent from both
prediction and truth has no IoU (None) and is left out of the mean (mIoU).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.constants import NUM_LABELS, VIEW_NAMES
from pipeline.data.records import SPLITS


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, classes: int = NUM_LABELS) -> np.ndarray:
    """(classes, classes) int64 pixel counts: row = true label, column = predicted label."""
    pred, truth = np.asarray(pred).ravel().astype(np.int64), np.asarray(truth).ravel().astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f"confusion_matrix: {pred.size} predicted vs {truth.size} true pixels")
    if truth.size and max(pred.max(), truth.max()) >= classes:
        raise ValueError(f"confusion_matrix: label {max(pred.max(), truth.max())} >= {classes} classes")
    return np.bincount(truth * classes + pred, minlength=classes * classes).reshape(classes, classes)


def iou_scores(conf: np.ndarray) -> dict[str, Any]:
    """``{"iou": [per class or None], "miou", "pixel_acc"}`` from a confusion matrix (see module docstring)."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [None if u == 0 else float(t / u) for t, u in zip(tp, union)]
    valid = [v for v in iou if v is not None]
    return {"iou": iou, "miou": float(np.mean(valid)) if valid else float("nan"),
            "pixel_acc": float(tp.sum() / conf.sum()) if conf.sum() else float("nan")}


class MaskStats:
    """Per-split counts: images, skipped, per-view visibility and area, confusion vs ground truth."""

    def __init__(self):
        self.splits: dict[str, dict[str, Any]] = {}

    def _split(self, split: str) -> dict[str, Any]:
        return self.splits.setdefault(split, {
            "images": 0, "skipped": 0, "truth_images": 0,
            "visible": np.zeros(NUM_LABELS, np.int64), "area": np.zeros(NUM_LABELS, np.float64),
            "confusion": np.zeros((NUM_LABELS, NUM_LABELS), np.int64)})

    def add(self, split: str, labels: np.ndarray, truth_conf: np.ndarray | None) -> None:
        s = self._split(split)
        counts = np.bincount(labels.ravel(), minlength=NUM_LABELS)[:NUM_LABELS]
        s["images"] += 1
        s["visible"] += counts > 0
        s["area"] += counts / labels.size
        if truth_conf is not None:
            s["truth_images"] += 1
            s["confusion"] += truth_conf

    def skip(self, split: str) -> None:
        self._split(split)["skipped"] += 1

    def merge(self, other: MaskStats) -> None:
        for split, theirs in other.splits.items():
            mine = self._split(split)
            for k, v in theirs.items():
                mine[k] = mine[k] + v

    def summary(self) -> dict[str, Any]:
        """JSON-able metrics: per split, plus ``heldout`` = every non-train split's ground truth."""
        out: dict[str, Any] = {}
        heldout = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
        heldout_images = 0
        for split in sorted(self.splits, key=_split_order):
            s = self.splits[split]
            n = max(s["images"], 1)
            entry = {"images": s["images"], "skipped": s["skipped"],
                     "visible": {VIEW_NAMES[c]: round(float(s["visible"][c] / n), 4) for c in range(1, NUM_LABELS)},
                     "area": {VIEW_NAMES[c]: round(float(s["area"][c] / n), 4) for c in range(1, NUM_LABELS)}}
            if s["truth_images"]:
                entry["truth"] = {"images": s["truth_images"], **_named(iou_scores(s["confusion"]))}
                if split != "train":
                    heldout += s["confusion"]
                    heldout_images += s["truth_images"]
            out[split] = entry
        result: dict[str, Any] = {"splits": out}
        if heldout_images:
            result["heldout_truth"] = {"images": heldout_images, **_named(iou_scores(heldout))}
        return result


def _named(scores: dict[str, Any]) -> dict[str, Any]:
    """iou list -> {view name: iou}; rounded for metric files."""
    iou = {VIEW_NAMES[c]: (None if v is None else round(v, 4)) for c, v in enumerate(scores["iou"])}
    return {"miou": round(scores["miou"], 4), "pixel_acc": round(scores["pixel_acc"], 4), "iou": iou}


def _split_order(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)
