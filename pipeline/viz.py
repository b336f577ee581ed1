"""Pictures users look at: label overlays (raw 0..4 masks look black in a viewer), grids."""
from __future__ import annotations

import numpy as np

from pipeline.constants import VIEW_NAMES

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


def ranked_grid(rows: list[dict], cell: tuple[int, int] = (96, 96)):
    """A ranked-list picture: one row per query, its image then its top-k gallery images.

    Each row is ``{"title": str, "query": (rgb, labels), "ranked": [(rgb, labels, correct,
    weights, distance), ...]}`` with rgb (H, W, 3) uint8, labels (H, W) uint8 0..4,
    ``weights`` the 4 common-visible attention weights (front, back, side, top) between
    the query and that image. Every image is shown with its view-mask overlay; gallery
    cells get a green (correct) or red (wrong) border and a caption ``d=<distance>`` over
    ``F/B/S/T`` weights. ``cell`` is (width, height) px of one image.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cw, ch = cell
    pad, caption = 4, 24
    title_h = 12
    k = max((len(r["ranked"]) for r in rows), default=0)
    width = (k + 1) * (cw + pad) + pad + 8
    height = max(1, len(rows)) * (ch + caption + title_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def tile(rgb, labels, x, y, border):
        img = Image.fromarray(overlay_labels(rgb, labels, alpha=0.35)).resize((cw, ch), Image.BILINEAR)
        canvas.paste(img, (x, y))
        if border is not None:
            draw.rectangle([x - 2, y - 2, x + cw + 1, y + ch + 1], outline=border, width=3)

    for r, row in enumerate(rows):
        y = pad + r * (ch + caption + title_h + pad)
        draw.text((pad, y), row["title"], fill=(0, 0, 0), font=font)
        y += title_h
        tile(*row["query"], pad, y, (40, 40, 40))
        draw.text((pad, y + ch + 2), "query", fill=(0, 0, 0), font=font)
        for i, (rgb, labels, correct, weights, dist) in enumerate(row["ranked"]):
            x = pad + 8 + (i + 1) * (cw + pad)
            tile(rgb, labels, x, y, (30, 170, 60) if correct else (220, 40, 40))
            w = "/".join(f"{v:.1f}" for v in weights)
            draw.text((x, y + ch + 2), f"{i + 1}: d={dist:.2f}", fill=(0, 0, 0), font=font)
            draw.text((x, y + ch + 12), f"FBST {w}", fill=(90, 90, 90), font=font)
    return canvas
