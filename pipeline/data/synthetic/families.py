"""Look-alike families: which identities look the same, and what each identity is.

Identities come in families of ``synth.family_size`` = [min, max] members. Members
of a family are built from one look seed, so they share body type, size (the same
jitter, nothing per member), paint and every fitting's style (lamps, grille, tail
lamps, rims, windows, axles); they differ only in their marks, and no two members
have the same mark set (:func:`.marks.draw_mark_sets` draws them without
replacement). Telling members apart therefore takes the local, view-dependent cues
of PVEN's Figure 1, while a global look only finds the family.

Splits: the train ids (1..``train_ids``) and the test ids (the next ``test_ids``) are
cut into families separately, so a family is always wholly in train or wholly in
test, and each split keeps exactly the number of ids asked for: sizes are drawn one
by one, uniformly among those in [min, max] that leave a remainder still made of
sizes in [min, max]. Only a count that no such sum reaches (fewer than min ids, or
7 with [4, 6]) is cut into ``ceil(count / max)`` families of near-equal size, all at
most max and some below min.

Every random choice is seeded by ``(seed, tag, split or vid)``: the families of the
train split do not depend on ``test_ids`` and vice versa, and workers rebuild any
identity from its :class:`Identity` alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .marks import draw_mark_sets, mark_sets
from .vehicles import BODY_TYPES, VehicleModel, build_vehicle, draw_body

if TYPE_CHECKING:
    from pipeline.config import SynthConfig

# The most members a family may have: every body type has at least this many mark sets.
MAX_FAMILY_SIZE = min(len(mark_sets(body)) for body in BODY_TYPES)


@dataclass(frozen=True)
class Identity:
    """One vehicle identity: its family and its marks."""
    vid: int
    split: str            # "train" or "test"
    family: int           # 1-based family number, train families first
    first_vid: int        # the family's first vid: seeds the family's look and mark sets
    size: int             # members in the family
    member: int           # 0-based position in the family
    body: str
    marks: tuple[str, ...]


def _fits(n: int, lo: int, hi: int) -> bool:
    """Whether ``n`` ids can be cut into families of ``lo``..``hi`` members."""
    return n == 0 or -(-n // hi) * lo <= n


def family_sizes(n: int, lo: int, hi: int, rng: np.random.Generator) -> list[int]:
    """Sizes of the families ``n`` ids are cut into (sum ``n``; see the module docstring)."""
    if n < 0 or not 1 <= lo <= hi:
        raise ValueError(f"family_sizes: got n={n}, [min, max]=[{lo}, {hi}], expected n >= 0 and 1 <= min <= max")
    if not _fits(n, lo, hi):
        k = -(-n // hi)
        base, extra = divmod(n, k)
        return [base + 1] * extra + [base] * (k - extra)
    sizes = []
    while n:
        options = [s for s in range(lo, min(hi, n) + 1) if _fits(n - s, lo, hi)]
        size = options[int(rng.integers(len(options)))]
        sizes.append(size)
        n -= size
    return sizes


def _body_rng(seed: int, first_vid: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0xB0D1, first_vid])


def _look_rng(seed: int, first_vid: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x100C, first_vid])


def _sets_rng(seed: int, first_vid: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x3A45, first_vid])


def _mark_rng(seed: int, vid: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x40DE1, vid])


def identities(cfg: SynthConfig, seed: int, val_ids: int = 0) -> list[Identity]:
    """Every identity of the dataset, in vid order (1..train_ids+test_ids).

    ``val_ids`` (``data.val_ids``): the last ``val_ids`` train ids, which the shard stage holds
    out for validation, are cut into families of their own, so no family straddles the
    training and validation identities either.
    """
    if not 0 <= val_ids < cfg.train_ids:
        raise ValueError(f"data.val_ids: got {val_ids}, expected 0 <= val_ids < synth.train_ids ({cfg.train_ids})")
    lo, hi = cfg.family_size
    out: list[Identity] = []
    family = 0
    ranges = [(0, "train", 1, cfg.train_ids - val_ids), (1, "test", cfg.train_ids + 1, cfg.test_ids)]
    if val_ids:  # its own size stream (index 2): the test families do not move with val_ids
        ranges.insert(1, (2, "train", cfg.train_ids - val_ids + 1, val_ids))
    for split_index, split, first, count in ranges:
        vid = first
        for size in family_sizes(count, lo, hi, np.random.default_rng([seed, 0xFA11, split_index])):
            family += 1
            body = draw_body(_body_rng(seed, vid))
            sets = draw_mark_sets(_sets_rng(seed, vid), body, size)
            out.extend(Identity(vid + m, split, family, vid, size, m, body, sets[m]) for m in range(size))
            vid += size
    return out


def build_identity(seed: int, identity: Identity, body: str | None = None) -> VehicleModel:
    """The 3D model of ``identity`` in dataset ``seed``.

    ``body`` forces another body type (the family's look seed then gives a look of
    that type, and the member's marks are redrawn among those the type allows).
    """
    if body is not None and body not in BODY_TYPES:
        raise ValueError(f"body type {body!r}: expected one of {', '.join(BODY_TYPES)}")
    marks = identity.marks
    if body is not None and body != identity.body:
        marks = draw_mark_sets(_sets_rng(seed, identity.first_vid), body, identity.size)[identity.member]
    return build_vehicle(_look_rng(seed, identity.first_vid), body or identity.body, marks,
                         _mark_rng(seed, identity.vid))
