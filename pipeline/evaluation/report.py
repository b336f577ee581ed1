"""What a user looks at after evaluation: CMC rows and ranked-list pictures.

``ranked_lists`` recomputes the distances of a few chosen queries only (a (n, G) block,
never the whole Q x G matrix) with the evaluator's own kernel, so the picture shows
exactly the ranking the metrics scored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.shards import decode_sample, eval_pipeline, shard_urls
from pipeline.evaluation.distance import DistanceSpec, FeatureSet, pven_distance


def attention(v_query: np.ndarray, v_gallery: np.ndarray, spec: DistanceSpec) -> np.ndarray:
    """Common-visible attention a_i (method.md eq. 3) between one query and each gallery row.

    v_query (4,), v_gallery (n, 4) visibilities -> (n, 4) weights summing to 1 per row
    (all zero where the two images share no visible part).
    """
    prod = (v_query[None, :] + spec.vis_offset) * (v_gallery + spec.vis_offset)
    total = prod.sum(1, keepdims=True)
    return np.divide(prod, total, out=np.zeros_like(prod, dtype=np.float64), where=total > 0)


def ranked_lists(query: FeatureSet, gallery: FeatureSet, picks: list[int], spec: DistanceSpec,
                 remove_junk: bool, k: int = 10) -> list[dict]:
    """Top-``k`` gallery entries for each query index in ``picks``, junk excluded as when scored.

    Returns per pick ``{"query": i, "gallery": [j...], "distance": [...], "correct": [...],
    "weights": (k, 4)}``; ties are shown in gallery order.
    """
    if not picks:
        return []
    dist = pven_distance(query.subset(np.array(picks)), gallery, spec)
    out = []
    for row, qi in zip(dist, picks):
        valid = np.ones(len(gallery), bool)
        if remove_junk and query.cams is not None and gallery.cams is not None and query.cams[qi] >= 0:
            valid &= ~((gallery.ids == query.ids[qi]) & (gallery.cams == query.cams[qi]))
        order = np.flatnonzero(valid)[np.argsort(row[valid], kind="stable")[:k]]
        vq = np.asarray(query.visibility, dtype=np.float64)[qi]
        vg = np.asarray(gallery.visibility, dtype=np.float64)[order]
        out.append({"query": qi, "gallery": order.tolist(), "distance": row[order].tolist(),
                    "correct": (gallery.ids[order] == query.ids[qi]).tolist(),
                    "weights": attention(vq, vg, spec)})
    return out


def fetch_images(shard_dir: Path, split: str, keys: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(rgb, labels) of the samples whose key is in ``keys``: one pass over the split's shards."""
    found = {}
    for sample in eval_pipeline(shard_urls(shard_dir, split), map_fn=lambda s: s):
        if sample["__key__"] in keys:
            decoded = decode_sample(sample)
            mask = decoded["mask"] if decoded["mask"] is not None else np.zeros(decoded["image"].shape[:2], np.uint8)
            found[sample["__key__"]] = (decoded["image"], mask)
    return found


def cmc_rows(curves: dict[str, np.ndarray], max_rank: int = 50) -> list[dict]:
    """{"pven": cmc, ...} -> rows ``{"rank": k, "pven": ..., ...}`` for plots/cmc.csv."""
    n = min(max_rank, *(len(c) for c in curves.values()))
    return [{"rank": k + 1, **{mode: float(c[k]) for mode, c in curves.items()}} for k in range(n)]
