"""Streaming evaluator == rank_metrics on the dense matrix, bitwise, for every mode and block size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.constants import VARIANTS
from pipeline.evaluation import (
    MODES,
    DistanceSpec,
    FeatureSet,
    StreamingEvaluator,
    evaluate,
    pven_distance,
    rank_metrics,
)


def make_problem(seed: int, nq: int, ng: int, nid: int, cg: int = 12, cp: int = 6, sep: float = 0.8,
                 shuffle: bool = True):
    """Planted ids (so some queries rank well), cameras with unknowns, invisible parts."""
    rng = np.random.default_rng(seed)
    cg_mu, cp_mu = rng.standard_normal((nid + 3, cg)) * sep, rng.standard_normal((nid + 3, 4, cp)) * sep

    def images(n, ids):
        vis = rng.integers(1, 60, (n, 4)).astype(np.float32)
        vis[rng.random((n, 4)) < 0.35] = 0
        return FeatureSet(ids, rng.integers(-1, 4, n),
                          (cg_mu[ids] + rng.standard_normal((n, cg))).astype(np.float32),
                          (cp_mu[ids] + rng.standard_normal((n, 4, cp))).astype(np.float32), vis)
    g_ids = rng.integers(0, nid, ng) if shuffle else np.sort(rng.integers(0, nid, ng))
    q_ids = rng.integers(0, nid + 3, nq)          # a few ids have no gallery image
    return images(nq, q_ids), images(ng, g_ids)


def dense_metrics(q, g, spec, **kw):
    return rank_metrics(pven_distance(q, g, spec, matmul_dtype=kw.get("matmul_dtype")), q.ids, g.ids,
                        q.cams, g.cams, remove_junk=kw.get("remove_junk", True))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_streaming_equals_dense_for_all_modes(mode, variant):
    q, g = make_problem(0, 150, 900, 60)
    spec = DistanceSpec(mode=mode, variant=variant)
    ref = dense_metrics(q, g, spec)
    assert ref.num_queries > 0 and ref.num_skipped > 0
    for q_block, g_block in [(1, 1), (256, 512), (100, 2000)]:
        ev = StreamingEvaluator(q, g, spec, q_block=q_block, g_block=g_block)
        assert ev.run().same_as(ref), (q_block, g_block)


@pytest.mark.parametrize("range_cap", [0, 10**9])
@pytest.mark.parametrize("shuffle", [True, False])
def test_streaming_equals_dense_block_structures(range_cap, shuffle):
    # many ids: id ranges are narrow, so the fused stream over the rest of the gallery runs;
    # range_cap=0 forces the "range computed twice" path; shuffle=False: gallery already sorted
    q, g = make_problem(1, 700, 2500, 400, shuffle=shuffle)
    spec = DistanceSpec()
    ref = dense_metrics(q, g, spec)
    ev = StreamingEvaluator(q, g, spec, q_block=256, g_block=512, range_cap=range_cap)
    assert ev.run().same_as(ref)
    assert ev.stats["seconds_fused"] > 0 and ev.stats["blocks"] > 3
    assert ev.stats["ranges_recomputed"] == (3 if range_cap == 0 else 0)


def test_random_features_dense_candidate_path_is_exact():
    # no structure: most negatives are closer than the farthest positive (batched path)
    q, g = make_problem(2, 200, 1200, 20, sep=0.0)
    for spec in (DistanceSpec(mode="global"), DistanceSpec()):
        assert evaluate(q, g, spec, q_block=256, g_block=512).same_as(dense_metrics(q, g, spec))


def test_junk_switch_and_inputs_as_torch_float64():
    q, g = make_problem(3, 80, 400, 30)
    spec = DistanceSpec(variant="official")
    for junk in (True, False):
        assert evaluate(q, g, spec, remove_junk=junk).same_as(dense_metrics(q, g, spec, remove_junk=junk))
    as_torch = lambda s: FeatureSet(torch.as_tensor(s.ids), torch.as_tensor(s.cams),  # noqa: E731
                                    torch.as_tensor(s.global_feats, dtype=torch.float64),
                                    torch.as_tensor(s.part_feats, dtype=torch.float64),
                                    torch.as_tensor(s.visibility))
    assert evaluate(as_torch(q), as_torch(g), spec).same_as(evaluate(q, g, spec))


def test_bf16_matmuls_are_consistent_and_close():
    q, g = make_problem(4, 120, 600, 40)
    spec = DistanceSpec()
    bf = evaluate(q, g, spec, matmul_dtype=torch.bfloat16)
    assert bf.same_as(dense_metrics(q, g, spec, matmul_dtype=torch.bfloat16))   # exact to its own matrix
    fp = evaluate(q, g, spec)
    assert abs(bf.mAP - fp.mAP) < 0.05


def test_queries_without_gallery_or_only_junk_are_skipped():
    q, g = make_problem(5, 50, 200, 10)
    cams = np.array(g.cams)
    ids = np.array(g.ids)
    ids[ids == 0] = 99                             # queries of id 0: no gallery image
    only = ids == 1
    cams[only] = 3                                 # id 1: every gallery image on camera 3
    g2 = FeatureSet(ids, cams, g.global_feats, g.part_feats, g.visibility)
    qc = np.array(q.cams)
    qc[np.array(q.ids) == 1] = 3
    q2 = FeatureSet(q.ids, qc, q.global_feats, q.part_feats, q.visibility)
    m = evaluate(q2, g2)
    assert m.same_as(dense_metrics(q2, g2, DistanceSpec()))
    skipped = np.isin(q2.ids, [0, 1]) | ~np.isin(q2.ids, ids)
    assert m.num_skipped == int(skipped.sum()) and np.isnan(m.ap[skipped]).all()


def test_every_query_skipped_gives_nan_not_crash():
    q, g = make_problem(6, 10, 50, 5)
    q2 = FeatureSet(np.full(10, 1000), q.cams, q.global_feats, q.part_feats, q.visibility)
    m = evaluate(q2, g)
    assert m.num_queries == 0 and m.num_skipped == 10 and np.isnan(m.mAP)


def test_empty_gallery_or_queries():
    q, g = make_problem(7, 5, 20, 4)
    empty = g.subset(np.zeros(0, dtype=int))
    m = evaluate(q, empty)
    assert (m.num_queries, m.num_skipped) == (0, 5) and np.isnan(m.mAP)
    m = evaluate(q.subset(np.zeros(0, dtype=int)), g)
    assert (m.num_queries, m.num_skipped) == (0, 0)
    assert pven_distance(q, empty).shape == (5, 0)


def test_device_is_checked_with_a_clear_error():
    q, g = make_problem(4, 20, 100, 10)
    with pytest.raises(ValueError, match="expected cpu or cuda"):
        StreamingEvaluator(q, g, DistanceSpec(), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            StreamingEvaluator(q, g, DistanceSpec(), device="cuda")
    # an explicit CPU device is the default path
    assert StreamingEvaluator(q, g, DistanceSpec(), device="cpu").run().same_as(
        StreamingEvaluator(q, g, DistanceSpec()).run())
