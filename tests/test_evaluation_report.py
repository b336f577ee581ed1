"""report.score: intervals for every mode, paired differences, cross-view table, per-query rows."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import EvalConfig
from pipeline.evaluation.bootstrap import interval, paired_difference
from pipeline.evaluation.crossview import SUBSETS
from pipeline.evaluation.features import FeatureSet
from pipeline.evaluation.report import CROSSVIEW_COLUMNS, QUERY_COLUMNS, crossview_chart, score
from pipeline.evaluation.spec import MODES, DistanceSpec
from tests.test_evaluation_streaming import make_problem


def with_views(fs: FeatureSet, seed: int) -> FeatureSet:
    views = np.random.default_rng(seed).uniform(-179.0, 180.0, len(fs))
    views[::7] = np.nan
    return dataclasses.replace(fs, views=views)


def sets_of(q, g):
    return {"query": (q, [f"q{i}" for i in range(len(q))]), "gallery": (g, [f"g{i}" for i in range(len(g))])}


@pytest.fixture(scope="module")
def problem():
    q, g = make_problem(4, 90, 400, 30)
    return with_views(q, 0), with_views(g, 1)


def test_synthetic_scores_carry_intervals_differences_and_crossview(problem):
    q, g = problem
    cfg = EvalConfig(bootstrap=300)
    s = score(sets_of(q, g), cfg, source="synthetic", test_subset=None, seed=3, base=DistanceSpec())
    m = s.metrics
    ids = np.asarray(q.ids)
    for mode in MODES:
        for name in ("mAP", "mINP", "rank1", "rank5", "rank10"):
            assert m[mode][f"{name}_lo"] <= m[mode][name] <= m[mode][f"{name}_hi"], (mode, name)
    # the report's numbers are the library functions' numbers on the same per-query values
    shown = s.shown.metrics
    assert m["pven"]["mAP_lo"] == interval(shown.ap, ids, resamples=300, seed=3).lo
    diff = m["differences"]["pven_minus_global"]
    assert set(diff) >= {"mAP", "mAP_lo", "mAP_hi", "rank1", "rank1_lo", "rank1_hi"}
    assert diff["mAP"] == m["pven"]["mAP"] - m["global"]["mAP"]
    assert m["bootstrap"]["resamples"] == 300 and m["bootstrap"]["num_ids"] == len(np.unique(ids[shown.first_rank > 0]))
    # crossview: every subset, every mode; query counts add up over the bins at most to
    # (queries) x (bins), and each bin's count is at most the evaluated queries
    assert set(m["crossview"]) == set(SUBSETS)
    for subset in SUBSETS:
        entry = m["crossview"][subset]
        assert 0 <= entry["num_queries"] <= m["pven"]["num_queries"]
        for mode in MODES:
            if entry["num_queries"]:
                assert entry[mode]["mAP_lo"] <= entry[mode]["mAP"] <= entry[mode]["mAP_hi"]
        assert "mAP" in entry["pven_minus_global"]
    assert [r["bin"] for r in s.crossview] == ["0-45", "45-90", "90-135", "135-180"]
    assert list(s.crossview[0]) == CROSSVIEW_COLUMNS
    assert crossview_chart(s.crossview).size == (640, 400)
    # per-query rows: one per query, exact values, empty AP for skipped queries
    assert len(s.queries) == len(q) and list(s.queries[0]) == QUERY_COLUMNS
    for i, row in enumerate(s.queries):
        assert row["key"] == f"q{i}" and row["vid"] == str(ids[i])
        assert row["pven_first_rank"] == str(int(shown.first_rank[i]))
        assert (row["pven_ap"] == "") == bool(np.isnan(shown.ap[i]))
        if row["pven_ap"]:
            assert float(row["pven_ap"]) == shown.ap[i]
        assert (row["azimuth"] == "") == bool(np.isnan(q.views[i]))
    again = score(sets_of(q, g), cfg, source="synthetic", test_subset=None, seed=3, base=DistanceSpec())
    assert again.metrics == m and again.queries == s.queries, "deterministic for a seed"


def test_paired_difference_in_the_report_matches_the_library(problem):
    q, g = problem
    s = score(sets_of(q, g), EvalConfig(bootstrap=200), source="veri776", test_subset=None, seed=0, base=DistanceSpec())
    assert "crossview" not in s.metrics or s.metrics["crossview"]   # veri776 with views given: still split
    ids = np.asarray(q.ids)
    rows = s.queries
    ap = {mode: np.array([float(r[f"{mode}_ap"]) if r[f"{mode}_ap"] else np.nan for r in rows]) for mode in MODES}
    lib = paired_difference(ap["pven"], ap["local"], ids, resamples=200, seed=0)
    diff = s.metrics["differences"]["pven_minus_local"]
    assert (diff["mAP"], diff["mAP_lo"], diff["mAP_hi"]) == pytest.approx((lib.value, lib.lo, lib.hi), rel=1e-12)


def test_without_views_there_is_no_crossview_and_bootstrap_zero_gives_no_bounds(problem):
    q, g = problem
    q, g = dataclasses.replace(q, views=None), dataclasses.replace(g, views=None)
    s = score(sets_of(q, g), EvalConfig(bootstrap=0), source="veriwild", test_subset=None, seed=0, base=DistanceSpec())
    assert "crossview" not in s.metrics and s.crossview == []
    assert not any(k.endswith(("_lo", "_hi")) for k in s.metrics["pven"])
    assert set(s.metrics["differences"]["pven_minus_global"]) == {"mAP", "mINP", "rank1", "rank5", "rank10"}
    assert all(r["azimuth"] == "" for r in s.queries)
    assert crossview_chart(s.crossview).size == (640, 400)     # the picture says "no view angles"


def test_vehicleid_intervals_cover_the_mean_over_repeats():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(30), 4)
    centres = rng.standard_normal((30, 8))
    feats = (centres[ids] + 0.8 * rng.standard_normal((len(ids), 8))).astype(np.float32)
    parts = rng.standard_normal((len(ids), 4, 3)).astype(np.float32)
    test = FeatureSet(ids, np.full(len(ids), -1), feats, parts, np.ones((len(ids), 4), np.float32))
    cfg = EvalConfig(bootstrap=300, vehicleid_repeats=3)
    s = score({"test": (test, [f"t{i}" for i in range(len(ids))])}, cfg, source="vehicleid", test_subset=None,
              seed=1, base=DistanceSpec())
    m = s.metrics["pven"]
    assert m["repeats"] == 3 and m["mAP_lo"] <= m["mAP"] <= m["mAP_hi"] and "mAP_std" in m
    assert s.metrics["bootstrap"]["num_queries"] == 3 * 90 and s.metrics["bootstrap"]["num_ids"] == 30
    assert "crossview" not in s.metrics
    assert len(s.queries) == 3 * 90 and {r["repeat"] for r in s.queries} == {0, 1, 2}


def test_lambda_comes_from_validation_and_never_from_the_test_split():
    from pipeline.evaluation.lam_scan import LAM_GRID, best_lambda
    from pipeline.evaluation.report import choose_lambda
    q, g = make_problem(4, nq=12, ng=40, nid=6)[:2]
    base = DistanceSpec()
    spec, record, rows = choose_lambda(base, "val", (q, g))
    assert record["rule"] == "validation" and [r["lam"] for r in record["scan"]] == list(LAM_GRID)
    assert spec.lam_value == record["chosen"] == best_lambda(record["scan"]) and len(rows) == len(LAM_GRID)
    assert record["val_mAP_at_chosen"] == max(r["mAP"] for r in record["scan"])
    fixed, rec, _ = choose_lambda(base, 0.25, (q, g))
    assert fixed.lam_value == 0.25 and rec["rule"] == "fixed" and "scan" in rec   # the curve is reported anyway
    variant, rec, rows = choose_lambda(DistanceSpec(variant="official"), "val", None)
    assert variant.lam_value == 0.5 and rec["rule"].startswith("variant") and rows == []
    assert best_lambda([{"lam": 0.0, "mAP": 0.5}, {"lam": 1.0, "mAP": 0.5}, {"lam": 2.0, "mAP": float("nan")}]) == 0.0
