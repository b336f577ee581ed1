"""Protocols: VehicleID resampling, VERI-Wild junk switch, VeRi/synthetic junk removal, dispatch."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import (
    DistanceSpec,
    FeatureSet,
    evaluate,
    evaluate_protocol,
    evaluate_vehicleid,
    evaluate_veri776,
    evaluate_veriwild,
    vehicleid_split,
)


def test_vehicleid_split_is_seeded_and_one_gallery_image_per_id():
    ids = np.repeat(np.arange(20), 5)
    ids = np.append(ids, 99)                       # a single-image id: gallery only, no query
    q1, g1 = vehicleid_split(ids, seed=0)
    q2, g2 = vehicleid_split(ids, seed=0)
    assert np.array_equal(q1, q2) and np.array_equal(g1, g2)
    assert sorted(ids[g1].tolist()) == sorted(set(ids.tolist()))        # each id exactly once
    assert len(q1) + len(g1) == len(ids) and not set(q1) & set(g1)
    assert 99 not in ids[q1]
    q3, g3 = vehicleid_split(ids, seed=1)
    _, g4 = vehicleid_split(ids, seed=0, repeat=1)
    assert not np.array_equal(g1, g3) and not np.array_equal(g1, g4)


def make_test_list(seed=0, n_ids=25, per_id=4, dim=8):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_ids), per_id)
    centres = rng.standard_normal((n_ids, dim))
    feats = (centres[ids] + 0.7 * rng.standard_normal((len(ids), dim))).astype(np.float32)
    return FeatureSet(ids, None, feats)


def test_vehicleid_repeats_give_mean_and_std():
    test = make_test_list()
    spec = DistanceSpec(mode="global")
    res = evaluate_vehicleid(test, spec, repeats=3, seed=5)
    assert len(res.runs) == 3 and res.protocol == "vehicleid" and not res.remove_junk
    maps = [r.mAP for r in res.runs]
    assert res.mean["mAP"] == pytest.approx(np.mean(maps)) and res.std["mAP"] == pytest.approx(np.std(maps))
    assert res.std["mAP"] > 0                      # different draws, different galleries
    for r in res.runs:                             # 25 gallery images, 75 queries, one true match each
        assert r.num_queries == 75 and r.num_skipped == 0
        assert np.all(r.inp[~np.isnan(r.inp)] == r.ap[~np.isnan(r.ap)])
    again = evaluate_vehicleid(test, spec, repeats=3, seed=5)
    assert all(a.same_as(b) for a, b in zip(res.runs, again.runs))
    assert set(res.summary()) >= {"mAP", "mAP_std", "rank1", "rank1_std", "repeats"}


def test_veriwild_junk_switch_and_veri776_removes_junk():
    # query id 1 on camera 0; its closest true match is on the same camera
    q = FeatureSet([1], [0], np.array([[0.0, 0.0]], np.float32))
    g = FeatureSet([1, 2, 1], [0, 1, 1], np.array([[0.1, 0], [0.2, 0], [0.3, 0]], np.float32))
    spec = DistanceSpec(mode="global")
    removed = evaluate_veriwild(q, g, spec)
    kept = evaluate_veriwild(q, g, spec, remove_junk=False)
    assert removed.remove_junk and "removed" in removed.description
    assert not kept.remove_junk and "kept" in kept.description
    assert removed.metrics.first_rank[0] == 2 and kept.metrics.first_rank[0] == 1
    assert evaluate_veri776(q, g, spec).metrics.same_as(removed.metrics)
    with pytest.raises(ValueError, match="subset"):
        evaluate_veriwild(q, g, spec, subset="huge")
    labelled = evaluate_veriwild(q, g, spec, subset="small")
    assert labelled.protocol == "veriwild-small" and "official small" in labelled.description


def test_protocol_dispatch():
    test = make_test_list(n_ids=6, per_id=3)
    spec = DistanceSpec(mode="global")
    r = evaluate_protocol("vehicleid", spec, test=test, repeats=2)
    assert len(r.runs) == 2
    q, g = test.subset(np.arange(0, 18, 3)), test.subset(np.setdiff1d(np.arange(18), np.arange(0, 18, 3)))
    s = evaluate_protocol("synthetic", spec, query=q, gallery=g)
    assert s.metrics.same_as(evaluate(q, g, spec))
    with pytest.raises(ValueError, match="protocol"):
        evaluate_protocol("market", spec, query=q, gallery=g)
    with pytest.raises(ValueError, match="test="):
        evaluate_protocol("vehicleid", spec, query=q, gallery=g)
