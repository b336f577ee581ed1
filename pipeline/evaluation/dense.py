"""Dense distance matrices for the evaluation specs, on the evaluator's own kernel.

Use these to look at distances (a few queries, tests, re-ranking references); the
metrics themselves come from the streaming evaluator, which never holds (Q, G).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.threads import kernel_threads

from .features import FeatureSet, as_tensor
from .kernel import DEFAULT_TILE, BlockKernel, PreparedSet, round_up
from .spec import DistanceSpec

__all__ = ["pven_distance", "euclidean_distance"]


def pven_distance(query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(), *,
                  matmul_dtype: torch.dtype | None = None, tile: tuple[int, int] = DEFAULT_TILE,
                  q_block: int = 1024, g_block: int = 8192) -> np.ndarray:
    """Dense (Q, G) float32 distance matrix for ``spec`` (numpy).

    Computed with the same tiled kernel as the streaming evaluator, so its values are
    bitwise those the evaluator ranks (for the same ``spec``, ``tile``, ``matmul_dtype``).
    Memory: the (Q, G) result plus O(q_block x g_block).
    """
    qs = PreparedSet(query, spec, matmul_dtype)
    gs = PreparedSet(gallery, spec, matmul_dtype)
    nq, ng = qs.n, gs.n
    out = np.empty((nq, ng), dtype=np.float32)
    with kernel_threads() as workers:
        kernel = BlockKernel(spec, tile, bf16=matmul_dtype == torch.bfloat16, workers=workers)
        try:
            qb = round_up(max(1, int(q_block)), kernel.tm)
            gb = round_up(max(1, int(g_block)), kernel.tn)
            buf = torch.empty(min(qb, round_up(max(nq, 1), kernel.tm)), min(gb, round_up(max(ng, 1), kernel.tn)))
            for g0 in range(0, ng, gb):
                g1 = min(ng, g0 + gb)
                gc = gs.chunk(slice(g0, g1), "gallery", round_up(g1 - g0, kernel.tn), pool=kernel.pool())
                for q0 in range(0, nq, qb):
                    q1 = min(nq, q0 + qb)
                    qc = qs.chunk(slice(q0, q1), "query", round_up(q1 - q0, kernel.tm), pool=kernel.pool())
                    view = buf[:qc.n_pad, :gc.n_pad]
                    kernel.block(qc, gc, view)
                    out[q0:q1, g0:g1] = view[:q1 - q0, :g1 - g0].numpy()
        finally:
            kernel.close()
    return out


def euclidean_distance(a: Any, b: Any, *, squared: bool = False,
                       tile: tuple[int, int] = DEFAULT_TILE) -> np.ndarray:
    """Dense (Na, Nb) float32 (squared) Euclidean distances between rows of a (Na, C) and b (Nb, C)."""
    ta, tb = as_tensor("a", a), as_tensor("b", b)
    if ta.ndim != 2 or tb.ndim != 2 or ta.shape[1] != tb.shape[1]:
        raise ValueError(f"euclidean_distance: expected (Na, C) and (Nb, C), got {tuple(ta.shape)} "
                         f"and {tuple(tb.shape)}")
    spec = DistanceSpec(mode="global", global_squared=squared)
    return pven_distance(FeatureSet(np.zeros(len(ta)), global_feats=ta),
                         FeatureSet(np.zeros(len(tb)), global_feats=tb), spec, tile=tile)
