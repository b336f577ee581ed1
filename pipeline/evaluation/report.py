"""What the evaluate stage reports: metrics of every distance mode with intervals, the paired
differences, cross-view metrics, per-query rows, CMC rows, ranked-list pictures.

:func:`score` runs the dataset's protocol three times on the same embeddings (the
inference-side ablation): global only (D_g), local only (D_l) and PVEN
(D_g + lam D_l). With ``eval.bootstrap`` > 0 every mode's mAP, mINP and rank-k gets a
95% interval, and PVEN - global and PVEN - local a paired difference with its interval,
from one set of query-identity resamples shared by all of them
(:mod:`pipeline.evaluation.bootstrap`; VehicleID: the statistic is the mean over the
repeats, each resample applying the same identity draws to every repeat). When the
query and gallery images know their azimuth (``FeatureSet.views``), the metrics are
also split by the query-positive view difference (:mod:`pipeline.evaluation.crossview`).
:func:`query_rows` gives one row per query (and repeat) with every mode's AP and first
rank, so two runs can be paired by query key later.

:func:`ranked_lists` recomputes the distances of a few chosen queries only (a (n, G)
block, never the whole Q x G matrix) with the evaluator's own kernel, so a picture
shows exactly the ranking the metrics scored. Images come from the caller (``fetch``):
this package never reads shards.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.charts import line_chart
from pipeline.config import EvalConfig
from pipeline.viz import ranked_grid

from .bootstrap import LEVEL, IdentityBootstrap
from .crossview import BINS, SUBSETS, bin_centre, crossview_metrics
from .dense import pven_distance
from .features import FeatureSet
from .lam_scan import LAM_GRID, best_lambda, scan_lambda
from .metrics import RankMetrics
from .protocols import ProtocolResult, evaluate_protocol
from .rerank import RerankConfig
from .spec import MODES, DistanceSpec
from .topk import attention_weights

# (split, sample keys) -> {key: (rgb (H, W, 3) uint8, labels (H, W) uint8)}
ImageFetcher = Callable[[str, set[str]], dict[str, tuple[np.ndarray, np.ndarray]]]

RANKS = (1, 5, 10)                              # the rank-k of the summaries
DIFFERENCES = (("pven", "global"), ("pven", "local"))
CROSSVIEW_METRICS = ("mAP", "rank1")


@dataclass(frozen=True)
class Scores:
    """metrics: reports/eval.json's content; cmc: rows for plots/cmc.csv; crossview: rows for
    plots/crossview.csv (none without views); queries: rows for reports/eval_queries.csv;
    shown: the PVEN ranking the pictures show (without re-ranking), with the spec that produced it."""
    metrics: dict[str, Any]
    cmc: list[dict[str, float]]
    shown: ProtocolResult
    spec: DistanceSpec
    crossview: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)


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


def view_angles(sets: dict[str, tuple[FeatureSet, list[str]]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(query azimuths, gallery azimuths) when both splits have views, else None (e.g. VehicleID)."""
    if "query" not in sets or "gallery" not in sets:
        return None
    q, g = sets["query"][0].views, sets["gallery"][0].views
    return None if q is None or g is None else (q, g)


def score(sets: dict[str, tuple[FeatureSet, list[str]]], cfg: EvalConfig, *, source: str,
          test_subset: str | None, seed: int, base: DistanceSpec) -> Scores:
    """Metrics of the three modes of the model's distance ``base`` (its mode is replaced; its λ is
    the one :func:`choose_lambda` chose) (see module docstring)."""
    kwargs = protocol_kwargs(cfg, source, test_subset, seed, sets)
    views = view_angles(sets)
    metrics: dict[str, Any] = {}
    curves, results = {}, {}
    for mode in MODES:
        result = evaluate_protocol(source, dataclasses.replace(base, mode=mode),
                                   keep_positives=views is not None, **kwargs)
        metrics[mode] = result.summary()
        curves[mode] = result.metrics.cmc
        results[mode] = result
    groups = query_groups(results["pven"], sets)
    boot = mode_bootstrap(results, groups, cfg.bootstrap, seed)
    for mode in MODES:
        metrics[mode].update(_bounds(boot, [(name, f"{mode}.{name}") for name in _metric_names(results[mode])]))
    metrics["differences"] = {f"{a}_minus_{b}": _differences(boot, a, b, _metric_names(results[a]))
                              for a, b in DIFFERENCES}
    metrics["bootstrap"] = {"resamples": int(cfg.bootstrap), "level": LEVEL, "num_ids": boot.num_ids,
                            "num_queries": boot.num_queries, "unit": "query identity", "interval": "percentile"}
    cv_rows: list[dict[str, Any]] = []
    if views is not None:
        metrics["crossview"] = crossview_table(results, groups[0], views, cfg.bootstrap, seed)
        cv_rows = crossview_rows(metrics["crossview"])
    metrics["protocol"] = results["pven"].description
    metrics["variant"] = base.variant
    spec = dataclasses.replace(base, mode="pven")
    shown = results["pven"]
    if kwargs["rerank"] is not None:  # pictures rank by the PVEN distance itself: pick and title by its APs
        shown = evaluate_protocol(source, spec, **{**kwargs, "rerank": None})
    return Scores(metrics, cmc_rows(curves), shown, spec, cv_rows, query_rows(results, sets))


# --------------------------------------------------------------------------- intervals

def per_query(m: RankMetrics) -> dict[str, np.ndarray]:
    """Per-query values whose means are the summary's metrics (NaN for skipped queries).

    ``mAP``: AP; ``mINP``: INP; ``rank<k>``: 1.0 if the first positive is within rank k, else 0.0.
    """
    skipped = m.first_rank <= 0
    out = {"mAP": m.ap, "mINP": m.inp}
    for k in RANKS:
        if k <= len(m.cmc):
            out[f"rank{k}"] = np.where(skipped, np.nan, (m.first_rank <= k).astype(np.float64))
    return out


def _metric_names(result: ProtocolResult) -> list[str]:
    return list(per_query(result.runs[0]))


def query_groups(result: ProtocolResult, sets: dict[str, tuple[FeatureSet, list[str]]]) -> list[np.ndarray]:
    """Per run, the vehicle id of each of its queries (the bootstrap's resampling unit)."""
    source = sets["test"][0] if "test" in sets else sets["query"][0]
    return [np.asarray(source.ids)[idx] for idx in result.query_index]


def mode_bootstrap(results: dict[str, ProtocolResult], groups: list[np.ndarray], resamples: int,
                   seed: int) -> IdentityBootstrap:
    """One identity bootstrap over every mode's per-query values (columns ``<mode>.<metric>``), all runs."""
    parts = []
    for r, ids in enumerate(groups):
        columns = {f"{mode}.{name}": values for mode in MODES
                   for name, values in per_query(results[mode].runs[r]).items()}
        parts.append((columns, ids))
    return IdentityBootstrap.over_repeats(parts, resamples=resamples, seed=seed)


def _bounds(boot: IdentityBootstrap, names: list[tuple[str, str]]) -> dict[str, float]:
    """``{key_lo, key_hi}`` for each (key, column); nothing when the bootstrap is off."""
    if not boot.resamples:
        return {}
    out: dict[str, float] = {}
    for key, column in names:
        iv = boot.interval(column)
        out.update({f"{key}_lo": iv.lo, f"{key}_hi": iv.hi})
    return out


def _differences(boot: IdentityBootstrap, a: str, b: str, names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        iv = boot.difference(f"{a}.{name}", f"{b}.{name}")
        out.update(iv.fields(name) if boot.resamples else {name: iv.value})
    return out


# --------------------------------------------------------------------------- cross-view

def crossview_table(results: dict[str, ProtocolResult], groups: np.ndarray, views: tuple[np.ndarray, np.ndarray],
                    resamples: int, seed: int) -> dict[str, Any]:
    """Per subset of :data:`~pipeline.evaluation.crossview.SUBSETS`: ``num_queries`` and, per mode,
    mAP and rank1 (with intervals when ``resamples``), plus the paired PVEN - global difference."""
    per_mode = {mode: crossview_metrics(results[mode].metrics, *views) for mode in MODES}
    table: dict[str, Any] = {}
    for subset in SUBSETS:
        ms = {mode: per_mode[mode][subset] for mode in MODES}
        columns = {f"{mode}.{name}": per_query(ms[mode])[name] for mode in MODES for name in CROSSVIEW_METRICS}
        boot = IdentityBootstrap.single(columns, groups, resamples=resamples, seed=seed)
        entry: dict[str, Any] = {"num_queries": int(ms["pven"].num_queries)}
        for mode in MODES:
            entry[mode] = {"mAP": float(ms[mode].mAP), "rank1": float(ms[mode].cmc[0]),
                           **_bounds(boot, [(name, f"{mode}.{name}") for name in CROSSVIEW_METRICS])}
        entry["pven_minus_global"] = _differences(boot, "pven", "global", list(CROSSVIEW_METRICS))
        table[subset] = entry
    return table


def crossview_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """plots/crossview.csv: one row per azimuth-difference bin (x = the bin's centre), mAP per mode."""
    rows = []
    for name, _, _ in BINS:
        entry = table[name]
        rows.append({"azimuth_difference": bin_centre(name), "bin": name, "num_queries": entry["num_queries"],
                     **{mode: entry[mode]["mAP"] for mode in MODES},
                     **{f"{mode}_rank1": entry[mode]["rank1"] for mode in MODES}})
    return rows


CROSSVIEW_COLUMNS = ["azimuth_difference", "bin", "num_queries", *MODES, *(f"{m}_rank1" for m in MODES)]


def crossview_chart(rows: list[dict[str, Any]]) -> Any:
    """mAP per azimuth-difference bin, one line per mode (docs: reports/crossview.png).

    Without rows (a dataset without view angles) the chart says so and has no lines.
    """
    title = "Cross-view mAP by query-positive azimuth difference"
    if not rows:
        rows = [{"azimuth_difference": bin_centre(name), **dict.fromkeys(MODES, math.nan)} for name, _, _ in BINS]
        title = "Cross-view mAP: no view angles in this dataset"
    return line_chart(rows, "azimuth_difference", list(MODES), title=title, x_span=(0.0, 180.0),
                      x_label="azimuth difference query - positive (degrees, bin centre)", y_label="mAP")


# --------------------------------------------------------------------------- per query

QUERY_COLUMNS = ["repeat", "key", "vid", "camera", "azimuth",
                 *(f"{mode}_{col}" for mode in MODES for col in ("ap", "first_rank"))]


def _cell(value: Any) -> str:
    """A float as its shortest exact repr, NaN as an empty cell."""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def query_rows(results: dict[str, ProtocolResult],
               sets: dict[str, tuple[FeatureSet, list[str]]]) -> list[dict[str, Any]]:
    """reports/eval_queries.csv: per run (``repeat``, 0 for single-split protocols) and query: its
    key, vid, camera (-1 unknown), azimuth (empty if unknown) and every mode's AP (empty if
    skipped) and first rank (0 if skipped). Columns :data:`QUERY_COLUMNS`."""
    source, keys = sets["test"] if "test" in sets else sets["query"]
    ids = np.asarray(source.ids)
    cams = np.asarray(source.cams) if source.cams is not None else np.full(len(ids), -1)
    views = source.views
    rows = []
    for r, idx in enumerate(results["pven"].query_index):
        runs = {mode: results[mode].runs[r] for mode in MODES}
        for i, q in enumerate(idx.tolist()):
            row = {"repeat": r, "key": keys[q], "vid": str(ids[q]), "camera": str(int(cams[q])),
                   "azimuth": "" if views is None else _cell(views[q])}
            for mode, m in runs.items():
                row[f"{mode}_ap"] = _cell(m.ap[i])
                row[f"{mode}_first_rank"] = str(int(m.first_rank[i]))
            rows.append(row)
    return rows


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
                    "weights": attention_weights(vq, vg, spec)})
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


# --------------------------------------------------------------------------- lambda

LAM_COLUMNS = ("lam", "log2_lam", "mAP", "rank1")


def choose_lambda(base: DistanceSpec, lam: float | str | None,
                  validation: tuple[FeatureSet, FeatureSet] | None) -> tuple[DistanceSpec, dict[str, Any], list[dict]]:
    """The spec to score the test split with, the record of how its λ was chosen, and the scan's rows.

    ``lam`` is ``eval.lam``: a number (used as is), None (the variant's) or ``"val"`` (the best
    validation mAP of :func:`~pipeline.evaluation.lam_scan.scan_lambda`; the variant's when
    ``validation`` is None). The scan runs whenever validation features exist, so the curve
    is reported whatever the rule.
    """
    rows = scan_lambda(*validation, base) if validation is not None else []
    if lam == "val":
        rule = "validation" if rows else "variant (no validation identities)"
        chosen = best_lambda(rows) if rows else None
    else:
        rule, chosen = ("fixed", float(lam)) if lam is not None else ("variant", None)
    spec = dataclasses.replace(base, lam=chosen) if chosen is not None else base
    record = {"chosen": spec.lam_value, "rule": rule, "variant_lam": dataclasses.replace(base, lam=None).lam_value}
    if rows:
        record["scan"] = rows
        record["val_mAP_at_chosen"] = next((r["mAP"] for r in rows if r["lam"] == spec.lam_value), math.nan)
    plot = [{"lam": r["lam"], "log2_lam": math.log2(r["lam"]) if r["lam"] > 0 else math.log2(LAM_GRID[1]) - 1,
             "mAP": r["mAP"], "rank1": r["rank1"]} for r in rows]
    return spec, record, plot


def lam_chart(rows: list[dict[str, Any]], chosen: float) -> Any:
    """Validation mAP and rank-1 against log2 λ (λ = 0 drawn one step left of the smallest λ)."""
    title = f"Validation metrics against the inference weight λ (chosen λ = {chosen:g})"
    if not rows:
        rows = [{"log2_lam": 0.0, "mAP": math.nan, "rank1": math.nan}]
        title = "λ scan: no validation identities (data.val_ids: 0)"
    return line_chart(rows, "log2_lam", ["mAP", "rank1"], title=title,
                      x_label="log2 λ (leftmost point: λ = 0, D_g alone)", y_label="validation metric")
