"""Pictures users look at: label overlays (raw 0..4 masks look black in a viewer), grids.

Also the pieces every picture shares: a title band (:func:`title_band`) and a legend of
the label colours with their names (:func:`label_legend`); text is drawn with
:mod:`pipeline.charts`' helpers (legible sizes, a scaled bitmap font on old Pillow).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.charts import draw_text, text_size
from pipeline.constants import PART_NAMES, VIEW_NAMES

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


INK = (0, 0, 0)
MUTED = (80, 80, 80)


def title_band(width: int, lines: list[str], size: int = 15, sub_size: int = 13,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A white band: ``lines[0]`` as a title, the rest as smaller grey notes; ``width`` px wide,
    or wider where a line needs it (never cut off)."""
    pad = 6
    sizes = [size if i == 0 else sub_size for i in range(len(lines))]
    heights = [text_size(t, z)[1] + 2 for t, z in zip(lines, sizes)]
    width = max([width] + [text_size(t, z)[0] + 2 * pad for t, z in zip(lines, sizes)])
    band = Image.new("RGB", (width, pad + sum(heights) + pad), background)
    y = pad
    for i, (text, h) in enumerate(zip(lines, heights)):
        draw_text(band, (pad, y), text, size if i == 0 else sub_size, fill=INK if i == 0 else MUTED)
        y += h
    return band


def label_legend(width: int, size: int = 13, values: tuple[int, ...] = tuple(range(len(VIEW_NAMES))),
                 background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A band ``width`` px wide: per label value a swatch in ``LABEL_COLOURS`` and "<value> <name>",
    wrapped onto more lines when they do not fit. Background (0) is drawn as an empty box named
    "background (not tinted)": overlays leave background pixels as they are."""
    pad, gap = 6, 14
    box = text_size("Ag", size)[1]
    items = []
    for v in values:
        name = f"{v} {VIEW_NAMES[v]}" + (" (not tinted)" if v == 0 else "")
        items.append((v, name, box + 4 + text_size(name, size)[0]))
    lines, line, used = [], [], pad
    for item in items:
        if line and used + item[2] > width - pad:
            lines.append(line)
            line, used = [], pad
        line.append(item)
        used += item[2] + gap
    lines.append(line)
    row_h = box + 6
    band = Image.new("RGB", (width, pad + len(lines) * row_h + pad - 6), background)
    draw = ImageDraw.Draw(band)
    for r, line in enumerate(lines):
        x, y = pad, pad + r * row_h
        for v, name, w in line:
            colour = tuple(int(c) for c in LABEL_COLOURS[v])
            if v == 0:
                draw.rectangle([x, y + 1, x + box - 2, y + box - 1], fill=background, outline=MUTED)
            else:
                draw.rectangle([x, y + 1, x + box - 2, y + box - 1], fill=colour, outline=INK)
                draw.rectangle([x + 1, y + 2, x + box - 3, y + box - 2], fill=colour)
            draw_text(band, (x + box + 4, y), name, size)
            x += w + gap
    return band


def stack(parts: list[Image.Image], background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Images one above the other, left-aligned, on a canvas as wide as the widest."""
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), background)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


# ---- ranked lists ------------------------------------------------------------------------------
CORRECT, WRONG, UNKNOWN = (30, 170, 60), (220, 40, 40), (150, 150, 150)


def ranked_grid(rows: list[dict], cell: tuple[int, int] = (96, 96), title: str | None = None):
    """A ranked-list picture: one row per query, its image then its top-k gallery images.

    Each row is ``{"title": str, "query": (rgb, labels), "ranked": [(rgb, labels, correct,
    weights, distance), ...]}`` with rgb (H, W, 3) uint8, labels (H, W) uint8 0..4,
    ``weights`` the 4 common-visible attention weights (front, back, side, top) between
    the query and that image. Every image is shown with its view-mask overlay; gallery
    cells get a green (same vehicle id) or red (different id) border (grey: ``correct`` None,
    the id is unknown, as for a search of new images) and a caption
    ``#rank  d=<distance>`` over the four weights by part name, each beside a square in
    that part's mask colour. ``cell`` is (width, height) px of one image. A title (``title``,
    or a default) and a key explaining borders, ``d`` and the weights head the picture.
    Returns a PIL RGB image.
    """
    cw, ch = cell
    pad, gap = 6, 8
    row_px, cap_px, small_px = 14, 13, 12
    line = text_size("Ag", cap_px)[1]
    small = text_size("Ag", small_px)[1]
    half = [PART_NAMES[:2], PART_NAMES[2:]]
    sub_w = max(text_size(f"{name} 1.0", small_px)[0] for name in PART_NAMES) + small + 8  # one weight
    part_w = 2 * sub_w
    col_w = max(cw, part_w, text_size("#10  d=0.00", cap_px)[0]) + gap
    caption = line + 2 * small + 6
    title_h = text_size("Ag", row_px)[1] + 4
    k = max((len(r["ranked"]) for r in rows), default=0)
    grid_w = pad + col_w + 10 + k * col_w + pad
    block = title_h + ch + 4 + caption + pad

    legend = _ranked_key(grid_w)
    key = title_band(max(grid_w, legend.width), [
        title or f"Ranked lists: each query, then its top {k} gallery images by PVEN distance",
        "d = PVEN distance between the query and that image: the ranking the metrics use (smaller = closer).",
        "front/back/side/top = common-visible attention weight of each part in d (square = its mask colour).",
    ])
    width = max(grid_w, key.width, legend.width)
    canvas = Image.new("RGB", (width, max(1, len(rows)) * block + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def tile(rgb, labels, x, y, border):
        img = Image.fromarray(overlay_labels(rgb, labels, alpha=0.35)).resize((cw, ch), Image.BILINEAR)
        canvas.paste(img, (x, y))
        draw.rectangle([x - 2, y - 2, x + cw + 1, y + ch + 1], outline=border, width=3)

    for r, row in enumerate(rows):
        y = pad + r * block
        draw_text(canvas, (pad, y), row["title"], row_px)
        y += title_h
        tile(*row["query"], pad, y, (40, 40, 40))
        draw_text(canvas, (pad, y + ch + 4), "query", cap_px)
        for i, (rgb, labels, correct, weights, dist) in enumerate(row["ranked"]):
            x = pad + col_w + 10 + i * col_w
            tile(rgb, labels, x, y, UNKNOWN if correct is None else CORRECT if correct else WRONG)
            ty = y + ch + 4
            draw_text(canvas, (x, ty), f"#{i + 1}  d={dist:.2f}", cap_px)
            ty += line + 2
            values = dict(zip(PART_NAMES, weights))
            for pair in half:
                for j, name in enumerate(pair):
                    tx = x + j * sub_w
                    colour = tuple(int(c) for c in LABEL_COLOURS[1 + PART_NAMES.index(name)])
                    draw.rectangle([tx, ty + 3, tx + small - 5, ty + small - 2], fill=colour, outline=MUTED)
                    draw_text(canvas, (tx + small - 1, ty), f"{name} {_weight(values[name])}", small_px,
                              fill=INK if values[name] > 0 else MUTED)
                ty += small + 2
    return stack([key, legend, canvas])


def _weight(value: float) -> str:
    """0.5 -> ".50", 1 -> "1.0": two characters of precision, short enough for a caption."""
    return "1.0" if value >= 0.995 else f"{value:.2f}".lstrip("0") if value >= 0 else f"{value:.2f}"


def _ranked_key(width: int) -> Image.Image:
    """A band: green and red border samples with what they mean."""
    size, pad = 13, 6
    h = text_size("Ag", size)[1]
    items = [(CORRECT, "green border: same vehicle id as the query"),
             (WRONG, "red border: different vehicle id"),
             ((40, 40, 40), "dark border: the query")]
    need = pad + sum(h + 8 + text_size(t, size)[0] + 18 for _, t in items)
    band = Image.new("RGB", (max(width, need), h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    x = pad
    for colour, text in items:
        draw.rectangle([x, pad, x + h, pad + h - 1], outline=colour, width=3)
        tw, _ = draw_text(band, (x + h + 6, pad), text, size)
        x += h + 6 + tw + 18
    return band
