"""Ranked-list pictures of a search: a PNG (the evaluate stage's grid) and a self-contained HTML page.

Each query row shows the query with its view-mask overlay, then its top results with theirs,
the PVEN distance and the four common-visible weights. Borders are green / red where the
index knows the ids of both images (same / different vehicle), grey otherwise.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
from PIL import Image

from pipeline.constants import PART_NAMES
from pipeline.viz import overlay_labels, ranked_grid

# One query: {"name": str, "image": rgb, "mask": labels, "id": int (-1 unknown),
#  "results": [{"key", "distance", "weights": {part: w}, "id", "image", "mask"}]}
Row = dict[str, Any]


def _correct(query_id: int, result_id: int) -> bool | None:
    return None if query_id < 0 or result_id < 0 else query_id == result_id


def ranked_png(rows: list[Row], lam: float, variant: str) -> Image.Image:
    """The ranked lists as one PIL image (:func:`pipeline.viz.ranked_grid`)."""
    grid = [{"title": f"query {r['name']}", "query": (r["image"], r["mask"]),
             "ranked": [(x["image"], x["mask"], _correct(r["id"], x["id"]), [x["weights"][p] for p in PART_NAMES],
                         x["distance"]) for x in r["results"]]} for r in rows]
    k = max((len(r["results"]) for r in rows), default=0)
    return ranked_grid(grid, title=f"Search: top {k} of the index by {variant} PVEN distance (lambda {lam:g})")


def _data_uri(rgb: np.ndarray, labels: np.ndarray, side: int = 128) -> str:
    img = Image.fromarray(overlay_labels(rgb, labels, alpha=0.35))
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ranked_html(rows: list[Row], lam: float, variant: str) -> str:
    """The ranked lists as one HTML page with its images inline (no other file needed)."""
    out = ["<!doctype html><meta charset='utf-8'><title>PVEN search</title>",
           "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;font-size:12px}"
           "img{border:3px solid #999}.ok img{border-color:#1eaa3c}.no img{border-color:#dc2828}</style>",
           f"<h1>Search by {html.escape(variant)} PVEN distance (lambda {lam:g})</h1>"]
    for r in rows:
        out.append(f"<h2>{html.escape(r['name'])}</h2><table><tr><td><img src='{_data_uri(r['image'], r['mask'])}'>"
                   "<br>query</td>")
        for rank, x in enumerate(r["results"], 1):
            cls = {True: "ok", False: "no", None: ""}[_correct(r["id"], x["id"])]
            weights = "<br>".join(f"{p} {x['weights'][p]:.2f}" for p in PART_NAMES)
            out.append(f"<td class='{cls}'><img src='{_data_uri(x['image'], x['mask'])}'><br>#{rank} "
                       f"d={x['distance']:.4f}<br>{html.escape(x['key'])}<br>{weights}</td>")
        out.append("</tr></table>")
    return "\n".join(out) + "\n"
