"""Which distance ranks the gallery: :class:`DistanceSpec` (docs/method.md §3, §5).

PVEN's distance between images p and q (eq. 3-4)::

    a_i(p, q) = v_i^p v_i^q / sum_j v_j^p v_j^q
    D_l(p, q) = sum_i a_i(p, q) * ||f_i^p - f_i^q||         (0 if no part is visible in both)
    D(p, q)   = D_g(p, q) + lam * D_l(p, q)

Variants:

* ``paper`` (default): raw features, ``D_g = ||g^p - g^q||`` (Euclidean), ``lam = 1``.
* ``official``: what the project implements of the authors' evaluation
  (``Clck_R1_mAP`` / ``clck_dist`` in their ``examples/parsing_reid/math_tools.py``):
  visibilities ``v + 1``, global and part features L2-normalised, the plain
  Euclidean distance per part, ``D_g`` left *squared* and ``D = D_g + 0.5 * D_l``.
  docs/method.md §3 lists where this still differs from their code. Each piece can
  be overridden: ``lam``, ``global_squared``, ``normalize``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.constants import VARIANTS

__all__ = ["MODES", "DistanceSpec"]

MODES = ("global", "local", "pven")


@dataclasses.dataclass(frozen=True)
class DistanceSpec:
    """Which distance ranks the gallery.

    mode:     ``global`` (D_g), ``local`` (D_l) or ``pven`` (D_g + lam * D_l)
    variant:  ``paper`` or ``official`` (see module doc)
    lam:      weight of D_l in ``pven`` mode; None: 1.0 (paper) / 0.5 (official)
    global_squared: rank on squared D_g; None: False (paper) / True (official)
    normalize: L2-normalise global and part features; None: False (paper) / True (official)
    """
    mode: str = "pven"
    variant: str = "paper"
    lam: float | None = None
    global_squared: bool | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DistanceSpec.mode={self.mode!r}: expected one of {MODES}")
        if self.variant not in VARIANTS:
            raise ValueError(f"DistanceSpec.variant={self.variant!r}: expected one of {VARIANTS}")
        if self.lam is not None and not (np.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"DistanceSpec.lam={self.lam!r}: expected a finite number >= 0")

    @property
    def official(self) -> bool:
        return self.variant == "official"

    @property
    def lam_value(self) -> float:
        return float(self.lam) if self.lam is not None else (0.5 if self.official else 1.0)

    @property
    def squared(self) -> bool:
        return self.global_squared if self.global_squared is not None else self.official

    @property
    def l2norm(self) -> bool:
        return self.normalize if self.normalize is not None else self.official

    @property
    def vis_offset(self) -> float:
        return 1.0 if self.official else 0.0

    @property
    def uses_global(self) -> bool:
        return self.mode in ("global", "pven")

    @property
    def uses_local(self) -> bool:
        return self.mode in ("local", "pven")
