"""rank_metrics: hand-computed AP / CMC / mINP, the tie rule, skipped queries, junk, no cameras."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import rank_metrics


def argsort_reference(d, q_ids, g_ids, q_cams, g_cams, remove_junk=True):
    """Per-query metrics by sorting each row, negatives before positives on ties."""
    aps, inps, firsts = [], [], []
    for i in range(d.shape[0]):
        same = g_ids == q_ids[i]
        junk = np.zeros_like(same)
        if remove_junk and q_cams is not None and q_cams[i] >= 0:
            junk = same & (g_cams == q_cams[i])
        keep = ~junk
        row, pos = d[i][keep], (same & ~junk)[keep]
        if not pos.any():
            aps.append(np.nan), inps.append(np.nan), firsts.append(0)
            continue
        order = np.lexsort((pos.astype(int), row))   # by distance, then negatives (0) first
        ranks = np.nonzero(pos[order])[0] + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        firsts.append(ranks[0])
    return np.array(aps), np.array(inps), np.array(firsts)


def test_hand_computed_single_query():
    # gallery: pos 0.1, neg 0.2, pos 0.3, neg 0.4 -> positives at ranks 1 and 3
    m = rank_metrics(np.array([[0.1, 0.2, 0.3, 0.4]]), [7], [7, 1, 7, 2], max_rank=4)
    assert m.mAP == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m.mINP == pytest.approx(2 / 3)
    assert m.cmc.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert (m.num_queries, m.num_skipped) == (1, 0)
    assert m.first_rank.tolist() == [1]


def test_ties_rank_negatives_first():
    d = np.array([[0.5, 0.5, 0.1],           # pos tied with a neg, one closer neg
                  [0.2, 0.2, 0.2]])          # two positives tied with a negative
    g_ids = np.array([1, 2, 3])
    m = rank_metrics(d, [1, 1], g_ids, max_rank=3)
    # query 0: neg 0.1 (rank 1), tied neg (rank 2), pos (rank 3)
    assert m.ap[0] == pytest.approx(1 / 3) and m.inp[0] == pytest.approx(1 / 3) and m.first_rank[0] == 3
    d2 = np.array([[0.2, 0.2, 0.2]])
    m2 = rank_metrics(d2, [1], [1, 1, 2], max_rank=3)
    # the negative goes first: positives at ranks 2 and 3
    assert m2.ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m2.mINP == pytest.approx(2 / 3)
    assert m2.cmc.tolist() == [0.0, 1.0, 1.0]


def test_results_do_not_depend_on_gallery_order_with_ties():
    rng = np.random.default_rng(3)
    d = rng.integers(0, 4, (20, 50)).astype(np.float32)          # many ties
    q_ids, g_ids = rng.integers(0, 5, 20), rng.integers(0, 5, 50)
    q_cams, g_cams = rng.integers(0, 3, 20), rng.integers(0, 3, 50)
    ref = rank_metrics(d, q_ids, g_ids, q_cams, g_cams)
    for seed in range(3):
        p = np.random.default_rng(seed).permutation(50)
        assert rank_metrics(d[:, p], q_ids, g_ids[p], q_cams, g_cams[p]).same_as(ref)


def test_no_match_query_is_skipped_and_counted():
    d = np.array([[0.1, 0.2], [0.3, 0.4]])
    m = rank_metrics(d, [1, 9], [1, 2], max_rank=2)     # id 9 is not in the gallery
    assert (m.num_queries, m.num_skipped) == (1, 1)
    assert math.isnan(m.ap[1]) and m.first_rank[1] == 0
    assert m.mAP == 1.0 and m.cmc.tolist() == [1.0, 1.0]


def test_all_junk_query_is_skipped_only_with_junk_removal():
    d = np.array([[0.3, 0.1, 0.2]])
    q_ids, g_ids = [5], [5, 5, 8]
    q_cams, g_cams = [2], [2, 2, 1]          # both true matches share the query's camera
    m = rank_metrics(d, q_ids, g_ids, q_cams, g_cams, max_rank=3)
    assert (m.num_queries, m.num_skipped) == (0, 1)
    assert math.isnan(m.mAP) and math.isnan(m.mINP) and np.isnan(m.cmc).all()
    kept = rank_metrics(d, q_ids, g_ids, q_cams, g_cams, remove_junk=False, max_rank=3)
    # ranks: 0.1 pos (1), 0.2 neg, 0.3 pos (3)
    assert kept.num_queries == 1 and kept.mAP == pytest.approx((1 + 2 / 3) / 2)


def test_junk_removed_from_ranking_not_counted_as_negative():
    # gallery: junk 0.05 (same id+cam), neg 0.1, pos 0.2 (other cam) -> pos at rank 2, not 3
    m = rank_metrics(np.array([[0.05, 0.1, 0.2]]), [4], [4, 1, 4], [0], [0, 3, 1], max_rank=3)
    assert m.first_rank[0] == 2 and m.mAP == pytest.approx(0.5)


def test_no_cameras_and_unknown_cameras_are_never_junk():
    d = np.array([[0.05, 0.1, 0.2]])
    none = rank_metrics(d, [4], [4, 1, 4], None, None, max_rank=3)
    unknown = rank_metrics(d, [4], [4, 1, 4], [-1], [-1, -1, -1], max_rank=3)
    for m in (none, unknown):
        assert m.first_rank[0] == 1 and m.mAP == pytest.approx((1 + 2 / 3) / 2)


def test_string_ids_and_torch_input():
    d = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    m = rank_metrics(d, np.array(["a"]), np.array(["b", "a", "a"]), max_rank=3)
    assert m.ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_matches_argsort_reference_on_random_problems():
    rng = np.random.default_rng(0)
    for trial in range(40):
        nq, ng, nid = int(rng.integers(1, 25)), int(rng.integers(1, 60)), int(rng.integers(1, 8))
        q_ids, g_ids = rng.integers(0, nid, nq), rng.integers(0, nid, ng)
        q_cams, g_cams = rng.integers(-1, 3, nq), rng.integers(-1, 3, ng)
        if trial % 2:
            d = rng.integers(0, 5, (nq, ng)).astype(np.float32)   # ties everywhere
        else:
            d = rng.random((nq, ng))                               # float64
        junk = bool(trial % 3)
        m = rank_metrics(d, q_ids, g_ids, q_cams, g_cams, remove_junk=junk, max_rank=10,
                         row_block=int(rng.integers(1, 8)))
        ap, inp, first = argsort_reference(d, q_ids, g_ids, q_cams, g_cams, junk)
        assert np.array_equal(m.first_rank, first), trial
        assert np.allclose(m.ap, ap, rtol=1e-12, atol=0, equal_nan=True), trial
        assert np.allclose(m.inp, inp, rtol=1e-12, atol=0, equal_nan=True), trial
        valid = first > 0
        if valid.any():
            assert m.mAP == pytest.approx(ap[valid].mean(), rel=1e-12)
            for k in (1, 5):
                assert m.rank(k) == pytest.approx(np.mean(first[valid] <= k))


def test_structured_problem_uses_few_candidates_and_stays_exact():
    # positives close, negatives far: only a few negatives are <= a query's farthest positive
    rng = np.random.default_rng(1)
    q_ids, g_ids = np.arange(30) % 10, np.arange(400) % 10
    d = rng.random((30, 400)) + (q_ids[:, None] != g_ids[None, :]) * 0.95
    m = rank_metrics(d, q_ids, g_ids)
    ap, _, first = argsort_reference(d, q_ids, g_ids, None, None)
    assert np.array_equal(m.first_rank, first) and np.allclose(m.ap, ap, rtol=1e-12)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.array([[0.1, np.nan]]), [1], [1, 2])
    with pytest.raises(ValueError, match="g_ids"):
        rank_metrics(np.zeros((2, 3)), [1, 2], [1, 2])
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(np.zeros(3), [1], [1, 2, 3])
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(np.zeros((1, 2)), [1], [1, 2], max_rank=0)


def test_summary_and_rank_accessors():
    m = rank_metrics(np.array([[0.1, 0.2, 0.3, 0.4]]), [7], [7, 1, 7, 2], max_rank=5)
    s = m.summary()
    assert set(s) == {"mAP", "mINP", "rank1", "rank5", "num_queries", "num_skipped"}
    assert s["rank1"] == 1.0 and m.rank(5) == 1.0
    with pytest.raises(ValueError):
        m.rank(6)
