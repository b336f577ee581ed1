"""Label colours, mask overlays and a contact sheet of a rendered dataset.

Raw label PNGs hold values 0..4 and "look black" in an image viewer; these helpers
turn them into something a person can check at a glance.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import atomic
from pipeline.constants import VIEW_NAMES
from pipeline.viz import LABEL_COLOURS, overlay_labels

_NAME = re.compile(r"(\d+)_c(\d\d\d)")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _views(root: Path) -> dict[tuple[str, str], tuple[float, float]]:
    path = root / "views.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {(r["folder"], r["name"]): (float(r["azimuth_deg"]), float(r["elevation_deg"]))
                for r in csv.DictReader(handle)}


def write_contact_sheet(root: Path, out_png: Path, n_ids: int = 6, n_cams: int = 6) -> None:
    """A PNG grid of a rendered dataset: identities (rows) x cameras (columns).

    Uses the test split (every test image has a label). Rows are the ``n_ids`` test
    identities seen by most cameras; each cell shows the image and, beside it, the
    image with its label overlay, captioned with camera and azimuth/elevation. A
    legend of the label colours runs along the bottom. Written atomically.
    """
    root, out_png = Path(root), Path(out_png)
    if n_ids < 1 or n_cams < 1:
        raise ValueError(f"write_contact_sheet: n_ids={n_ids}, n_cams={n_cams}, expected >= 1 each")
    names_path = root / "name_test.txt"
    if not names_path.is_file():
        raise FileNotFoundError(f"{names_path}: not found; expected a dataset in the VeRi-776 layout")
    by_id: dict[int, dict[int, str]] = {}
    for number, line in enumerate(names_path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"{names_path}:{number}: got {name!r}, expected a name like "
                             f"'0002_c002_00030600_0.jpg'")
        by_id.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), name)
    if not by_id:
        raise ValueError(f"{names_path}: no images listed")
    ids = sorted(sorted(by_id, key=lambda v: (-len(by_id[v]), v))[:n_ids])
    views = _views(root)
    folder = root / "image_test"

    first = Image.open(folder / by_id[ids[0]][min(by_id[ids[0]])])
    cell = min(first.size[0], 192)
    pad, head, left = 4, 14, 44
    cols = min(n_cams, max(len(by_id[v]) for v in ids))
    cell_w = 2 * cell + pad
    width = left + cols * (cell_w + 2 * pad)
    legend_h = 24
    height = len(ids) * (cell + head + pad) + legend_h + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for r, vid in enumerate(ids):
        y = r * (cell + head + pad)
        draw.text((4, y + head + cell // 2 - 6), f"{vid:04d}", fill=(0, 0, 0), font=font)
        for c, cam in enumerate(sorted(by_id[vid])[:cols]):
            name = by_id[vid][cam]
            image = Image.open(folder / name).convert("RGB").resize((cell, cell), Image.BILINEAR)
            label_path = (folder / name).with_suffix(".png")
            x = left + c * (cell_w + 2 * pad)
            sheet.paste(image, (x, y + head))
            if label_path.is_file():
                labels = Image.open(label_path).resize((cell, cell), Image.NEAREST)
                over = overlay_labels(np.asarray(image), np.asarray(labels), alpha=0.55)
                sheet.paste(Image.fromarray(over), (x + cell + pad, y + head))
            else:
                draw.text((x + cell + pad + 4, y + head + 4), "no label", fill=(120, 0, 0), font=font)
            az_el = views.get(("image_test", name))
            caption = f"c{cam:03d}" + (f" az {az_el[0]:.0f} el {az_el[1]:.0f}" if az_el else "")
            draw.text((x, y + 1), caption, fill=(60, 60, 60), font=font)
    y = height - legend_h
    x = 4
    for value in range(1, len(LABEL_COLOURS)):
        draw.rectangle([x, y + 5, x + 14, y + 19], fill=tuple(int(v) for v in LABEL_COLOURS[value]),
                       outline=(0, 0, 0))
        draw.text((x + 18, y + 6), f"{value} {VIEW_NAMES[value]}", fill=(0, 0, 0), font=font)
        x += 90
    with atomic.replacing(out_png) as tmp:
        sheet.save(tmp, "PNG")
