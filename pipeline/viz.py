"""Pictures users look at: label overlays (raw 0..4 masks look black in a viewer), grids."""
from __future__ import annotations

import numpy as np

from pipeline.data.records import VIEW_NAMES

# One colour per parsing label: background, front, back, side, top.
LABEL_COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 110, 230], [60, 200, 90], [240, 200, 40]], np.uint8)


def overlay_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend label colours into an image: rgb (H, W, 3) uint8, labels (H, W) uint8 in 0..4.

    Background pixels are left as they are. Returns (H, W, 3) uint8.
    """
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"overlay: image {rgb.shape[:2]} and labels {labels.shape} differ in size")
    out = rgb.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * LABEL_COLOURS[labels[fg]]
    return out.round().astype(np.uint8)


def legend() -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) per view, for captions."""
    return [(name, tuple(int(c) for c in LABEL_COLOURS[i])) for i, name in enumerate(VIEW_NAMES)]
