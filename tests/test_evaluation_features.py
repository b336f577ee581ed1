"""FeatureSet views and the embedding folder: round trip with and without views.npy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.features import ARRAYS, FeatureSet, load_features, write_feature_folder


def arrays(n=5, views=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {"global": rng.standard_normal((n, 6)).astype(np.float32),
           "local": rng.standard_normal((n, 4, 3)).astype(np.float32),
           "visibility": rng.integers(0, 9, (n, 4)).astype(np.float32),
           "ids": rng.integers(0, 3, n).astype(np.int64), "cams": rng.integers(-1, 2, n).astype(np.int64)}
    if views:
        v = rng.uniform(-179.0, 180.0, n)
        v[1] = np.nan
        v[2] = 180.0
        out["views"] = v
    return out


def test_folder_round_trip_with_views(tmp_path):
    a = arrays()
    keys = [f"k{i}" for i in range(5)]
    folder = write_feature_folder(tmp_path / "query", a, keys)
    assert (folder / "views.npy").is_file()
    fs, got_keys = load_features(folder)
    assert got_keys == keys
    np.testing.assert_array_equal(fs.views, a["views"])           # NaN where unknown, kept
    assert fs.views.dtype == np.float64
    for name in ARRAYS:
        assert (folder / f"{name}.npy").is_file()
    np.testing.assert_array_equal(fs.ids, a["ids"])


def test_folder_round_trip_without_views_and_rewrite_drops_stale_views(tmp_path):
    keys = [f"k{i}" for i in range(5)]
    write_feature_folder(tmp_path / "gallery", arrays(), keys)
    for without in (arrays(views=False), {**arrays(views=False), "views": None}):
        folder = write_feature_folder(tmp_path / "gallery", without, keys)
        assert not (folder / "views.npy").exists(), "a rewrite without views leaves no views.npy behind"
        fs, _ = load_features(folder)
        assert fs.views is None


def test_views_follow_subset_and_concat_and_are_validated():
    a = arrays()
    fs = FeatureSet(a["ids"], a["cams"], a["global"], a["local"], a["visibility"], a["views"])
    sub = fs.subset(np.array([4, 2]))
    np.testing.assert_array_equal(sub.views, a["views"][[4, 2]])
    both = FeatureSet.concat([fs, sub])
    assert len(both.views) == 7 and np.isnan(both.views[1])
    plain = FeatureSet(a["ids"], a["cams"], a["global"], a["local"], a["visibility"])
    assert plain.subset(slice(0, 2)).views is None
    assert FeatureSet.concat([fs, plain]).views is None              # optional: kept only if everywhere
    from_torch = FeatureSet([1, 2], None, np.zeros((2, 2), np.float32), views=torch.tensor([0.0, 90.0]))
    assert from_torch.views.tolist() == [0, 90]
    with pytest.raises(ValueError, match="outside"):
        FeatureSet([1, 2], None, np.zeros((2, 2), np.float32), views=[-180.0, 10.0])
    with pytest.raises(ValueError, match="views"):
        FeatureSet([1, 2], None, np.zeros((2, 2), np.float32), views=[1.0, 2.0, 3.0])
