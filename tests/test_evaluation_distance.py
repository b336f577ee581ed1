"""PVEN distances: tiled kernel and torch version against a per-pair Python loop; gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.constants import VARIANTS
from pipeline.evaluation import MODES, DistanceSpec, FeatureSet, euclidean_distance, pair_distance, pven_distance
from pipeline.reid.distance import pven_distance_torch


def loop_distance(qg, qp, qv, gg, gp, gv, spec: DistanceSpec) -> np.ndarray:
    """docs/method.md eq. 3-4 (and the official variant) written out pair by pair in float64."""
    def norm(x):
        n = math.sqrt(sum(float(t) ** 2 for t in x))
        return [float(t) / max(n, 1e-12) for t in x] if spec.l2norm else [float(t) for t in x]

    def euclid(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    def part(a, b):   # sqrt_euclidean: the authors' clamp of the squared distance at 1e-12, two roots
        return max(euclid(a, b) ** 2, 1e-12) ** 0.25 if spec.part_root else euclid(a, b)

    out = np.zeros((len(qv), len(gv)))
    for p in range(len(qv)):
        for q in range(len(gv)):
            dg = 0.0
            if spec.uses_global:
                dg = euclid(norm(qg[p]), norm(gg[q]))
                if spec.squared:
                    dg = dg ** 2
            dl = 0.0
            if spec.uses_local:
                vp = [1.0 if spec.uniform else float(v) + spec.vis_offset for v in qv[p]]
                vq = [1.0 if spec.uniform else float(v) + spec.vis_offset for v in gv[q]]
                den = sum(vp[i] * vq[i] for i in range(4))
                if den > 0:   # no common visible part: D_l = 0
                    dl = sum(vp[i] * vq[i] / den * part(norm(qp[p][i]), norm(gp[q][i])) for i in range(4))
            local_term = dl ** 2 if spec.local_sq else dl
            out[p, q] = {"global": dg, "local": dl, "pven": dg + spec.lam_value * local_term}[spec.mode]
    return out


def make_set(rng, n, cg=6, cp=5):
    vis = rng.integers(1, 40, (n, 4)).astype(np.float32)
    vis[rng.random((n, 4)) < 0.4] = 0           # invisible parts
    vis[0] = [12, 0, 0, 0]                        # front only
    vis[1] = [0, 7, 0, 0]                         # back only: no common part with image 0 of the other set
    vis[2] = 0                                    # nothing visible at all
    parts = rng.standard_normal((n, 4, cp)).astype(np.float32)
    parts[3, 2] = 0                               # a zero part feature (normalisation edge case)
    return FeatureSet(rng.integers(0, 3, n), rng.integers(0, 2, n),
                      rng.standard_normal((n, cg)).astype(np.float32), parts, vis)


OVERRIDES = [{}, {"part_distance": "sqrt_euclidean"}, {"attention": "uniform"},
             {"local_squared": True, "lam": 0.7}, {"visibility_offset": 2.0, "normalize": True}]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("override", OVERRIDES, ids=lambda o: ",".join(o) or "variant")
def test_kernel_and_torch_match_pair_loop(mode, variant, override):
    rng = np.random.default_rng(0)
    q, g = make_set(rng, 7), make_set(rng, 9)
    spec = DistanceSpec(mode=mode, variant=variant, **override)
    ref = loop_distance(q.global_feats, q.part_feats, q.visibility, g.global_feats, g.part_feats,
                        g.visibility, spec)
    kernel = pven_distance(q, g, spec)
    t = pven_distance_torch(*(torch.from_numpy(x) for x in (q.global_feats, q.part_feats, q.visibility,
                                                              g.global_feats, g.part_feats, g.visibility)),
                            spec=spec).numpy()
    pairs = pair_distance(q, np.repeat(np.arange(7), 9), g, np.tile(np.arange(9), 7), spec).reshape(7, 9)
    for got in (kernel, t, pairs):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


def test_no_common_visible_part_gives_exactly_zero_local_distance():
    rng = np.random.default_rng(1)
    q, g = make_set(rng, 4), make_set(rng, 4)
    d = pven_distance(q, g, DistanceSpec(mode="local"))
    assert d[0, 1] == 0.0 and d[1, 0] == 0.0          # front-only vs back-only
    assert (d[2] == 0).all() and (d[:, 2] == 0).all()  # an image with no visible part
    # pven: only the global distance ranks such pairs
    dg = pven_distance(q, g, DistanceSpec(mode="global"))
    assert pven_distance(q, g, DistanceSpec())[0, 1] == dg[0, 1]


def test_blocks_and_gallery_order_give_bitwise_identical_distances():
    rng = np.random.default_rng(2)
    q, g = make_set(rng, 300, 16, 8), make_set(rng, 700, 16, 8)
    spec = DistanceSpec()
    full = pven_distance(q, g, spec)
    assert np.array_equal(full, pven_distance(q, g, spec, q_block=1, g_block=1))
    assert np.array_equal(full, pven_distance(q, g, spec, q_block=300, g_block=100))
    p = rng.permutation(700)
    assert np.array_equal(full[:, p], pven_distance(q, g.subset(p), spec))


def test_euclidean_distance():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((6, 8))
    ref = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    np.testing.assert_allclose(euclidean_distance(a, b), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(euclidean_distance(a, b, squared=True), ref ** 2, rtol=1e-5, atol=1e-4)
    same = euclidean_distance(a, a)
    assert (np.diag(same) >= 0).all() and np.diag(same).max() < 1e-2


def test_torch_version_gradients_finite_at_zero_distance_and_invisible_pairs():
    torch.manual_seed(0)
    qg = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    qp = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    qv = torch.tensor([[3., 0, 1, 0], [0, 2, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [2, 0, 5, 1]],
                      dtype=torch.float64)
    for variant in VARIANTS:
        # within one batch: the diagonal is an exact zero distance
        d = pven_distance_torch(qg, qp, qv, spec=DistanceSpec(variant=variant))
        assert torch.isfinite(d).all()
        (d.sum() + d.diagonal().sum()).backward()
        assert torch.isfinite(qg.grad).all() and torch.isfinite(qp.grad).all()
        qg.grad = qp.grad = None
    # away from zero, the analytic gradient is right
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 4, dtype=torch.float64)
    ps = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    pg = torch.randn(4, 4, 2, dtype=torch.float64)
    vq, vg = torch.rand(3, 4, dtype=torch.float64) + 0.1, torch.rand(4, 4, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(
        lambda a, b: pven_distance_torch(a, b, vq, y, pg, vg, spec=DistanceSpec()), (x, ps))


def test_feature_set_validation():
    with pytest.raises(ValueError, match="visibility"):
        FeatureSet([1], None, np.zeros((1, 3)), np.zeros((1, 4, 2)), np.array([[1, -1, 0, 0]]))
    with pytest.raises(ValueError, match="part_feats"):
        FeatureSet([1, 2], None, None, np.zeros((2, 3, 2)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="global_feats"):
        FeatureSet([1, 2], None, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="needs global_feats"):
        pven_distance(FeatureSet([1], None, None, np.zeros((1, 4, 2), np.float32), np.ones((1, 4))),
                      FeatureSet([1], None, None, np.zeros((1, 4, 2), np.float32), np.ones((1, 4))))
    bad = np.zeros((2, 3), np.float32)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        euclidean_distance(bad, bad)
    with pytest.raises(ValueError, match="mode"):
        DistanceSpec(mode="both")


def test_tile_shape_is_validated():
    rng = np.random.default_rng(4)
    q = make_set(rng, 5)
    with pytest.raises(ValueError, match="multiple of 64"):
        pven_distance(q, q, tile=(256, 100))
    # any valid tile gives the same metrics-relevant values within float rounding
    np.testing.assert_allclose(pven_distance(q, q, tile=(8, 64)), pven_distance(q, q), rtol=1e-5, atol=1e-5)
