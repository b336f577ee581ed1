"""Exact top-k retrieval over a gallery streamed in blocks: the search command's ranking.

:func:`nearest` ranks every gallery image for a few queries with the distance of a
:class:`~pipeline.evaluation.spec.DistanceSpec`, one gallery block at a time, keeping only
the ``k`` best per query. Distances come from the evaluator's tiled kernel
(:func:`~pipeline.evaluation.dense.pven_distance` on a block), so each value is bitwise
the one the streaming evaluator ranks for that pair (the kernel's per-row constants do not
depend on the rows around them). Ties keep gallery order, as the ranked-list pictures do.

Memory: the queries, one block of gallery features and a (Q, block) distance block; never
the (Q, G) matrix. A block is any :class:`FeatureSet` (e.g. a slice of a memory-mapped
index), so a 1M-image gallery costs what its block costs.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .dense import pven_distance
from .features import FeatureSet
from .kernel import DEFAULT_TILE
from .spec import DistanceSpec

__all__ = ["QUERY_TILE", "nearest", "attention_weights"]

QUERY_TILE = (8, 512)   # (query rows, gallery columns) of each GEMM for a few query images


def nearest(query: FeatureSet, blocks: Iterable[FeatureSet], spec: DistanceSpec, k: int,
            tile: tuple[int, int] = DEFAULT_TILE) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery images of each query -> (distances (Q, k') float32, indices (Q, k') int64).

    ``blocks`` are consecutive pieces of the gallery; indices count from the first row of
    the first block. k' = min(k, gallery size). Rows are sorted by distance, ties by index.
    ``tile``: the kernel's GEMM tile; :data:`QUERY_TILE` for a handful of queries (the
    evaluator's 256 query rows would pad one query 256-fold; distances then differ from the
    evaluator's in the last bits only, and are the same for a pair whatever the blocks).
    """
    if k < 1:
        raise ValueError(f"k: got {k}, expected >= 1")
    best_d = np.empty((len(query), 0), np.float32)
    best_i = np.empty((len(query), 0), np.int64)
    offset = 0
    for block in blocks:
        d = pven_distance(query, block, spec, tile=tile)
        cand_d = np.concatenate([best_d, d], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(offset, offset + len(block)), d.shape)], axis=1)
        keep = min(k, cand_d.shape[1])
        # Distance first, index second: np.lexsort sorts by its last key first.
        order = np.lexsort((cand_i, cand_d), axis=1)[:, :keep]
        best_d = np.take_along_axis(cand_d, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
        offset += len(block)
    return best_d, best_i


def attention_weights(v_query: np.ndarray, v_gallery: np.ndarray, spec: DistanceSpec) -> np.ndarray:
    """Common-visible attention a_i (docs/method.md eq. 3) of one query and each of n gallery images.

    v_query (4,), v_gallery (n, 4) visibilities -> (n, 4) float64 weights summing to 1 per row (all
    zero where the two images share no visible part); 1/4 each under ``attention: uniform``.
    """
    v_gallery = np.asarray(v_gallery, np.float64)
    if spec.uniform:
        return np.full(v_gallery.shape, 0.25)
    prod = (np.asarray(v_query, np.float64)[None, :] + spec.vis_offset) * (v_gallery + spec.vis_offset)
    total = prod.sum(1, keepdims=True)
    return np.divide(prod, total, out=np.zeros_like(prod), where=total > 0)
