"""Evaluation protocols of the datasets (docs/method.md §6): who is query, who is gallery, what is junk.

* ``veri776`` and ``synthetic``: the given query and gallery splits; gallery images
  with the query's id AND camera are junk (removed).
* ``veriwild``: the given splits of the small / medium / large test lists (3,000 /
  5,000 / 10,000 queries, one per id, against 38,861 / 64,389 / 128,517 images).
  Junk removal is a switch: the paper keeps same-camera images, other toolkits
  remove them. **Default: removed**, which is what the authors' README reports
  (mAP 79.8 / 73.9 / 66.2); results record which rule was used.
* ``vehicleid``: no cameras and no fixed split. For each repeat one image per id is
  drawn at random into the gallery and all other images are queries; ids with a
  single image give no query. ``repeats`` (10) seeded draws; every metric is
  reported as mean and standard deviation (ddof=0) over the repeats.

Every protocol returns a :class:`ProtocolResult` and evaluates with the exact
streaming evaluator (``**kwargs`` go to :class:`~pipeline.evaluation.streaming.StreamingEvaluator`,
e.g. ``q_block``, ``g_block``, ``matmul_dtype``, ``rerank``, ``keep_positives``). The
result records, per run, which input images were its queries and its gallery
(``query_index``, ``gallery_index``), so per-query values can be joined back to keys,
ids and views (:mod:`pipeline.evaluation.report`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pipeline.constants import VERIWILD_SUBSETS

from .features import FeatureSet
from .metrics import RankMetrics
from .spec import DistanceSpec
from .streaming import evaluate

__all__ = ["PROTOCOLS", "ProtocolResult", "evaluate_veri776", "evaluate_synthetic",
           "evaluate_veriwild", "evaluate_vehicleid", "vehicleid_split", "evaluate_protocol"]

PROTOCOLS = ("veri776", "synthetic", "veriwild", "vehicleid")
_SUMMARY_RANKS = (1, 5, 10)


@dataclasses.dataclass(frozen=True, eq=False)
class ProtocolResult:
    """Metrics of one protocol.

    protocol:    protocol name; description: what was evaluated and the junk rule
    remove_junk: whether same-id same-camera gallery images were removed
    runs:        one :class:`RankMetrics` per repeat (one for single-split protocols)
    mean, std:   over runs, for mAP, mINP, rank1/5/10, num_queries, num_skipped
    cmc_mean, cmc_std: (max_rank,) CMC curve over runs
    query_index, gallery_index: per run, the indices of its query / gallery images in the
                 protocol's input (``query`` / ``gallery``, or ``test`` for VehicleID)
    """
    protocol: str
    description: str
    remove_junk: bool
    runs: list[RankMetrics]
    mean: dict[str, float]
    std: dict[str, float]
    cmc_mean: np.ndarray
    cmc_std: np.ndarray
    query_index: list[np.ndarray] = dataclasses.field(default_factory=list)
    gallery_index: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def metrics(self) -> RankMetrics:
        """The single run of a single-split protocol (first repeat for VehicleID)."""
        return self.runs[0]

    def summary(self) -> dict[str, Any]:
        """Flat dict for metrics files: mean values, ``<name>_std`` where repeats > 1."""
        out: dict[str, Any] = {"protocol": self.protocol, "remove_junk": self.remove_junk,
                               "repeats": len(self.runs)}
        out.update(self.mean)
        if len(self.runs) > 1:
            out.update({f"{k}_std": v for k, v in self.std.items()})
        return out


def _result(protocol: str, description: str, remove_junk: bool, runs: list[RankMetrics],
            query_index: list[np.ndarray], gallery_index: list[np.ndarray]) -> ProtocolResult:
    rows = [r.summary(_SUMMARY_RANKS) for r in runs]
    keys = list(rows[0])
    mean = {k: float(np.mean([r.get(k, np.nan) for r in rows])) for k in keys}
    std = {k: float(np.std([r.get(k, np.nan) for r in rows])) for k in keys}
    cmcs = np.stack([r.cmc for r in runs])
    return ProtocolResult(protocol, description, remove_junk, runs, mean, std,
                          cmcs.mean(axis=0), cmcs.std(axis=0), query_index, gallery_index)


def _whole(query: FeatureSet, gallery: FeatureSet) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [np.arange(len(query))], [np.arange(len(gallery))]


def evaluate_veri776(query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(),
                     **kwargs: Any) -> ProtocolResult:
    """VeRi-776: 1,678 queries vs 11,579 gallery images, same-id same-camera images removed."""
    m = evaluate(query, gallery, spec, remove_junk=True, **kwargs)
    return _result("veri776", f"VeRi-776 protocol: {len(query)} queries vs {len(gallery)} gallery images, "
                   "gallery images with the query's id and camera removed (junk)", True, [m],
                   *_whole(query, gallery))


def evaluate_synthetic(query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(),
                       **kwargs: Any) -> ProtocolResult:
    """The synthetic set (VeRi-776 layout and rules)."""
    m = evaluate(query, gallery, spec, remove_junk=True, **kwargs)
    return _result("synthetic", f"synthetic set, VeRi-776 rules: {len(query)} queries vs {len(gallery)} "
                   "gallery images, same-id same-camera gallery images removed (junk)", True, [m],
                   *_whole(query, gallery))


def evaluate_veriwild(query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(), *,
                      subset: str | None = None, remove_junk: bool = True, **kwargs: Any) -> ProtocolResult:
    """VERI-Wild small/medium/large; ``remove_junk`` True (default) = authors' README numbers.

    ``subset`` only labels the result (and is checked to be one of small/medium/large);
    sizes other than the official ones are allowed (e.g. tests, partial data) and noted.
    """
    if subset is not None and subset not in VERIWILD_SUBSETS:
        raise ValueError(f"VERI-Wild subset {subset!r}: expected one of {tuple(VERIWILD_SUBSETS)}")
    m = evaluate(query, gallery, spec, remove_junk=remove_junk, **kwargs)
    size = f"{len(query)} queries vs {len(gallery)} gallery images"
    if subset is not None and (len(query), len(gallery)) != VERIWILD_SUBSETS[subset]:
        size += f" (official {subset}: {VERIWILD_SUBSETS[subset][0]} vs {VERIWILD_SUBSETS[subset][1]})"
    rule = ("same-id same-camera gallery images removed (as the authors' README numbers)" if remove_junk
            else "same-camera images kept (as the paper)")
    name = "veriwild" + (f"-{subset}" if subset else "")
    return _result(name, f"VERI-Wild {subset or ''} protocol: {size}, {rule}".replace("  ", " "),
                   remove_junk, [m], *_whole(query, gallery))


def vehicleid_split(ids: Any, seed: int, repeat: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One VehicleID draw: (query indices, gallery indices), both sorted.

    One image per id goes to the gallery, chosen uniformly at random with
    ``numpy.random.default_rng([seed, repeat])``; every other image is a query.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"vehicleid_split: expected a non-empty 1-D id array, got shape {ids.shape}")
    rng = np.random.default_rng([int(seed), int(repeat)])
    order = rng.permutation(len(ids))
    _, first = np.unique(ids[order], return_index=True)   # first image of each id in a random order
    gallery = np.sort(order[first])
    query = np.setdiff1d(np.arange(len(ids)), gallery, assume_unique=True)
    return query, gallery


def evaluate_vehicleid(test: FeatureSet, spec: DistanceSpec = DistanceSpec(), *, repeats: int = 10,
                       seed: int = 0, **kwargs: Any) -> ProtocolResult:
    """VehicleID on one test list (e.g. 800/1,600/2,400 ids): ``repeats`` seeded gallery draws."""
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs, queries, galleries = [], [], []
    for r in range(int(repeats)):
        qi, gi = vehicleid_split(test.ids, seed, r)
        runs.append(evaluate(test.subset(qi), test.subset(gi), spec, remove_junk=False, **kwargs))
        queries.append(qi)
        galleries.append(gi)
    n_ids = len(np.unique(np.asarray(test.ids)))
    return _result("vehicleid", f"VehicleID protocol: {len(test)} images of {n_ids} ids, one random image "
                   f"per id in the gallery, the rest queries, {repeats} draws (seed {seed}), no cameras "
                   "(nothing is junk); mean and std over draws", False, runs, queries, galleries)


def evaluate_protocol(name: str, spec: DistanceSpec = DistanceSpec(), *, query: FeatureSet | None = None,
                      gallery: FeatureSet | None = None, test: FeatureSet | None = None,
                      **kwargs: Any) -> ProtocolResult:
    """Dispatch by protocol name: ``veri776``/``synthetic``/``veriwild`` take query+gallery,
    ``vehicleid`` takes ``test`` (kwargs: repeats, seed, subset, remove_junk, evaluator options)."""
    if name not in PROTOCOLS:
        raise ValueError(f"evaluation protocol {name!r}: expected one of {PROTOCOLS}")
    if name == "vehicleid":
        if test is None:
            raise ValueError("protocol 'vehicleid' needs test= (the test list's images)")
        return evaluate_vehicleid(test, spec, **kwargs)
    if query is None or gallery is None:
        raise ValueError(f"protocol {name!r} needs query= and gallery=")
    fn = {"veri776": evaluate_veri776, "synthetic": evaluate_synthetic, "veriwild": evaluate_veriwild}[name]
    return fn(query, gallery, spec, **kwargs)
