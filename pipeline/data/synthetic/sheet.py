"""Label colours, mask overlays and a contact sheet of a rendered dataset.

Raw label PNGs hold values 0..4 and "look black" in an image viewer; these helpers
turn them into something a person can check at a glance. Given the identities
(:func:`.families.identities`), the contact sheet shows whole look-alike families,
one member per row with its marks named, so one can check that members differ only
in their marks and that the marks show at the rendered size.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from pipeline import atomic
from pipeline.viz import LABEL_COLOURS, draw_text, label_legend, overlay_labels, stack, text_size, title_band

if TYPE_CHECKING:
    from .families import Identity

__all__ = ["LABEL_COLOURS", "overlay_labels", "write_contact_sheet"]  # re-exported by the package

_NAME = re.compile(r"(\d+)_c(\d\d\d)")


def _views(root: Path) -> dict[tuple[str, str], tuple[float, float]]:
    path = root / "views.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {(r["folder"], r["name"]): (float(r["azimuth_deg"]), float(r["elevation_deg"]))
                for r in csv.DictReader(handle)}


def write_contact_sheet(root: Path, out_png: Path, n_ids: int = 6, n_cams: int = 6,
                        identities: Sequence[Identity] | None = None) -> None:
    """A PNG grid of a rendered dataset: identities (rows) x cameras (columns).

    Uses the test split (every test image has a label). Rows are the ``n_ids`` test
    identities seen by most cameras; with ``identities`` (the dataset's, from
    :func:`.families.identities`), they are instead the members of the first test
    families, whole families only (at least one) up to ``n_ids`` rows, one family after
    the other with a rule between them, each row labelled with its vid, family and
    marks. Each cell shows the image and, beside it, the image with its label overlay,
    captioned with camera and azimuth/elevation. A title and a note on how to read a
    cell head the sheet; a legend of the label colours with their names runs along the
    bottom. Written atomically.
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
    notes: dict[int, list[str]] = {}
    if identities is None:
        ids = sorted(sorted(by_id, key=lambda v: (-len(by_id[v]), v))[:n_ids])
    else:
        families: dict[int, list[Identity]] = {}
        for person in identities:
            if person.vid in by_id:
                families.setdefault(person.family, []).append(person)
        if not families:
            raise ValueError(f"write_contact_sheet: none of the given identities is in {names_path}")
        ids = []
        for members in families.values():
            if ids and len(ids) + len(members) > n_ids:
                break
            ids.extend(p.vid for p in members)
            for p in members:
                notes[p.vid] = [f"{p.vid:04d}", f"family {p.family}", *p.marks]
    views = _views(root)
    folder = root / "image_test"

    first = Image.open(folder / by_id[ids[0]][min(by_id[ids[0]])])
    cell = min(first.size[0], 192)
    size = 13
    pad, head = 4, text_size("Ag", size)[1] + 2
    left = max(text_size(t, size)[0] for t in ["0000", *(t for n in notes.values() for t in n)]) + 12
    cols = min(n_cams, max(len(by_id[v]) for v in ids))

    def caption(vid: int, cam: int) -> str:
        az_el = views.get(("image_test", by_id[vid][cam]))
        return f"c{cam:03d}" + (f"  az {az_el[0]:.0f}\u00b0  el {az_el[1]:.0f}\u00b0" if az_el else "")

    widest = max(text_size(caption(v, cam), size)[0] for v in ids for cam in sorted(by_id[v])[:cols])
    cell_w = max(2 * cell + pad, widest + 2 * pad)  # captions never run into the next cell
    width = left + cols * (cell_w + 2 * pad)
    height = len(ids) * (cell + head + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    family_of = {p.vid: p.family for p in identities or ()}
    for r, vid in enumerate(ids):
        y = r * (cell + head + pad)
        if r and family_of.get(vid) != family_of.get(ids[r - 1]):     # a rule between families
            draw.line([(0, y + 1), (width, y + 1)], fill=(90, 90, 90), width=2)
        lines = notes.get(vid, [f"{vid:04d}"])
        line_h = text_size("Ag", size)[1] + 1
        top = y + head + max(0, (cell - len(lines) * line_h) // 2)
        for k, line in enumerate(lines):
            draw_text(sheet, (4, top + k * line_h), line, size, fill=(0, 0, 0) if k == 0 else (70, 70, 70))
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
                draw.rectangle([x + cell + pad, y + head, x + 2 * cell + pad - 1, y + head + cell - 1],
                               fill=(235, 235, 235))
                draw_text(sheet, (x + cell + pad + 4, y + head + 4), "no label", size, fill=(120, 0, 0))
            draw_text(sheet, (x, y + 1), caption(vid, cam), size, fill=(60, 60, 60))
    what = f"{len(ids)} identities (rows)"
    if notes:
        n_fam = len({family_of[v] for v in ids})
        what = f"{n_fam} look-alike famil{'y' if n_fam == 1 else 'ies'}, " + what
    header = title_band(width, [
        f"Synthetic dataset {root.name}: test split, {what}, up to {cols} cameras each",
        ("Row label: vehicle id, family, marks (members of a family differ only in their marks). "
         if notes else "Row label: vehicle id. ")
        + "Each cell: the rendered image | the same image with its view labels overlaid.",
        "Caption: camera; az / el = the camera's azimuth / elevation around the vehicle (degrees).",
    ])
    picture = stack([header, sheet, label_legend(width, size=size)])
    with atomic.replacing(out_png) as tmp:
        picture.save(tmp, "PNG")
