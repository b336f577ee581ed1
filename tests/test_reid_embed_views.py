"""pipeline.reid.embed: a sample json's view -> the azimuth that goes into FeatureSet.views / views.npy."""
from __future__ import annotations

import math

import numpy as np

from pipeline.reid.embed import _views_or_none, sample_azimuth


def test_sample_azimuth_reads_the_view_and_wraps_only_out_of_range_values():
    assert sample_azimuth({"vid": 3, "view": {"azimuth_deg": -6.55, "elevation_deg": 12.0}}) == -6.55
    assert sample_azimuth({"view": {"azimuth_deg": 180.0}}) == 180.0
    assert sample_azimuth({"view": {"azimuth_deg": -180.0}}) == 180.0          # (-180, 180]
    assert sample_azimuth({"view": {"azimuth_deg": 190.0}}) == -170.0
    for meta in ({"vid": 3}, {"view": {}}, {"view": {"azimuth_deg": None}}, {"view": {"azimuth_deg": float("nan")}}):
        assert math.isnan(sample_azimuth(meta))


def test_a_split_without_any_view_has_no_views():
    assert _views_or_none(np.full(4, np.nan)) is None
    some = np.array([np.nan, 10.0])
    assert _views_or_none(some) is some
