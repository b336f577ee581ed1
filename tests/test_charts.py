"""pipeline.charts: static PNG line charts (CMC, loss, mIoU) that need no CDN to view."""
import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFont

from pipeline import charts
from pipeline.charts import PALETTE, draw_text, line_chart, nice_ticks, text_size

WHITE = (255, 255, 255)
CMC = [{"rank": k, "pven": 1 - 0.5 * math.exp(-k / 6), "global": 1 - 0.6 * math.exp(-k / 9)} for k in range(1, 51)]


def chart(rows=CMC, ys=("pven", "global"), **kw):
    args = {"title": "CMC", "x_label": "rank", "y_label": "match rate", **kw}
    return line_chart(rows, "rank", list(ys), **args)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def is_colour(pixels: np.ndarray, colour) -> np.ndarray:
    return (pixels == np.array(colour, np.uint8)).all(axis=-1)


def test_size_mode_and_series_colours_along_their_lines():
    image = chart(size=(720, 450))
    assert image.size == (720, 450) and image.mode == "RGB"
    a = np.asarray(image)
    for colour in PALETTE[:2]:
        ys, xs = np.nonzero(is_colour(a, colour))
        # each line crosses most of the plot's width, not just the legend's swatch
        assert xs.max() - xs.min() > 0.6 * 720, colour
    # pven climbs faster: at the same x its line lies above (smaller row) the global line
    left = a[:, 100:140]
    assert np.nonzero(is_colour(left, PALETTE[0]))[0].mean() < np.nonzero(is_colour(left, PALETTE[1]))[0].mean()
    assert not is_colour(a, PALETTE[2]).any()  # two series: two colours


def test_legend_title_and_axis_text_are_drawn():
    a = np.asarray(chart()).astype(int)
    frame = is_colour(a, (60, 60, 60)).sum(axis=0)
    plot_right = 320 + int(np.argmax(frame[320:]))  # the plot frame's right edge
    legend = a[:, plot_right + 3:]
    # The legend (right of the plot) holds a swatch per series, one below the other, each with its name.
    swatch_rows = {colour: np.nonzero(is_colour(legend, colour).any(axis=1))[0] for colour in PALETTE[:2]}
    for colour, rows in swatch_rows.items():
        assert rows.size, colour
        swatch_end = np.nonzero(is_colour(legend, colour).any(axis=0))[0].max()
        beside = legend[rows.min() - 6:rows.max() + 8, swatch_end + 2:swatch_end + 60]
        assert (beside.sum(axis=2) < 300).sum() > 20, f"no name beside the {colour} swatch"
    assert swatch_rows[PALETTE[0]].max() < swatch_rows[PALETTE[1]].min()
    title_band = a[:22, 150:450]
    assert (title_band.sum(axis=2) < 300).sum() > 40 and title_band.std() > 20
    x_label_band, y_label_band = a[-22:, 200:400], a[120:280, :24]
    for band in (x_label_band, y_label_band):
        assert (band.sum(axis=2) < 300).sum() > 15


def test_deterministic_and_input_sensitive():
    assert png(chart()) == png(chart())
    other = [dict(r, pven=r["pven"] * 0.9) for r in CMC]
    assert png(chart(other)) != png(chart())
    assert png(chart(title="CMC, other title")) != png(chart())
    assert b"tIME" not in png(chart())  # no timestamp chunk


def test_missing_values_are_skipped_and_split_the_line():
    rows = [{"epoch": e, "loss": 1 / e} for e in range(1, 11)]
    rows[4]["loss"] = float("nan")
    rows[5]["loss"] = None
    rows[6]["loss"] = ""
    rows.append({"epoch": 11})  # no value at all
    image = line_chart(rows, "epoch", ["loss"], title="loss", x_label="epoch", y_label="loss")
    a = np.asarray(image)
    cols = np.nonzero(is_colour(a[40:-40, 60:-140], PALETTE[0]).any(axis=0))[0]
    assert np.diff(cols).max() > 40  # the gap between epoch 4 and epoch 8 is not bridged


def test_strings_from_csv_single_point_constant_and_empty_series():
    rows = [{"epoch": "1", "val_miou": "0.42", "val_pixel_acc": "nan"}]
    one = np.asarray(line_chart(rows, "epoch", ["val_miou", "val_pixel_acc"], title="mIoU", x_label="epoch",
                                y_label="mIoU"))
    assert is_colour(one, PALETTE[0]).sum() > 20  # the one point is drawn as a dot (and the legend swatch)
    const = line_chart([{"step": s, "loss": 0.8} for s in range(0, 5000, 50)], "step", ["loss"],
                       title="flat", x_label="step", y_label="loss")
    ys, xs = np.nonzero(is_colour(np.asarray(const), PALETTE[0]))
    assert xs.max() - xs.min() > 300


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no rows"):
        line_chart([], "rank", ["pven"], title="CMC", x_label="rank", y_label="rate")
    with pytest.raises(ValueError, match="no series"):
        chart(ys=())
    with pytest.raises(ValueError, match="no x column 'rank'"):
        line_chart([{"k": 1, "pven": 0.5}], "rank", ["pven"], title="CMC", x_label="rank", y_label="rate")
    with pytest.raises(ValueError, match=r"row 1 column 'pven' is 'oops'"):
        chart([{"rank": 1, "pven": 0.5}, {"rank": 2, "pven": "oops"}], ys=("pven",))
    with pytest.raises(ValueError, match="at least"):
        chart(size=(100, 80))


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(1, 50, integer=True) == [0, 10, 20, 30, 40, 50]
    assert nice_ticks(1, 12, integer=True) == [0, 2, 4, 6, 8, 10, 12]
    assert nice_ticks(1, 1, integer=True) == [0, 1, 2]
    assert nice_ticks(0.46, 1.0) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for lo, hi in [(0.003, 0.0071), (-3, -3), (0, 0), (0.16, 2.3), (-7.5, 120)]:
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 9
        steps = np.diff(ticks)
        assert np.allclose(steps, steps[0])
        assert any(math.isclose(steps[0], m * 10.0 ** e, rel_tol=1e-6) for m in (1, 2, 2.5, 5) for e in range(-6, 7))
    with pytest.raises(ValueError, match="finite"):
        nice_ticks(0, math.inf)


def test_bitmap_font_fallback_is_scaled_up(monkeypatch):
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    monkeypatch.setattr(charts, "font", lambda size: bitmap)
    assert text_size("rank", 13)[1] >= 20  # the 11 px bitmap font, doubled
    canvas = Image.new("RGB", (120, 40), WHITE)
    draw_text(canvas, (2, 2), "rank", 13)
    assert (np.asarray(canvas).sum(axis=2) < 300).sum() > 40
    image = chart()
    assert image.size == (640, 400) and is_colour(np.asarray(image), PALETTE[0]).sum() > 100
