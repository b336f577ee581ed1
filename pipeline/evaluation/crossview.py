"""Cross-view metrics: mAP and rank-1 split by the view difference between a query and its positives.

The claim PVEN makes is robustness across views. This module measures it on a dataset
that knows each image's azimuth (``FeatureSet.views``, the synthetic set), with the
definitions of docs/method.md §9:

* The azimuth difference of a query ``q`` and a gallery image ``g`` is
  ``d = |((a_q - a_g + 180) mod 360) - 180|`` in [0, 180] degrees (:func:`azimuth_difference`).
* Bins ``[0, 45)``, ``[45, 90)``, ``[90, 135)`` and ``[135, 180]`` (:data:`BINS`). In a
  bin, a query is evaluated if at least one of its positives has its ``d`` in the bin;
  its positives outside the bin are junk (removed from the ranking: neither positive
  nor negative). The usual junk rule (same id and camera) still applies and every
  negative stays. An unknown azimuth (NaN) falls in no bin.
* ``front_back``: a query seen from the front (``|a| <= 45``) with its positives seen from
  the back (``|a| >= 135``), and a query seen from the back with its positives seen from
  the front; its other positives are junk.

Nothing is re-ranked: removing positives moves no negative, so every subset is scored
exactly from the evaluation's :class:`~pipeline.evaluation.metrics.PositiveTable`
(``keep_positives=True``) with :func:`~pipeline.evaluation.metrics.subset_metrics`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import PositiveTable, RankMetrics, subset_metrics

__all__ = ["BINS", "FRONT_BACK", "SUBSETS", "azimuth_difference", "subset_masks", "crossview_metrics",
           "bin_centre"]

# (name, low, high): d in [low, high), the last bin closed at 180
BINS: tuple[tuple[str, float, float], ...] = (("0-45", 0.0, 45.0), ("45-90", 45.0, 90.0),
                                              ("90-135", 90.0, 135.0), ("135-180", 135.0, 180.0))
FRONT_BACK = "front_back"
SUBSETS = (*(name for name, _, _ in BINS), FRONT_BACK)
FRONT_MAX, BACK_MIN = 45.0, 135.0    # |azimuth| <= 45: seen from the front; >= 135: from the back


def azimuth_difference(a: Any, b: Any) -> np.ndarray:
    """``|((a - b + 180) mod 360) - 180|``: the angle between two azimuths, in [0, 180] degrees (NaN stays NaN)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(np.mod(a - b + 180.0, 360.0) - 180.0)


def bin_centre(name: str) -> float:
    """The middle of a bin's range in degrees (the x position of its point in the chart)."""
    for n, lo, hi in BINS:
        if n == name:
            return (lo + hi) / 2
    raise KeyError(f"crossview bin {name!r}: expected one of {[n for n, _, _ in BINS]}")


def subset_masks(table: PositiveTable, q_views: Any, g_views: Any) -> dict[str, np.ndarray]:
    """Per subset of :data:`SUBSETS`: a (P,) bool mask of the table's positives it keeps."""
    qa = np.asarray(q_views, dtype=np.float64)[table.query]
    ga = np.asarray(g_views, dtype=np.float64)[table.gallery]
    d = azimuth_difference(qa, ga)
    masks: dict[str, np.ndarray] = {}
    for i, (name, lo, hi) in enumerate(BINS):
        last = i == len(BINS) - 1
        masks[name] = (d >= lo) & ((d <= hi) if last else (d < hi))
    front_q, back_q = np.abs(qa) <= FRONT_MAX, np.abs(qa) >= BACK_MIN
    front_g, back_g = np.abs(ga) <= FRONT_MAX, np.abs(ga) >= BACK_MIN
    masks[FRONT_BACK] = (front_q & back_g) | (back_q & front_g)
    return masks


def crossview_metrics(result: RankMetrics, q_views: Any, g_views: Any,
                      max_rank: int | None = None) -> dict[str, RankMetrics]:
    """Exact metrics of every subset of :data:`SUBSETS` (``{}`` when either side has no views).

    ``result`` must come from an evaluation with ``keep_positives=True`` of the query and
    gallery sets whose azimuths are ``q_views`` (Q,) and ``g_views`` (G,) (NaN: unknown).
    ``max_rank`` defaults to the result's CMC length.
    """
    if q_views is None or g_views is None:
        return {}
    if result.positives is None:
        raise ValueError("crossview_metrics: the evaluation kept no positive table (use keep_positives=True)")
    n = len(result.first_rank)
    if np.asarray(q_views).shape != (n,):
        raise ValueError(f"crossview_metrics: q_views must have shape ({n},), got {np.asarray(q_views).shape}")
    table = result.positives
    if len(table) and int(table.gallery.max()) >= len(np.asarray(g_views)):
        raise ValueError(f"crossview_metrics: g_views has {len(np.asarray(g_views))} entries, the table "
                         f"names gallery image {int(table.gallery.max())}")
    rank = len(result.cmc) if max_rank is None else int(max_rank)
    return {name: subset_metrics(table, keep, n, rank) for name, keep in subset_masks(table, q_views, g_views).items()}
