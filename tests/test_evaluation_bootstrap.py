"""Identity bootstrap: coverage, width, resampling by identity, pairing, NaN handling, determinism, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.evaluation.bootstrap import IdentityBootstrap, identity_counts, interval, paired_difference


def clustered(rng, n_ids, per_id, mu=0.5, id_sd=0.15, query_sd=0.05):
    """Per-query values with a strong identity effect (queries of one id are alike)."""
    ids = np.repeat(np.arange(n_ids), per_id)
    effect = rng.normal(0.0, id_sd, n_ids)
    return mu + effect[ids] + rng.normal(0.0, query_sd, len(ids)), ids


def test_interval_covers_the_true_mean_and_shrinks_with_more_identities():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for t in range(trials):
        values, ids = clustered(rng, 40, 3)
        iv = interval(values, ids, resamples=400, seed=t)
        assert iv.lo <= iv.value <= iv.hi
        covered += iv.lo <= 0.5 <= iv.hi
    # nominal 95%; the percentile interval runs a little narrow with 40 identities
    assert 0.85 <= covered / trials <= 1.0, covered
    widths = {}
    for n_ids in (25, 400):
        values, ids = clustered(np.random.default_rng(1), n_ids, 3)
        widths[n_ids] = interval(values, ids, resamples=1000, seed=0).width
    # the width scales like 1/sqrt(identities): 16x more identities, about 4x narrower
    assert 2.5 < widths[25] / widths[400] < 6.5, widths


def test_resampling_unit_is_the_identity_not_the_query():
    # 20 identical queries per identity: resampling queries would see 20x as many
    # independent values as there are; resampling identities sees the truth.
    rng = np.random.default_rng(2)
    per_id = rng.random(30)
    ids = np.repeat(np.arange(30), 20)
    values = per_id[ids]
    by_identity = interval(values, ids, resamples=2000, seed=0)
    by_query = interval(values, np.arange(len(values)), resamples=2000, seed=0)
    assert by_identity.num_ids == 30 and by_query.num_ids == 600
    assert by_identity.width > 3.0 * by_query.width          # sqrt(20) = 4.5 in theory
    # identity-level width equals that of the 30 identity means resampled on their own
    alone = interval(per_id, np.arange(30), resamples=2000, seed=0)
    assert by_identity.width == pytest.approx(alone.width, rel=1e-12)


def test_drawn_identities_bring_all_their_queries_as_often_as_drawn():
    rng = np.random.default_rng(3)
    ids = rng.choice(np.array(["a", "b", "c", "d", "e"]), 23)
    values = rng.random(23)
    boot = IdentityBootstrap.single({"x": values}, ids, resamples=50, seed=7)
    names = np.unique(ids)
    counts = np.concatenate(list(identity_counts(len(names), 50, 7)))
    for b, row in enumerate(counts):
        assert row.sum() == len(names)
        resampled = np.concatenate([np.tile(values[ids == name], int(k)) for name, k in zip(names, row)])
        assert boot.draws[b, 0] == pytest.approx(resampled.mean(), rel=1e-12)


def test_paired_difference_of_a_with_itself_is_exactly_zero():
    values, ids = clustered(np.random.default_rng(4), 50, 4)
    d = paired_difference(values, values.copy(), ids, resamples=500, seed=1)
    assert (d.value, d.lo, d.hi) == (0.0, 0.0, 0.0)


def test_pairing_cancels_what_two_metrics_share():
    rng = np.random.default_rng(5)
    a, ids = clustered(rng, 60, 3)
    b = a - 0.02 + rng.normal(0.0, 0.01, len(a))              # b tracks a closely
    d = paired_difference(a, b, ids, resamples=1000, seed=0)
    assert d.lo > 0.0, "a clear, consistent gain is significant when paired"
    assert d.width < 0.3 * interval(a, ids, resamples=1000, seed=0).width
    assert d.value == pytest.approx(a.mean() - b.mean(), rel=1e-12)


def test_same_seed_same_interval_other_seed_other_interval():
    values, ids = clustered(np.random.default_rng(6), 30, 2)
    one, two = (interval(values, ids, resamples=300, seed=11) for _ in range(2))
    assert one == two
    assert interval(values, ids, resamples=300, seed=12) != one


def test_skipped_queries_are_left_out_of_both_sides():
    rng = np.random.default_rng(7)
    a, ids = clustered(rng, 40, 3)
    b = a + rng.normal(0.0, 0.05, len(a))
    a[[0, 5]] = np.nan                                        # skipped queries (NaN AP)
    b[[9]] = np.nan
    keep = np.isfinite(a) & np.isfinite(b)
    d = paired_difference(a, b, ids, resamples=400, seed=3)
    ref = paired_difference(a[keep], b[keep], ids[keep], resamples=400, seed=3)
    assert d == ref and d.num_queries == int(keep.sum())
    iv = interval(a, ids, resamples=400, seed=3)
    assert iv.value == pytest.approx(np.nanmean(a), rel=1e-12) and iv.num_queries == int(np.isfinite(a).sum())
    empty = interval(np.full(4, np.nan), [1, 1, 2, 2], resamples=10)
    assert np.isnan(empty.value) and np.isnan(empty.lo) and empty.num_ids == 0


def test_columns_share_resamples_and_zero_resamples_give_no_bounds():
    values, ids = clustered(np.random.default_rng(8), 30, 3)
    boot = IdentityBootstrap.single({"a": values, "b": 2 * values}, ids, resamples=200, seed=0)
    np.testing.assert_allclose(boot.draws[:, 1], 2 * boot.draws[:, 0], rtol=1e-12)
    off = interval(values, ids, resamples=0)
    assert off.value == pytest.approx(values.mean()) and np.isnan(off.lo) and np.isnan(off.hi)


def test_over_repeats_averages_the_repeats_with_the_same_draws():
    rng = np.random.default_rng(9)
    a, ids = clustered(rng, 20, 3)
    b = a + rng.normal(0.0, 0.1, len(a))
    single = IdentityBootstrap.single({"x": a}, ids, resamples=300, seed=2)
    same = IdentityBootstrap.over_repeats([({"x": a}, ids), ({"x": a}, ids)], resamples=300, seed=2)
    np.testing.assert_allclose(same.draws, single.draws, rtol=1e-12)
    both = IdentityBootstrap.over_repeats([({"x": a}, ids), ({"x": b[::-1]}, ids[::-1])], resamples=300, seed=2)
    other = IdentityBootstrap.single({"x": b[::-1]}, ids[::-1], resamples=300, seed=2)
    np.testing.assert_allclose(both.draws, (single.draws + other.draws) / 2, rtol=1e-12)
    assert both.interval("x").value == pytest.approx((a.mean() + b.mean()) / 2, rel=1e-12)


def test_ten_thousand_queries_take_well_under_a_second():
    rng = np.random.default_rng(10)
    ids = np.arange(10_000)                                   # VERI-Wild large: one query per id
    columns = {f"m{j}": rng.random(10_000) for j in range(15)}
    t0 = time.perf_counter()
    IdentityBootstrap.single(columns, ids, resamples=1000, seed=0)
    assert time.perf_counter() - t0 < 5.0                     # ~0.3 s on 2 cores


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        interval(np.zeros(3), [1, 2], resamples=5)
    with pytest.raises(ValueError, match="level"):
        interval(np.zeros(2), [1, 2], level=1.5)
    with pytest.raises(ValueError, match="resamples"):
        interval(np.zeros(2), [1, 2], resamples=-1)
