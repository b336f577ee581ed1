"""k-reciprocal re-ranking: same distances as a dense implementation, helps a toy case, size error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation import (
    DistanceSpec,
    FeatureSet,
    RerankConfig,
    RerankProvider,
    StreamingEvaluator,
    evaluate,
    pven_distance,
    rank_metrics,
)


def dense_rerank(dist_all: np.ndarray, nq: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """The published algorithm with dense N x N matrices (reference; small N only)."""
    n = dist_all.shape[0]
    orig = dist_all / dist_all.max(axis=1, keepdims=True)
    rank = np.argsort(orig, axis=1, kind="stable")
    kh = int(np.around(k1 / 2.0))
    v = np.zeros((n, n))
    for i in range(n):
        fwd = rank[i, :k1 + 1]
        r = fwd[np.nonzero(rank[fwd, :k1 + 1] == i)[0]]
        e = r
        for c in r:
            fc = rank[c, :kh + 1]
            rc = fc[np.nonzero(rank[fc, :kh + 1] == c)[0]]
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                e = np.append(e, rc)
        e = np.unique(e)
        w = np.exp(-orig[i, e])
        v[i, e] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        t = np.minimum(v[i][None, :], v).sum(1)
        jac[i] = 1 - t / (2 - t)
    return (jac * (1 - lam) + orig[:nq] * lam)[:, nq:]


def toy(seed=0, nid=30, dim=16, nq=60, ng=300, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((nid, dim)) * spread

    def images(n):
        ids = rng.integers(0, nid, n)
        return FeatureSet(ids, rng.integers(0, 4, n), (centres[ids] + rng.standard_normal((n, dim))).astype(np.float32))
    return images(nq), images(ng)


def test_matches_dense_reference_and_improves_toy_case():
    q, g = toy()
    spec = DistanceSpec(mode="global")
    cfg = RerankConfig(k1=20, k2=6, lambda_=0.3)
    both = FeatureSet.concat([q, g])
    ref = dense_rerank(pven_distance(both, both, spec).astype(np.float64), len(q), 20, 6, 0.3)

    prov = RerankProvider(q, g, spec, cfg, q_block=256, g_block=512)
    prov.start()
    try:
        prov.set_gallery_order(np.arange(len(g)))
        ours = prov.distances(prov.queries(torch.arange(len(q))), prov.gallery(0, len(g)), 0, len(g)).numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    finally:
        prov.close()

    plain = evaluate(q, g, spec)
    reranked = evaluate(q, g, spec, rerank=cfg, q_block=16, g_block=64)   # several blocks
    assert reranked.mAP > plain.mAP + 0.01
    dense_ref = rank_metrics(ref, q.ids, g.ids, q.cams, g.cams)
    assert reranked.mAP == pytest.approx(dense_ref.mAP, abs=1e-3)


def test_pven_mode_and_k2_one_run():
    rng = np.random.default_rng(1)
    n = 40
    vis = rng.integers(0, 30, (n, 4)).astype(np.float32)
    fs = FeatureSet(rng.integers(0, 5, n), rng.integers(0, 3, n), rng.standard_normal((n, 8)).astype(np.float32),
                    rng.standard_normal((n, 4, 4)).astype(np.float32), vis)
    q, g = fs.subset(np.arange(10)), fs.subset(np.arange(10, n))
    m = StreamingEvaluator(q, g, DistanceSpec(), rerank=RerankConfig(k1=5, k2=1)).run()
    assert m.num_queries + m.num_skipped == 10 and np.isfinite(m.mAP)


def test_too_large_problem_raises_naming_size_and_limit():
    q, g = toy(nq=5, ng=20)
    cfg = RerankConfig(memory_limit_bytes=1000)
    with pytest.raises(ValueError, match=r"N=25 images .*limit of"):
        evaluate(q, g, DistanceSpec(mode="global"), rerank=cfg)
    with pytest.raises(ValueError, match="k2"):
        RerankConfig(k1=3, k2=6)
