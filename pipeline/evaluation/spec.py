"""Which distance ranks the gallery: :class:`DistanceSpec` (docs/method.md §3, §5).

PVEN's distance between images p and q (eq. 3-4), with per-part distance d::

    a_i(p, q) = (v_i^p + o)(v_i^q + o) / sum_j (v_j^p + o)(v_j^q + o)    (o: visibility offset)
    D_l(p, q) = sum_i a_i(p, q) * d(f_i^p, f_i^q)          (0 if no part is visible in both)
    D(p, q)   = D_g(p, q)[^2] + lam * D_l(p, q)[^2]

Variants (``pipeline.constants.VARIANT_DEFAULTS``):

* ``paper`` (default): raw features, ``d = ||x - y||``, ``o = 0``,
  ``D = ||g^p - g^q|| + 1.0 * D_l``.
* ``official``: the authors' evaluation, ``Clck_R1_mAP.compute`` and ``clck_dist`` in
  their ``examples/parsing_reid/math_tools.py`` (silverbulletmdc/PVEN 0b2e1a8): global
  and part features L2-normalised over channels (``feat_norm``), ``o = 1``,
  ``d = sqrt(||x - y||)`` (their ``euclidean_dist`` returns the Euclidean distance and
  ``clck_dist`` takes ``.sqrt()`` of it), ``D = ||g^p - g^q||^2 + 0.5 * D_l^2``
  (``distmat + self.lambda_ * (local_distmat ** 2)``).

Each piece can be overridden on its own (None: the variant's value). ``attention``
``uniform`` replaces eq. 3 by ``a_i = 1/4`` (plain averaging over the parts, an ablation).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.constants import ATTENTIONS, PART_DISTANCES, VARIANT_DEFAULTS, VARIANTS

__all__ = ["MODES", "DistanceSpec"]

MODES = ("global", "local", "pven")


@dataclasses.dataclass(frozen=True)
class DistanceSpec:
    """Which distance ranks the gallery.

    mode:           ``global`` (D_g), ``local`` (D_l) or ``pven`` (D_g + lam * D_l)
    variant:        ``paper`` or ``official`` (see module doc)
    lam:            weight of D_l in ``pven`` mode
    global_squared: rank on the squared D_g
    normalize:      L2-normalise global and part features over channels
    local_squared:  add lam * D_l^2 instead of lam * D_l (``pven`` mode; ``local`` ranks alike)
    part_distance:  ``euclidean`` or ``sqrt_euclidean`` per part
    visibility_offset: o added to every visibility (pooling and attention; the model adds
                    it to its pooling divisor, the distance to the attention weights)
    attention:      ``common_visible`` (eq. 3) or ``uniform`` (a_i = 1/4)

    None (the default of every field from ``lam`` to ``visibility_offset``) takes the variant's value.
    """
    mode: str = "pven"
    variant: str = "paper"
    lam: float | None = None
    global_squared: bool | None = None
    normalize: bool | None = None
    local_squared: bool | None = None
    part_distance: str | None = None
    visibility_offset: float | None = None
    attention: str = "common_visible"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DistanceSpec.mode={self.mode!r}: expected one of {MODES}")
        if self.variant not in VARIANTS:
            raise ValueError(f"DistanceSpec.variant={self.variant!r}: expected one of {VARIANTS}")
        if self.lam is not None and not (np.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"DistanceSpec.lam={self.lam!r}: expected a finite number >= 0")
        if self.part_distance is not None and self.part_distance not in PART_DISTANCES:
            raise ValueError(f"DistanceSpec.part_distance={self.part_distance!r}: expected one of {PART_DISTANCES}")
        if self.visibility_offset is not None and not (np.isfinite(self.visibility_offset)
                                                       and self.visibility_offset >= 0):
            raise ValueError(f"DistanceSpec.visibility_offset={self.visibility_offset!r}: expected a number >= 0")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"DistanceSpec.attention={self.attention!r}: expected one of {ATTENTIONS}")

    def _get(self, name: str, default_key: str | None = None):
        value = getattr(self, name)
        return VARIANT_DEFAULTS[self.variant][default_key or name] if value is None else value

    @property
    def official(self) -> bool:
        return self.variant == "official"

    @property
    def lam_value(self) -> float:
        return float(self._get("lam"))

    @property
    def squared(self) -> bool:
        """D_g enters squared."""
        return bool(self._get("global_squared"))

    @property
    def local_sq(self) -> bool:
        """D_l enters squared (``pven`` mode)."""
        return bool(self._get("local_squared"))

    @property
    def l2norm(self) -> bool:
        return bool(self._get("normalize"))

    @property
    def part_root(self) -> bool:
        """The per-part distance is sqrt(||x - y||) (``sqrt_euclidean``)."""
        return self._get("part_distance") == "sqrt_euclidean"

    @property
    def vis_offset(self) -> float:
        return float(self._get("visibility_offset", "vis_offset"))

    @property
    def uniform(self) -> bool:
        return self.attention == "uniform"

    @property
    def uses_global(self) -> bool:
        return self.mode in ("global", "pven")

    @property
    def uses_local(self) -> bool:
        return self.mode in ("local", "pven")
