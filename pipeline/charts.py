"""Static line charts drawn with PIL alone (``dvc plots show`` loads Vega from a CDN: blank offline).

:func:`line_chart` turns rows such as those of ``plots/cmc.csv`` or ``plots/parser/loss.csv``
into a PIL image: linear axes with round-number ticks, one colour per series, a legend box,
a title and axis labels. Callers save it (e.g. ``atomic.replacing``); the same rows give the
same pixels, and PNG bytes carry no timestamp.

Text helpers (:func:`font`, :func:`text_size`, :func:`draw_text`) use Pillow's scalable
default font where it exists (Pillow >= 10.1 with FreeType) and otherwise scale up the
11 px bitmap font, so labels stay legible at 100 % zoom either way.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "line_chart", "parallel_chart", "nice_ticks", "font", "text_size", "draw_text"]

# Series colours (Tableau 10): distinct, readable on white, none of them grey.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127))
_BITMAP_PX = 11  # height of Pillow's built-in bitmap font


# ---- text ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px, or its bitmap font where sizes are unsupported."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only (drawn scaled up by draw_text)
        return ImageFont.load_default()


def _scale(f, size: int) -> int:
    # Bitmap fallback: doubled from 12 px up (the 11 px bitmap is too small to read there).
    return 1 if isinstance(f, ImageFont.FreeTypeFont) else max(1, round(size / 8))


def text_size(text: str, size: int) -> tuple[int, int]:
    """(width, height) px that :func:`draw_text` covers; the height is that of a whole line."""
    f = font(size)
    if isinstance(f, ImageFont.FreeTypeFont):
        ascent, descent = f.getmetrics()
        return (int(math.ceil(f.getlength(text))), ascent + descent)
    s = _scale(f, size)
    _, _, right, _ = f.getbbox(text or " ")
    return (right * s if text else 0, _BITMAP_PX * s)


def draw_text(image: Image.Image, xy: tuple[float, float], text: str, size: int,
              fill: tuple[int, int, int] = (0, 0, 0), align: str = "left") -> tuple[int, int]:
    """Draw one line of ``text`` with its top at ``xy[1]``; ``xy[0]`` is its left edge, centre or
    right edge for ``align`` "left", "center" or "right". Returns the (width, height) drawn."""
    w, h = text_size(text, size)
    x = xy[0] - {"left": 0, "center": w / 2, "right": w}[align]
    x, y = int(round(x)), int(round(xy[1]))
    f = font(size)
    if isinstance(f, ImageFont.FreeTypeFont):
        ImageDraw.Draw(image).text((x, y), text, fill=fill, font=f)
    elif text:
        s = _scale(f, size)
        mask = Image.new("L", (max(1, w // s), _BITMAP_PX), 0)
        ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=f)
        mask = mask.resize((mask.width * s, mask.height * s), Image.NEAREST)
        image.paste(Image.new(image.mode, mask.size, fill), (x, y), mask)
    return w, h


def _vertical_text(image: Image.Image, centre: tuple[float, float], text: str, size: int,
                   fill: tuple[int, int, int]) -> None:
    """``text`` rotated 90 degrees (reads bottom to top), centred on ``centre``."""
    w, h = text_size(text, size)
    if not w:
        return
    strip = Image.new("RGB", (w, h), (255, 255, 255))
    mask = Image.new("L", (w, h), 0)
    draw_text(mask, (0, 0), text, size, fill=255)
    strip.paste(Image.new("RGB", (w, h), fill), (0, 0), mask)
    strip, mask = strip.rotate(90, expand=True), mask.rotate(90, expand=True)
    image.paste(strip, (int(round(centre[0] - h / 2)), int(round(centre[1] - w / 2))), mask)


# ---- axes ------------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> list[float]:
    """Round-number ticks (steps 1, 2, 2.5 or 5 x 10^k) covering [lo, hi], about ``target`` of them.

    A zero-width range is widened first (10 % of the value, or +-1 around 0; +-1 when
    ``integer``), so a single point or a constant series gets a readable axis. ``integer``
    (e.g. epochs, ranks) keeps steps whole: 1, 2, 5 x 10^k, at least 1.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"nice_ticks: range {lo}..{hi}, expected finite lo <= hi")
    if hi == lo:
        pad = 1.0 if integer else abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    power = math.floor(math.log10((hi - lo) / max(1, target - 1)))
    candidates = [m * 10.0 ** e for e in (power - 1, power, power + 1)
                  for m in ((1, 2, 5) if integer else (1, 2, 2.5, 5))]
    candidates = [c for c in candidates if c >= 1 or not integer] or [1.0]

    def fit(step: float) -> tuple[int, float, float]:  # ticks off target, range wasted, then coarser
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        return (abs(last - first + 1 - target), round((last - first) * step - (hi - lo), 9), -step)

    step = min(candidates, key=fit)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [_clean(i * step) for i in range(first, last + 1)]


def _clean(v: float) -> float:
    return float(f"{v:.12g}") + 0.0  # 0.30000000000000004 -> 0.3, -0.0 -> 0.0


def _tick_format(ticks: Sequence[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if max(abs(t) for t in ticks) >= 1e6 or step < 1e-4:
        return "{:.3g}"
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    return "{:." + str(decimals) + "f}"


def _number(value, column: str, index: int) -> float:
    """A cell as float: None, "" and NaN are missing (NaN); anything else must be a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"line_chart: row {index} column {column!r} is {value!r}, expected a number") from None
    return out if math.isfinite(out) else math.nan


# ---- the chart -------------------------------------------------------------------------------
def line_chart(rows: list[dict], x: str, ys: list[str], *, title: str, x_label: str, y_label: str,
               size: tuple[int, int] = (640, 400), x_span: tuple[float, float] | None = None) -> Image.Image:
    """A static line chart of ``rows``: ``x`` along the bottom, one line per column of ``ys``.

    rows: dicts (e.g. from ``csv.DictReader``: numeric strings are fine); a row whose ``x`` or
    series value is None, "", NaN or infinite is skipped for that series, and a gap splits the
    line. Isolated points (and every point of short series) get a dot marker. Axes are linear
    with round-number ticks; the legend box right of the plot names each series in its colour
    ("(no data)" if it has no finite point). ``x_span`` (lo, hi), when given, is always inside the
    x axis (e.g. (0, 180) for angles), whatever the data covers. Returns an RGB image of ``size``
    (width, height).
    Raises ValueError for no rows, no series, a missing ``x`` column or a non-numeric cell.
    """
    width, height = size
    if width < 240 or height < 160:
        raise ValueError(f"line_chart: size {size}, expected at least (240, 160) px")
    if not rows:
        raise ValueError(f"line_chart {title!r}: no rows to plot")
    if not ys:
        raise ValueError(f"line_chart {title!r}: no series (ys is empty)")
    if len(ys) > len(PALETTE):
        raise ValueError(f"line_chart {title!r}: {len(ys)} series, at most {len(PALETTE)} colours")
    missing = [i for i, r in enumerate(rows) if x not in r]
    if missing:
        raise ValueError(f"line_chart {title!r}: row {missing[0]} has no x column {x!r} "
                         f"(columns {sorted(rows[missing[0]])})")
    xs = [_number(r[x], x, i) for i, r in enumerate(rows)]
    series = {name: [(xv, _number(r.get(name), name, i)) for i, (xv, r) in enumerate(zip(xs, rows))]
              for name in ys}
    series = {name: [(a, b) if not (math.isnan(a) or math.isnan(b)) else None for a, b in pts]
              for name, pts in series.items()}
    finite = [p for pts in series.values() for p in pts if p is not None]
    whole = bool(finite) and all(p[0] == int(p[0]) for p in finite)
    x_values = [p[0] for p in finite] + (list(x_span) if x_span is not None else [])
    x_ticks = nice_ticks(min(x_values), max(x_values), integer=whole) if x_values else nice_ticks(0, 1)
    y_ticks = nice_ticks(min(p[1] for p in finite), max(p[1] for p in finite)) if finite else nice_ticks(0, 1)
    x_fmt, y_fmt = _tick_format(x_ticks), _tick_format(y_ticks)

    title_px, label_px, tick_px, legend_px = 16, 13, 12, 13
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    # Layout: title on top; y label and tick labels on the left; x ticks and label below;
    # legend box on the right.
    pad = 8
    title_h = text_size(title, title_px)[1]
    label_h = text_size("Ag", label_px)[1]
    tick_h = text_size("0", tick_px)[1]
    y_tick_w = max(text_size(y_fmt.format(t), tick_px)[0] for t in y_ticks)
    names = [name if any(p is not None for p in series[name]) else f"{name} (no data)" for name in ys]
    swatch = 22
    legend_w = min(width // 3, max(text_size(n, legend_px)[0] for n in names) + swatch + 3 * pad)
    line_h = text_size("Ag", legend_px)[1] + 4
    left = pad + label_h + pad + y_tick_w + 6
    right = width - pad - legend_w - pad
    top = pad + title_h + pad
    bottom = height - pad - label_h - pad - tick_h - 6
    if right - left < 60 or bottom - top < 40:
        raise ValueError(f"line_chart {title!r}: size {size} leaves no room for the plot")

    def px(xv: float, yv: float) -> tuple[float, float]:
        fx = (xv - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (yv - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return (left + fx * (right - left), bottom - fy * (bottom - top))

    draw_text(image, ((left + right) / 2, pad), title, title_px, align="center")
    grid, axis, ink = (228, 228, 228), (60, 60, 60), (0, 0, 0)
    for t in x_ticks:
        gx = round(px(t, y_ticks[0])[0])
        draw.line([(gx, top), (gx, bottom)], fill=grid)
        draw.line([(gx, bottom), (gx, bottom + 4)], fill=axis)
        draw_text(image, (gx, bottom + 6), x_fmt.format(t), tick_px, fill=ink, align="center")
    for t in y_ticks:
        gy = round(px(x_ticks[0], t)[1])
        draw.line([(left, gy), (right, gy)], fill=grid)
        draw.line([(left - 4, gy), (left, gy)], fill=axis)
        draw_text(image, (left - 6, gy - tick_h / 2), y_fmt.format(t), tick_px, fill=ink, align="right")
    draw.rectangle([left, top, right, bottom], outline=axis)
    draw_text(image, ((left + right) / 2, height - pad - label_h), x_label, label_px, fill=ink, align="center")
    _vertical_text(image, (pad + label_h / 2, (top + bottom) / 2), y_label, label_px, ink)

    for name, colour in zip(ys, PALETTE):
        pts = series[name]
        runs, run = [], []
        for p in pts + [None]:
            if p is None:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append(px(*p))
        dots = sum(len(r) for r in runs) <= 40
        for run in runs:
            if len(run) > 1:
                draw.line(run, fill=colour, width=2, joint="curve")
            if dots or len(run) == 1:
                for cx, cy in run:
                    draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)

    lx, ly = right + pad, top
    draw.rectangle([lx, ly, lx + legend_w, ly + pad + len(names) * line_h + pad // 2], fill=(255, 255, 255),
                   outline=axis)
    for i, (name, colour) in enumerate(zip(names, PALETTE)):
        row_y = ly + pad + i * line_h
        mid = row_y + (line_h - 4) / 2
        draw.line([(lx + pad, mid), (lx + pad + swatch - 6, mid)], fill=colour, width=3)
        draw_text(image, (lx + pad + swatch, row_y), name, legend_px, fill=ink)
    return image


def _blend(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def parallel_chart(rows: list[dict], columns: list[str], colour_by: str, *, title: str,
                   size: tuple[int, int] = (760, 420), higher_is_better: bool = True,
                   labels: dict[str, str] | None = None) -> Image.Image:
    """Parallel coordinates: one vertical axis per column of ``columns`` (left to right), one
    polyline per row through its values, coloured by ``colour_by`` (which should be the last
    column, e.g. the sweep's metric) from grey (worst) to red (best; ``higher_is_better``).

    Each axis has its own linear range with round-number ticks (a constant column gets a
    padded one); a row with a missing or non-finite value in some column leaves that
    segment out. The best row is drawn last and thicker. ``labels`` renames axis titles
    (default: the column name's last dotted part). Returns an RGB image of ``size``.
    Raises ValueError for no rows, fewer than 2 columns or a non-numeric cell.
    """
    width, height = size
    if width < 320 or height < 200:
        raise ValueError(f"parallel_chart: size {size}, expected at least (320, 200) px")
    if not rows:
        raise ValueError(f"parallel_chart {title!r}: no rows to plot")
    if len(columns) < 2 or colour_by not in columns:
        raise ValueError(f"parallel_chart {title!r}: columns {columns}, expected at least 2 including {colour_by!r}")
    values = {c: [_number(r.get(c), c, i) for i, r in enumerate(rows)] for c in columns}
    ticks = {}
    for c in columns:
        finite = [v for v in values[c] if not math.isnan(v)]
        ticks[c] = nice_ticks(min(finite), max(finite), target=5) if finite else nice_ticks(0, 1, target=5)
    labels = labels or {}
    title_px, label_px, tick_px, pad = 16, 13, 11, 10
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw_text(image, (width / 2, pad), title, title_px, align="center")
    top = pad + text_size(title, title_px)[1] + pad + text_size("Ag", label_px)[1] + pad
    bottom = height - pad - text_size("0", tick_px)[1]
    side = max(text_size(_tick_format(ticks[c]).format(t), tick_px)[0] for c in columns for t in ticks[c]) + 2 * pad
    xs = [side + i * (width - 2 * side) / (len(columns) - 1) for i in range(len(columns))]

    def py(c: str, v: float) -> float:
        lo, hi = ticks[c][0], ticks[c][-1]
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    metric = values[colour_by]
    finite = [v for v in metric if not math.isnan(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    grey, best_colour = (190, 190, 190), PALETTE[3]
    order = sorted(range(len(rows)), key=lambda i: (math.isnan(metric[i]),
                                                    metric[i] if higher_is_better else -metric[i]))
    order = [i for i in order if math.isnan(metric[i])] + [i for i in order if not math.isnan(metric[i])]
    ink, axis = (0, 0, 0), (60, 60, 60)
    for rank, i in enumerate(order):
        m = metric[i]
        t = 0.0 if math.isnan(m) or hi == lo else (m - lo) / (hi - lo)
        t = t if higher_is_better else 1 - t
        colour = _blend(grey, best_colour, t)
        best = rank == len(order) - 1 and not math.isnan(m)
        pts = [(x, py(c, values[c][i])) if not math.isnan(values[c][i]) else None for x, c in zip(xs, columns)]
        for a, b in zip(pts, pts[1:]):
            if a is not None and b is not None:
                draw.line([a, b], fill=colour, width=3 if best else 1)
    for x, c in zip(xs, columns):
        draw.line([(x, top), (x, bottom)], fill=axis, width=1)
        fmt = _tick_format(ticks[c])
        for t in ticks[c]:
            y = py(c, t)
            draw.line([(x - 3, y), (x + 3, y)], fill=axis)
            draw_text(image, (x - 5, y - text_size("0", tick_px)[1] / 2), fmt.format(t), tick_px, fill=ink,
                      align="right")
        name = labels.get(c, c.rsplit(".", 1)[-1])
        draw_text(image, (x, top - pad - text_size("Ag", label_px)[1]), name, label_px, fill=ink, align="center")
    return image
