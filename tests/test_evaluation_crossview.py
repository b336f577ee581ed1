"""Cross-view metrics: the positive table, subset metrics and bins == brute-force evaluation with junk and ties."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import DistanceSpec, FeatureSet, evaluate, pven_distance, rank_metrics
from pipeline.evaluation.crossview import BINS, FRONT_BACK, SUBSETS, azimuth_difference, crossview_metrics
from pipeline.evaluation.metrics import subset_metrics


def brute_force(d, q_ids, g_ids, q_cams, g_cams, keep_positive, max_rank=10):
    """Sort every row; junk = same id and camera, plus the positives ``keep_positive`` rejects.

    keep_positive(i, j) -> bool for a valid positive j of query i. Ties: negatives first.
    Returns (ap, first_rank, mAP, rank1, num_queries).
    """
    aps, firsts = [], []
    for i in range(d.shape[0]):
        same = g_ids == q_ids[i]
        junk = same & (g_cams == q_cams[i]) & (q_cams[i] >= 0)
        pos = same & ~junk
        for j in np.flatnonzero(pos):
            if not keep_positive(i, j):
                pos[j] = False
                junk[j] = True                           # out-of-subset positive: removed
        keep = ~junk
        row, p = d[i][keep], pos[keep]
        if not p.any():
            aps.append(np.nan), firsts.append(0)
            continue
        order = np.lexsort((p.astype(int), row))        # by distance, negatives (0) first on ties
        ranks = np.flatnonzero(p[order]) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        firsts.append(ranks[0])
    ap, first = np.array(aps), np.array(firsts)
    valid = first > 0
    if not valid.any():
        return ap, first, np.nan, np.nan, 0
    return ap, first, ap[valid].mean(), np.mean(first[valid] == 1), int(valid.sum())


def in_subset(name, a_q, a_g):
    if np.isnan(a_q) or np.isnan(a_g):
        return False
    if name == FRONT_BACK:
        return (abs(a_q) <= 45 and abs(a_g) >= 135) or (abs(a_q) >= 135 and abs(a_g) <= 45)
    d = float(azimuth_difference(a_q, a_g))
    for n, lo, hi in BINS:
        if n == name:
            return lo <= d <= hi if hi == 180 else lo <= d < hi
    raise KeyError(name)


def test_azimuth_difference():
    a = np.array([170.0, 0.0, 90.0, 45.0, -135.0, 180.0, 10.0])
    b = np.array([-170.0, 180.0, -90.0, 0.0, 135.0, -179.0, 10.0])
    assert azimuth_difference(a, b).tolist() == [20.0, 180.0, 180.0, 45.0, 90.0, 1.0, 0.0]
    assert np.isnan(azimuth_difference(np.nan, 3.0))


@pytest.mark.parametrize("trial", range(12))
def test_bins_equal_brute_force_with_junk_and_ties(trial):
    rng = np.random.default_rng(trial)
    nq, ng, nid = int(rng.integers(3, 20)), int(rng.integers(5, 60)), int(rng.integers(1, 6))
    q_ids, g_ids = rng.integers(0, nid, nq), rng.integers(0, nid, ng)
    q_cams, g_cams = rng.integers(-1, 3, nq), rng.integers(-1, 3, ng)
    d = rng.integers(0, 4, (nq, ng)).astype(np.float32) if trial % 2 else rng.random((nq, ng))
    edges = np.array([0.0, 45.0, -45.0, 90.0, 135.0, -135.0, 180.0, 22.0, -158.0])
    q_views, g_views = rng.choice(edges, nq), rng.choice(edges, ng)
    q_views[rng.random(nq) < 0.1] = np.nan
    g_views[rng.random(ng) < 0.1] = np.nan
    m = rank_metrics(d, q_ids, g_ids, q_cams, g_cams, max_rank=10, keep_positives=True,
                     row_block=int(rng.integers(1, 6)))
    bins = crossview_metrics(m, q_views, g_views)
    assert set(bins) == set(SUBSETS)
    for name in SUBSETS:
        ap, first, mAP, rank1, n = brute_force(d, q_ids, g_ids, q_cams, g_cams,
                                               lambda i, j, name=name: in_subset(name, q_views[i], g_views[j]))
        got = bins[name]
        assert np.array_equal(got.first_rank, first), (trial, name)
        np.testing.assert_allclose(got.ap, ap, rtol=1e-12, atol=0, equal_nan=True)
        assert got.num_queries == n and got.num_skipped == nq - n
        if n:
            assert got.mAP == pytest.approx(mAP, rel=1e-12) and got.rank(1) == pytest.approx(rank1)
        else:
            assert np.isnan(got.mAP)


def test_ties_between_a_kept_positive_and_negatives_rank_the_negatives_first():
    # query 0 (id 1, front view): gallery  neg 0.2 | pos 0.2 (front, same bin) | pos 0.1 (back) | neg 0.1
    d = np.array([[0.2, 0.2, 0.1, 0.1]])
    m = rank_metrics(d, [1], [2, 1, 1, 3], keep_positives=True, max_rank=4)
    views_q, views_g = np.array([0.0]), np.array([0.0, 10.0, 180.0, 0.0])
    bins = crossview_metrics(m, views_q, views_g)
    # "0-45": the back view positive is junk; the front positive ties with two negatives
    # (0.1 and 0.2 are before or tied with it) -> rank 3
    assert bins["0-45"].first_rank[0] == 3 and bins["0-45"].ap[0] == pytest.approx(1 / 3)
    # "135-180" and front_back: only the back positive, after the 0.1 negative (tie) -> rank 2
    for name in ("135-180", FRONT_BACK):
        assert bins[name].first_rank[0] == 2 and bins[name].ap[0] == pytest.approx(1 / 2)
    assert bins["45-90"].num_queries == 0 and bins["45-90"].num_skipped == 1
    # and the full ranking: neg 0.1, pos 0.1, neg 0.2, pos 0.2 -> ranks 2 and 4
    assert m.first_rank[0] == 2 and m.ap[0] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_subset_of_every_positive_is_the_evaluation_itself():
    rng = np.random.default_rng(5)
    q_ids, g_ids = rng.integers(0, 6, 30), rng.integers(0, 6, 90)
    q_cams, g_cams = rng.integers(0, 3, 30), rng.integers(0, 3, 90)
    d = rng.integers(0, 5, (30, 90)).astype(np.float32)
    m = rank_metrics(d, q_ids, g_ids, q_cams, g_cams, keep_positives=True)
    table = m.positives
    assert len(table) == int(sum(((g_ids == q_ids[i]) & ~((g_cams == q_cams[i]))).sum() for i in range(30)))
    same = subset_metrics(table, np.ones(len(table), bool), 30, len(m.cmc))
    assert np.array_equal(same.first_rank, m.first_rank)
    np.testing.assert_allclose(same.ap, m.ap, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(same.inp, m.inp, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(same.cmc, m.cmc, rtol=1e-12)
    assert rank_metrics(d, q_ids, g_ids, q_cams, g_cams).positives is None, "kept only when asked"


def test_streaming_keeps_the_same_positive_table_as_the_dense_path():
    from tests.test_evaluation_streaming import make_problem
    q, g = make_problem(3, 120, 700, 50)
    spec = DistanceSpec(mode="pven")
    dense = rank_metrics(pven_distance(q, g, spec), q.ids, g.ids, q.cams, g.cams, keep_positives=True)
    for q_block, g_block, range_cap in [(1, 1, None), (64, 256, 0), (256, 2048, None)]:
        streamed = evaluate(q, g, spec, q_block=q_block, g_block=g_block, range_cap=range_cap, keep_positives=True)
        assert streamed.same_as(dense) and streamed.positives.same_as(dense.positives), (q_block, g_block)
    views = np.random.default_rng(0).uniform(-179.0, 180.0, len(q)), np.random.default_rng(1).uniform(-179, 180, len(g))
    a = crossview_metrics(dense, *views)
    b = crossview_metrics(streamed, *views)
    assert all(a[name].same_as(b[name]) for name in SUBSETS)


def test_without_views_there_are_no_crossview_metrics():
    m = rank_metrics(np.array([[0.1, 0.2]]), [1], [1, 2], keep_positives=True)
    assert crossview_metrics(m, None, np.zeros(2)) == {} and crossview_metrics(m, np.zeros(1), None) == {}
    with pytest.raises(ValueError, match="keep_positives"):
        crossview_metrics(rank_metrics(np.array([[0.1, 0.2]]), [1], [1, 2]), np.zeros(1), np.zeros(2))
    q = FeatureSet([1], [0], np.zeros((1, 2), np.float32))
    assert q.views is None
