"""pipeline.viz: the ranked-list picture, the named label legend, title bands and legible text."""
import numpy as np
import pytest
from PIL import Image, ImageFont

from pipeline import charts
from pipeline.charts import draw_text, text_size
from pipeline.constants import VIEW_NAMES
from pipeline.viz import CORRECT, LABEL_COLOURS, WRONG, label_legend, ranked_grid, title_band


def _dark(a: np.ndarray) -> int:
    return int((np.asarray(a).astype(int).sum(axis=-1) < 200).sum())


def _item(seed: int):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
    labels = np.zeros((48, 32), np.uint8)
    labels[8:40, 4:28] = 1 + seed % 4
    return rgb, labels


def _rows():
    weights = [(0.5, 0.0, 0.5, 0.0), (0.1, 0.2, 0.3, 0.4), (0.0, 1.0, 0.0, 0.0)]
    return [{"title": f"query q{r} (id {r}) AP 0.50", "query": _item(r),
             "ranked": [(*_item(10 * r + i), i != 1, w, 0.25 + 0.1 * i) for i, w in enumerate(weights)]}
            for r in range(2)]


def _long_rows(a: np.ndarray, colour) -> np.ndarray:
    """Rows where ``colour`` runs for most of a 96 px cell: the top and bottom lines of its borders."""
    return np.nonzero((a == np.array(colour, np.uint8)).all(axis=2).sum(axis=1) >= 90)[0]


def test_ranked_grid_borders_captions_and_key():
    image = ranked_grid(_rows())
    assert image.mode == "RGB"
    a = np.asarray(image)
    assert a.shape[1] > 4 * 96 and a.shape[0] > 2 * (96 + 40)
    green, red = _long_rows(a, CORRECT), _long_rows(a, WRONG)
    assert green.size and red.size
    top = min(green.min(), red.min())
    # The header above the first row: a title and notes (text), and the key's border samples.
    header = a[:top - 20]
    assert _dark(header) > 500 and header.std() > 30
    for colour in (CORRECT, WRONG):
        assert (header == np.array(colour, np.uint8)).all(axis=2).sum() > 20, colour
    # Each gallery cell: the border, then a caption (rank, d=...) and the four weights with
    # a square in each part's mask colour.
    wrong_cols = np.nonzero((a[red.min()] == np.array(WRONG, np.uint8)).all(axis=1))[0]
    bottom = red[red < top + 110].max()  # the red cell's bottom border in the first row
    caption = a[bottom + 1:bottom + 60, wrong_cols.min():wrong_cols.max() + 40]
    assert _dark(caption) > 200 and caption.std() > 30
    for colour in LABEL_COLOURS[1:]:
        assert (caption == colour).all(axis=2).sum() >= 16, colour
    # text is legible: a caption line is at least 12 px tall (the old bitmap font was 11)
    ink_rows = np.nonzero((caption.astype(int).sum(axis=2) < 200).any(axis=1))[0]
    first_line = ink_rows[ink_rows < ink_rows.min() + 18]
    assert first_line.max() - first_line.min() >= 9


def test_ranked_grid_title_and_weights_change_the_picture():
    rows = _rows()
    base = np.asarray(ranked_grid(rows))
    assert (np.asarray(ranked_grid(rows)) == base).all()
    titled = np.asarray(ranked_grid(rows, title="VeRi-776: worst queries"))
    assert titled.shape != base.shape or (titled != base).any()
    rows[0]["ranked"][0] = (*rows[0]["ranked"][0][:3], (0.0, 0.0, 0.0, 1.0), 0.25)
    assert (np.asarray(ranked_grid(rows)) != base).any()
    bigger = ranked_grid(_rows(), cell=(128, 128))
    assert bigger.size[0] >= base.shape[1] and bigger.size[1] > base.shape[0]
    assert ranked_grid([]).size[0] > 0  # no rows: just the header


def test_label_legend_names_every_label_and_wraps():
    wide = np.asarray(label_legend(800))
    assert wide.shape[1] == 800 and wide.shape[0] >= 18
    for colour in LABEL_COLOURS[1:]:
        assert (wide == colour).all(axis=2).sum() > 50, colour
    assert _dark(wide) > 300 and wide.std() > 40
    narrow = np.asarray(label_legend(200))
    assert narrow.shape[0] > wide.shape[0]  # names on more lines, none cut off
    for colour in LABEL_COLOURS[1:]:
        assert (narrow == colour).all(axis=2).sum() > 50, colour
    only_parts = np.asarray(label_legend(800, values=(1, 2, 3, 4)))
    assert _dark(only_parts) < _dark(wide)  # no "0 background" entry
    assert len(VIEW_NAMES) == len(LABEL_COLOURS)


def test_title_band_is_never_narrower_than_its_text():
    band = title_band(50, ["A long title that does not fit in fifty pixels", "and a note"])
    a = np.asarray(band)
    assert a.shape[1] >= text_size("A long title that does not fit in fifty pixels", 15)[0]
    assert _dark(a[: a.shape[0] // 2]) > 100 and (a[a.shape[0] // 2:].astype(int).sum(axis=2) < 400).any()


def test_bitmap_font_fallback_is_scaled_up(monkeypatch):
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    monkeypatch.setattr(charts, "font", lambda size: bitmap)
    assert text_size("front .50", 13)[1] >= 20
    canvas = Image.new("RGB", (140, 40), (255, 255, 255))
    w, h = draw_text(canvas, (2, 2), "front .50", 13)
    assert w > 2 * 40 and _dark(np.asarray(canvas)) > 60
    assert ranked_grid(_rows()).size[0] > 4 * 96


@pytest.mark.parametrize("align", ["left", "center", "right"])
def test_draw_text_alignment(align):
    canvas = Image.new("RGB", (200, 30), (255, 255, 255))
    draw_text(canvas, (100, 4), "side", 13, align=align)
    cols = np.nonzero((np.asarray(canvas).astype(int).sum(axis=2) < 300).any(axis=0))[0]
    centre = (cols.min() + cols.max()) / 2
    expect = {"left": 100 + text_size("side", 13)[0] / 2, "center": 100, "right": 100 - text_size("side", 13)[0] / 2}
    assert abs(centre - expect[align]) <= 3
