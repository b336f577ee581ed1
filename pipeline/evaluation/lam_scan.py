"""Choosing the inference weight λ of ``D = D_g + λ D_l`` on validation identities, never on the test split.

The paper adds the two distances (λ = 1) and the authors' code weighs the squared local
term by 0.5; neither is calibrated for a given model, and in the paper variant the two
terms are on different scales (BN-neck global features, raw part features). The evaluate
stage therefore ranks the held-out validation identities (``data.val_ids``) with every λ
of :data:`LAM_GRID` (the saved embeddings: no retraining), and ``eval.lam: val`` uses the
λ of the best validation mAP (a tie goes to the smaller λ) on the test split.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .features import FeatureSet
from .spec import DistanceSpec
from .streaming import evaluate

__all__ = ["LAM_GRID", "scan_lambda", "best_lambda"]

# 0 (D_g alone), then powers of two from 1/64 to 64: the two terms' scales can differ by orders of magnitude.
LAM_GRID: tuple[float, ...] = (0.0, *(2.0 ** k for k in range(-6, 7)))


def scan_lambda(query: FeatureSet, gallery: FeatureSet, base: DistanceSpec,
                grid: tuple[float, ...] = LAM_GRID, **kwargs: Any) -> list[dict[str, float]]:
    """``[{"lam", "mAP", "rank1"}]`` of the ``pven`` mode of ``base`` for each λ in ``grid``.

    ``kwargs`` go to :func:`~pipeline.evaluation.streaming.evaluate` (same-id same-camera junk removed by default).
    """
    rows = []
    for lam in grid:
        result = evaluate(query, gallery, dataclasses.replace(base, mode="pven", lam=float(lam)), **kwargs)
        rows.append({"lam": float(lam), "mAP": float(result.mAP), "rank1": result.rank(1)})
    return rows


def best_lambda(rows: list[dict[str, float]]) -> float:
    """The λ of the highest mAP (NaN mAPs never win; a tie goes to the smaller λ)."""
    valid = [r for r in rows if not math.isnan(r["mAP"])]
    if not valid:
        raise ValueError("best_lambda: no λ gave a finite validation mAP (no validation query has a match)")
    return min(valid, key=lambda r: (-r["mAP"], r["lam"]))["lam"]
