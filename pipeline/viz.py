"""Pictures users look at: label overlays (raw 0..4 masks look black in a viewer), grids."""
from __future__ import annotations

import numpy as np

from pipeline.data.records import VIEW_NAMES

# RGB per parsing label: 0 background, 1 front, 2 back, 3 side, 4 top.
LABEL_COLOURS: np.ndarray = np.array(
    [(0, 0, 0), (230, 40, 60), (40, 190, 80), (30, 120, 230), (250, 210, 30)], dtype=np.uint8)
LABEL_COLOURS.setflags(write=False)


def overlay_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``LABEL_COLOURS[labels]`` over ``rgb`` where labels > 0.

    rgb: (H, W, 3) uint8; labels: (H, W) integer values 0..4; alpha in [0, 1] is the
    weight of the label colour. Background pixels are left as they are.
    Returns a new (H, W, 3) uint8 array.
    """
    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"overlay_labels: rgb has shape {rgb.shape} dtype {rgb.dtype}, "
                         f"expected (H, W, 3) uint8")
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"overlay_labels: labels shape {labels.shape} != image size {rgb.shape[:2]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"overlay_labels: labels dtype {labels.dtype}, expected integers 0..4")
    if labels.size and (labels.min() < 0 or labels.max() >= len(LABEL_COLOURS)):
        raise ValueError(f"overlay_labels: label values {labels.min()}..{labels.max()}, "
                         f"expected 0..{len(LABEL_COLOURS) - 1}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_labels: alpha {alpha}, expected 0..1")
    out = rgb.copy()
    mask = labels > 0
    blend = (1 - alpha) * rgb[mask].astype(np.float32) + alpha * LABEL_COLOURS[labels[mask]]
    out[mask] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def legend() -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) per view, for captions."""
    return [(name, tuple(int(c) for c in LABEL_COLOURS[i])) for i, name in enumerate(VIEW_NAMES)]
