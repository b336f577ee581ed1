"""Float64 reference distances of single pairs: direct differences, no GEMM, no cancellation.

They agree with the tiled kernel to float32 rounding, not bitwise; re-ranking uses
them for the few pairs outside its neighbour lists, tests use them as the truth.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .features import FeatureSet, as_tensor
from .kernel import NORM_EPS
from .spec import DistanceSpec

__all__ = ["pair_distance"]


def pair_distance(query: FeatureSet, qi: Any, gallery: FeatureSet, gi: Any,
                  spec: DistanceSpec = DistanceSpec(), chunk: int = 65536) -> np.ndarray:
    """Distances of the pairs ``(query[qi[k]], gallery[gi[k]])`` in float64 (direct differences).

    Reference-quality values for a few pairs (no GEMM, no cancellation); they agree
    with the tiled kernel to float32 rounding, not bitwise.
    """
    qi = np.asarray(qi, dtype=np.int64).reshape(-1)
    gi = np.asarray(gi, dtype=np.int64).reshape(-1)
    if qi.shape != gi.shape:
        raise ValueError(f"pair_distance: qi and gi must have the same length, got {qi.shape} and {gi.shape}")
    out = np.empty(len(qi))
    for s in range(0, len(qi), chunk):
        a, b = torch.from_numpy(qi[s:s + chunk]), torch.from_numpy(gi[s:s + chunk])
        out[s:s + chunk] = _pairs_torch(query, a, gallery, b, spec).numpy()
    return out


def _pairs_torch(q: FeatureSet, a: torch.Tensor, g: FeatureSet, b: torch.Tensor, spec: DistanceSpec) -> torch.Tensor:
    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return F.normalize(x, dim=-1, eps=NORM_EPS) if spec.l2norm else x
    total = torch.zeros(len(a), dtype=torch.float64)
    if spec.uses_global:
        d2 = ((prep(as_tensor("global_feats", q.global_feats)[a])
               - prep(as_tensor("global_feats", g.global_feats)[b])) ** 2).sum(-1)
        dg = d2 if spec.squared else d2.sqrt()
        if spec.mode == "global":
            return dg
        total = dg
    sq = (prep(as_tensor("part_feats", q.part_feats)[a])
          - prep(as_tensor("part_feats", g.part_feats)[b])).pow(2).sum(-1)          # (n, 4)
    # sqrt_euclidean: the authors clamp the squared distance at 1e-12 before their two roots
    dp = sq.clamp_min(1e-12).sqrt().sqrt() if spec.part_root else sq.sqrt()
    vq = as_tensor("visibility", q.visibility)[a].double() + spec.vis_offset
    vg = as_tensor("visibility", g.visibility)[b].double() + spec.vis_offset
    w = torch.ones_like(vq) if spec.uniform else vq * vg
    den = w.sum(-1)
    dl = torch.where(den > 0, (w * dp).sum(-1) / torch.where(den > 0, den, 1.0), 0.0)
    if spec.mode == "local":
        return dl
    return total + spec.lam_value * (dl * dl if spec.local_sq else dl)


