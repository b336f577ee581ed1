"""What the evaluate stage reports: metrics of every distance mode, CMC rows, ranked-list pictures.

:func:`score` runs the dataset's protocol three times on the same embeddings (the
inference-side ablation): global only (D_g), local only (D_l) and PVEN
(D_g + lam D_l). :func:`ranked_lists` recomputes the distances of a few chosen
queries only (a (n, G) block, never the whole Q x G matrix) with the evaluator's own
kernel, so a picture shows exactly the ranking the metrics scored. Images come from
the caller (``fetch``): this package never reads shards.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.charts import line_chart
from pipeline.config import EvalConfig
from pipeline.viz import ranked_grid

from .dense import pven_distance
from .features import FeatureSet
from .protocols import ProtocolResult, evaluate_protocol
from .rerank import RerankConfig
from .spec import MODES, DistanceSpec

# (split, sample keys) -> {key: (rgb (H, W, 3) uint8, labels (H, W) uint8)}
ImageFetcher = Callable[[str, set[str]], dict[str, tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class Scores:
    """metrics: eval.json's content; cmc: rows for plots/cmc.csv; shown: the PVEN ranking
    the pictures show (without re-ranking), with the spec that produced it."""
    metrics: dict[str, Any]
    cmc: list[dict[str, float]]
    shown: ProtocolResult
    spec: DistanceSpec


def protocol_kwargs(cfg: EvalConfig, source: str, test_subset: str | None, seed: int,
                    sets: dict[str, tuple[FeatureSet, list[str]]]) -> dict[str, Any]:
    """The keyword arguments of :func:`evaluate_protocol` for a dataset's splits."""
    rerank = RerankConfig(cfg.k1, cfg.k2, cfg.rerank_lambda) if cfg.rerank else None
    kwargs: dict[str, Any] = dict(q_block=cfg.query_block, g_block=cfg.gallery_block, rerank=rerank)
    if source == "vehicleid":
        kwargs.update(test=sets["test"][0], repeats=cfg.vehicleid_repeats, seed=seed)
    else:
        kwargs.update(query=sets["query"][0], gallery=sets["gallery"][0])
    if source == "veriwild":
        kwargs.update(subset=test_subset, remove_junk=cfg.remove_junk)
    return kwargs


def score(sets: dict[str, tuple[FeatureSet, list[str]]], cfg: EvalConfig, *, source: str,
          test_subset: str | None, seed: int, variant: str) -> Scores:
    """Metrics of the three modes with ``variant``'s distance and ``cfg.lam`` (see module docstring)."""
    kwargs = protocol_kwargs(cfg, source, test_subset, seed, sets)
    metrics: dict[str, Any] = {}
    curves, results = {}, {}
    for mode in MODES:
        result = evaluate_protocol(source, DistanceSpec(mode=mode, variant=variant, lam=cfg.lam), **kwargs)
        metrics[mode] = result.summary()
        curves[mode] = result.metrics.cmc
        results[mode] = result
    metrics["protocol"] = results["pven"].description
    metrics["variant"] = variant
    spec = DistanceSpec(mode="pven", variant=variant, lam=cfg.lam)
    shown = results["pven"]
    if kwargs["rerank"] is not None:  # pictures rank by the PVEN distance itself: pick and title by its APs
        shown = evaluate_protocol(source, spec, **{**kwargs, "rerank": None})
    return Scores(metrics, cmc_rows(curves), shown, spec)


def attention(v_query: np.ndarray, v_gallery: np.ndarray, spec: DistanceSpec) -> np.ndarray:
    """Common-visible attention a_i (docs/method.md eq. 3) between one query and each gallery row.

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


def ranked_pictures(sets: dict[str, tuple[FeatureSet, list[str]]], scores: Scores, count: int,
                    fetch: ImageFetcher) -> dict[str, Any]:
    """Ranked lists of the first and the worst (lowest AP) ``count`` queries -> {"first": PIL image, "worst": ...}.

    Each row shows the query and its top 10 with view masks, attention weights and
    distances, as ranked by ``scores.spec`` (the metrics' own kernel).
    """
    (query, q_keys), (gallery, g_keys) = sets["query"], sets["gallery"]
    metrics = scores.shown.metrics
    scored = np.flatnonzero(~np.isnan(metrics.ap))
    picks = {"first": scored[:count].tolist(),
             "worst": scored[np.argsort(metrics.ap[scored], kind="stable")[:count]].tolist()}
    lists = {name: ranked_lists(query, gallery, p, scores.spec, scores.shown.remove_junk) for name, p in picks.items()}
    q_img = fetch("query", {q_keys[i] for p in picks.values() for i in p})
    g_img = fetch("gallery", {g_keys[j] for ls in lists.values() for r in ls for j in r["gallery"]})
    pictures = {}
    for name, ranked in lists.items():
        rows = [{"title": f"query {q_keys[r['query']]} (id {query.ids[r['query']]}) AP {metrics.ap[r['query']]:.2f}",
                 "query": q_img[q_keys[r["query"]]],
                 "ranked": [(*g_img[g_keys[j]], ok, w, d) for j, ok, w, d in
                            zip(r["gallery"], r["correct"], r["weights"], r["distance"])]}
                for r in ranked]
        which = "first queries" if name == "first" else "queries with the lowest AP"
        pictures[name] = ranked_grid(rows, title=f"Top 10 of the {len(rows)} {which}, ranked by {scores.spec.variant} "
                                                 f"PVEN distance (lambda {scores.spec.lam_value:g})")
    return pictures


def cmc_rows(curves: dict[str, np.ndarray], max_rank: int = 50) -> list[dict]:
    """{"pven": cmc, ...} -> rows ``{"rank": k, "pven": ..., ...}`` for plots/cmc.csv."""
    n = min(max_rank, *(len(c) for c in curves.values()))
    return [{"rank": k + 1, **{mode: float(c[k]) for mode, c in curves.items()}} for k in range(n)]


def cmc_chart(cmc: list[dict]) -> Any:
    """The CMC curves of the three modes as a PIL image (docs: reports/cmc.png)."""
    return line_chart(cmc, "rank", list(MODES), title="CMC: global (D_g), local (D_l) and PVEN distance",
                      x_label="rank", y_label="matching rate")
