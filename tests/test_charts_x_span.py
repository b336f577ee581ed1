"""line_chart's x_span: the x axis always covers the span given (e.g. 0..180 degrees)."""
from __future__ import annotations

import math

import numpy as np

from pipeline.charts import line_chart

ROWS = [{"d": 67.5, "a": 0.2}, {"d": 112.5, "a": 0.3}]


def columns_with(image, colour):
    a = np.asarray(image)
    return np.flatnonzero((a == np.array(colour, np.uint8)).all(axis=-1).any(axis=0))


def test_x_span_widens_the_axis_and_keeps_the_default_otherwise():
    args = dict(title="t", x_label="x", y_label="y")
    plain = line_chart(ROWS, "d", ["a"], **args)
    wide = line_chart(ROWS, "d", ["a"], x_span=(0.0, 180.0), **args)
    assert np.array_equal(np.asarray(plain), np.asarray(line_chart(ROWS, "d", ["a"], x_span=None, **args)))
    # the two points span most of the plain plot, but under half of the 0..180 one
    blue = (31, 119, 180)
    p, w = columns_with(plain, blue), columns_with(wide, blue)
    p_line = p[p < 450]
    w_line = w[w < 450]
    assert (w_line.max() - w_line.min()) < 0.6 * (p_line.max() - p_line.min())
    empty = line_chart([{"d": 22.5, "a": math.nan}], "d", ["a"], x_span=(0.0, 180.0), **args)
    assert empty.size == (640, 400)
