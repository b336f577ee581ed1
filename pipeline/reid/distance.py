"""Distances of PVEN (method.md §3, §5): global Euclidean and the view-aware local D_l.

Shapes: N images, 4 parts (front, back, side, top), C channels.

* ``part_features`` (N, 4, C) are the mask-average-pooled features (eq. 1); an
  invisible part has a zero feature.
* ``visibility`` (N, 4) are the part areas in feature-map cells (eq. 2), 0 for an
  invisible part.

``paper`` variant (the default; eq. 3-4)::

    a_i(p, q) = v_i^p v_i^q / sum_j v_j^p v_j^q
    D_l(p, q) = sum_i a_i(p, q) * ||f_i^p - f_i^q||_2

and ``D_l = 0`` when p and q share no visible part (the denominator is 0); such pairs
are flagged in the returned ``common`` mask so a loss can leave them out of mining.

``official`` variant (the authors' code: ``clck_dist`` in their
``examples/parsing_reid/math_tools.py``, used by both their local triplet loss and
their evaluation): the attention uses ``v_i + 1`` (so every pair has a common part and
``common`` is all True) and each part feature is L2-normalised; the per-part distance
is the plain Euclidean one (their code takes ``sqrt`` of a *squared*-distance routine,
which method.md words as "sqrt of the Euclidean distance"). How the local term joins
D_g at inference is the evaluator's business: :class:`pipeline.evaluation.DistanceSpec`.

:func:`local_distance` is the one differentiable implementation; the variants are
presets of its ``normalize`` and ``vis_offset`` flags, and the evaluator's
``pven_distance_torch`` calls it too.

Every function is differentiable and gives finite values and finite gradients for
zero features, invisible parts and pairs without a common part: square roots are
taken of ``max(x, EPS)`` (below EPS the gradient is 0, never inf), and divisions by
a zero attention denominator are replaced by a where-select on a safe denominator.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Variant = Literal["paper", "official"]
VARIANTS = ("paper", "official")
NUM_PARTS = 4
# Squared distances below this are treated as this: sqrt has an infinite slope at 0.
EPS = 1e-12


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(x, min=EPS))


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances of the last dim: (..., N, C) x (..., M, C) -> (..., N, M).

    Computed as |a|^2 + |b|^2 - 2 a.b (one matmul), clamped at 0 against round-off.
    """
    aa = (a * a).sum(-1, keepdim=True)
    bb = (b * b).sum(-1, keepdim=True).transpose(-1, -2)
    return torch.clamp(aa + bb - 2.0 * (a @ b.transpose(-1, -2)), min=0.0)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (..., N, C) x (..., M, C) -> (..., N, M) (D_g); finite gradient at 0."""
    return _safe_sqrt(squared_euclidean(a, b))


def _check(features: torch.Tensor, visibility: torch.Tensor, name: str) -> None:
    if features.dim() != 3 or features.shape[1] != NUM_PARTS:
        raise ValueError(f"{name} part features: expected shape (N, {NUM_PARTS}, C), got {tuple(features.shape)}")
    if visibility.shape != features.shape[:2]:
        raise ValueError(f"{name} visibility: expected shape {tuple(features.shape[:2])}, got {tuple(visibility.shape)}")


def local_distance(fa: torch.Tensor, va: torch.Tensor, fb: torch.Tensor, vb: torch.Tensor, *,
                   normalize: bool = False, vis_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """D_l between every image of set a and every image of set b (eq. 3-4).

    fa: (N, 4, C) part features, va: (N, 4) visibilities; fb, vb likewise with M images.
    ``normalize`` L2-normalises each part feature first; ``vis_offset`` is added to
    every visibility (1: the authors' Laplace smoothing).
    Returns ``(dist, common)``: dist (N, M) float, common (N, M) bool (the pair shares
    at least one visible part; where False, dist is exactly 0).
    """
    _check(fa, va, "a")
    _check(fb, vb, "b")
    if normalize:
        fa, fb = F.normalize(fa, dim=-1), F.normalize(fb, dim=-1)
    va, vb = va + vis_offset, vb + vis_offset
    # Per-part distance matrices: (4, N, C) x (4, M, C) -> (4, N, M).
    part_dist = euclidean(fa.transpose(0, 1), fb.transpose(0, 1))
    weight = va.t()[:, :, None] * vb.t()[:, None, :]  # (4, N, M): v_i^p v_i^q
    denom = weight.sum(0)
    common = denom > 0
    # No common part: a zero numerator over a safe denominator of 1 gives 0 with a
    # finite gradient (a plain division would give 0/0 = NaN in the backward pass).
    attention = weight / torch.where(common, denom, torch.ones_like(denom))
    return (attention * part_dist).sum(0), common


def pairwise_local_distance(fa: torch.Tensor, va: torch.Tensor, fb: torch.Tensor, vb: torch.Tensor,
                            variant: Variant = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_distance` with the flags of ``variant`` (paper: raw; official: normalised, v + 1)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: got {variant!r}, expected one of {VARIANTS}")
    official = variant == "official"
    return local_distance(fa, va, fb, vb, normalize=official, vis_offset=1.0 if official else 0.0)
