"""Distances of PVEN (docs/method.md §3, §5): global Euclidean and the view-aware local D_l.

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

``official`` variant (the authors' ``clck_dist`` in their
``examples/parsing_reid/math_tools.py``, silverbulletmdc/PVEN 0b2e1a8, used by both
their local triplet loss and their evaluation): the attention uses ``v_i + 1`` (so
every pair has a common part and ``common`` is all True), each part feature is
L2-normalised over channels, and the per-part distance is ``sqrt(||f_i^p - f_i^q||_2)``:
their ``euclidean_dist`` (``vehicle_reid_pytorch/loss/triplet_loss.py``) returns the
Euclidean distance, ``distmat.clamp(min=1e-12).sqrt()``, and ``clck_dist`` applies
``.sqrt()`` to it again. ``_safe_sqrt(_safe_sqrt(x))`` here is exactly that:
``max(x, 1e-12) ** 0.25``. How the local term joins D_g at inference (their
``distmat + 0.5 * local_distmat ** 2``): :class:`pipeline.evaluation.spec.DistanceSpec`.

:func:`local_distance` is the one differentiable implementation; the variants are
presets of its flags (``pipeline.constants.VARIANT_DEFAULTS``). :func:`pven_distance_torch`
builds any evaluation :class:`~pipeline.evaluation.spec.DistanceSpec` from it (the
evaluator's exact tiled kernel is tested against it).

Every function is differentiable and gives finite values and finite gradients for
zero features, invisible parts and pairs without a common part: square roots are
taken of ``max(x, EPS)`` (below EPS the gradient is 0, never inf), and divisions by
a zero attention denominator are replaced by a where-select on a safe denominator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.constants import NUM_PARTS
from pipeline.evaluation.spec import DistanceSpec

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
        raise ValueError(f"{name} visibility: expected shape {tuple(features.shape[:2])}, "
                         f"got {tuple(visibility.shape)}")


def local_distance(fa: torch.Tensor, va: torch.Tensor, fb: torch.Tensor, vb: torch.Tensor, *,
                   normalize: bool = False, vis_offset: float = 0.0, part_root: bool = False,
                   uniform: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """D_l between every image of set a and every image of set b (eq. 3-4).

    fa: (N, 4, C) part features, va: (N, 4) visibilities; fb, vb likewise with M images.
    ``normalize`` L2-normalises each part feature over C first; ``vis_offset`` is added
    to every visibility (1: the authors' Laplace smoothing); ``part_root`` takes the
    per-part distance as sqrt(||x - y||) (the authors' code); ``uniform`` replaces the
    attention by 1/4 per part (an ablation: plain averaging).
    Returns ``(dist, common)``: dist (N, M) float, common (N, M) bool (the pair shares
    at least one visible part; where False, dist is exactly 0).
    """
    _check(fa, va, "a")
    _check(fb, vb, "b")
    if normalize:
        fa, fb = F.normalize(fa, dim=-1), F.normalize(fb, dim=-1)
    va, vb = va + vis_offset, vb + vis_offset
    if uniform:
        va, vb = torch.ones_like(va), torch.ones_like(vb)
    # Per-part distance matrices: (4, N, C) x (4, M, C) -> (4, N, M).
    part_dist = euclidean(fa.transpose(0, 1), fb.transpose(0, 1))
    if part_root:
        part_dist = _safe_sqrt(part_dist)
    weight = va.t()[:, :, None] * vb.t()[:, None, :]  # (4, N, M): v_i^p v_i^q
    denom = weight.sum(0)
    common = denom > 0
    # No common part: a zero numerator over a safe denominator of 1 gives 0 with a
    # finite gradient (a plain division would give 0/0 = NaN in the backward pass).
    attention = weight / torch.where(common, denom, torch.ones_like(denom))
    return (attention * part_dist).sum(0), common


def pairwise_local_distance(fa: torch.Tensor, va: torch.Tensor, fb: torch.Tensor, vb: torch.Tensor,
                            spec: DistanceSpec | str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_distance` with the flags of ``spec`` (a spec, or a variant name) -> (dist, common)."""
    if isinstance(spec, str):
        spec = DistanceSpec(mode="local", variant=spec)
    return local_distance(fa, va, fb, vb, normalize=spec.l2norm, vis_offset=spec.vis_offset,
                          part_root=spec.part_root, uniform=spec.uniform)


def spec_for(cfg, mode: str = "pven", **overrides) -> DistanceSpec:
    """The :class:`DistanceSpec` a trained model's settings imply (``cfg``: a resolved ReidConfig, or
    the model file's ``distance`` dict, where a missing key means the variant's value);
    ``overrides`` (e.g. ``lam``) win over them."""
    get = cfg.get if isinstance(cfg, dict) else lambda key: getattr(cfg, key)
    fields = {"variant": get("variant"), "part_distance": get("part_distance"),
              "visibility_offset": get("vis_offset"), "attention": get("attention") or "common_visible"}
    return DistanceSpec(mode=mode, **(fields | overrides))


def pven_distance_torch(q_global: torch.Tensor | None, q_parts: torch.Tensor | None, q_vis: torch.Tensor | None,
                        g_global: torch.Tensor | None = None, g_parts: torch.Tensor | None = None,
                        g_vis: torch.Tensor | None = None, spec: DistanceSpec = DistanceSpec()) -> torch.Tensor:
    """Differentiable (Nq, Ng) distance for ``spec`` between two batches (any device/dtype).

    q_global (Nq, Cg), q_parts (Nq, 4, Cp), q_vis (Nq, 4); the ``g_*`` default to the
    query tensors (all pairs within one batch, as the batch-hard triplet losses need).
    Same formulas as :func:`pipeline.evaluation.dense.pven_distance`, built on
    :func:`local_distance` (one implementation of D_l): gradients are finite
    everywhere, zero distances come out as ~1e-6 (the square root is floored there)
    and pairs without a common visible part get D_l = 0.
    """
    if g_global is None and g_parts is None:
        g_global, g_parts, g_vis = q_global, q_parts, q_vis
    dg = None
    if spec.uses_global:
        if q_global is None or g_global is None:
            raise ValueError(f"mode {spec.mode!r} needs global features")
        qg, gg = q_global, g_global
        if spec.l2norm:
            qg, gg = F.normalize(qg, dim=-1), F.normalize(gg, dim=-1)
        dg = squared_euclidean(qg, gg) if spec.squared else euclidean(qg, gg)
        if spec.mode == "global":
            return dg
    if q_parts is None or g_parts is None or q_vis is None or g_vis is None:
        raise ValueError(f"mode {spec.mode!r} needs part features and visibilities")
    dl, _ = pairwise_local_distance(q_parts, q_vis, g_parts, g_vis, spec)
    if spec.mode == "local":
        return dl
    return dg + spec.lam_value * (dl * dl if spec.local_sq else dl)
