"""Confidence intervals for per-query metrics: a paired bootstrap over query identities.

Definitions (docs/method.md §9):

* **Unit.** The queries of one vehicle identity are not independent (same vehicle,
  same gallery images), so the unit of resampling is the query *identity*: a resample
  draws ``n_ids`` identities with replacement out of the ``n_ids`` that have at least
  one evaluated query, and every query of a drawn identity comes along, as many times
  as the identity was drawn.
* **Statistic.** The mean of a per-query value over the resampled queries (AP -> mAP,
  ``first_rank == 1`` as 0/1 -> rank-1, INP -> mINP), i.e. with identity counts ``c``,
  per-identity sums ``S`` and per-identity query counts ``N``: ``(c @ S) / (c @ N)``.
  The point value is the plain mean over the queries (exactly the reported metric).
* **Skipped queries.** A query whose value is NaN in ANY of the columns given together
  (a skipped query has NaN AP) is left out of every column, so all columns (and so
  the two sides of a difference) use the same queries and the same identities.
* **Pairing.** Every column given together is resampled with the SAME identity counts.
  A difference ``a - b`` is the difference of the two resampled means, resample by
  resample, so what the two share (the identities drawn) cancels. The counts depend
  only on ``seed``, ``resamples`` and the number of identities, so two calls on the same
  identities with the same seed also draw the same resamples.
* **Interval.** Percentile interval: the ``(1 - level) / 2`` and ``(1 + level) / 2``
  quantiles (numpy's default linear interpolation) of the ``resamples`` resampled
  statistics; ``level`` 0.95 by default.
* **Repeats** (VehicleID's gallery draws): :meth:`IdentityBootstrap.over_repeats` takes
  one (columns, groups) part per repeat; the statistic is the mean over repeats of each
  repeat's mean, and each resample applies the same identity counts to every repeat.

Cost: the counts are drawn a few resamples at a time as a (chunk, n_ids) matrix of about
1 MB (it stays in cache while every column is reduced against it with a matrix-vector
product); memory is O(chunk x n_ids) whatever the number of resamples. 10,000 queries of
10,000 identities, 15 columns, B = 1000: about 0.1 s on 2 cores. Each column is reduced on its own, so
its interval is the same number whichever other columns are computed with it (the
evaluate stage's values equal :func:`interval` on the per-query CSV's columns).
Randomness: ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["LEVEL", "Interval", "IdentityBootstrap", "identity_counts", "interval", "paired_difference"]

LEVEL = 0.95
_CHUNK_BYTES = 1 << 20   # resamples drawn and reduced together: about 1 MB of float64 counts (cache-sized)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval.

    value:       the statistic on the queries themselves (NaN if no query counts)
    lo, hi:      the percentile interval (NaN with 0 resamples or no query)
    level:       coverage of the interval, e.g. 0.95
    resamples:   number of bootstrap resamples
    num_queries: queries used (per repeat, summed over repeats)
    num_ids:     identities resampled
    """
    value: float
    lo: float
    hi: float
    level: float
    resamples: int
    num_queries: int
    num_ids: int

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def fields(self, name: str) -> dict[str, float]:
        """``{name: value, name_lo: lo, name_hi: hi}`` (flat keys for metrics files)."""
        return {name: self.value, f"{name}_lo": self.lo, f"{name}_hi": self.hi}


def identity_counts(num_ids: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The identity counts of ``resamples`` resamples, as (chunk, num_ids) int64 blocks in order.

    Row ``b`` counts how often each identity is drawn in resample ``b`` (``num_ids`` draws
    with replacement, uniformly): each row sums to ``num_ids``.
    """
    num_ids, resamples = int(num_ids), int(resamples)
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    if num_ids < 1:
        return
    rng = np.random.default_rng(seed)
    chunk = max(1, min(256, _CHUNK_BYTES // (8 * num_ids)))
    for b0 in range(0, resamples, chunk):
        k = min(chunk, resamples - b0)
        draws = rng.integers(0, num_ids, size=(k, num_ids), dtype=np.int64)
        draws += (np.arange(k, dtype=np.int64) * num_ids)[:, None]
        yield np.bincount(draws.reshape(-1), minlength=k * num_ids).reshape(k, num_ids)


def _column(name: str, values: Any, n: int | None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = f"({n},)" if n is not None else "(n,)"
        raise ValueError(f"bootstrap column {name!r}: expected shape {want}, got {arr.shape}")
    return arr


class IdentityBootstrap:
    """Per-query columns resampled together by query identity (see the module docstring).

    ``parts``: one ``(columns, groups)`` pair per repeat, ``columns`` a mapping name ->
    (n,) per-query values (NaN: skipped), ``groups`` the (n,) query identities (ints or
    strings). Every part must have the same column names. Use :meth:`single` for one
    query set. After construction, :meth:`interval` and :meth:`difference` read the
    stored resampled statistics (B x columns floats).
    """

    def __init__(self, parts: Sequence[tuple[Mapping[str, Any], Any]], *, resamples: int = 1000,
                 seed: int = 0, level: float = LEVEL) -> None:
        if not parts:
            raise ValueError("IdentityBootstrap: no query set given")
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        if int(resamples) < 0:
            raise ValueError(f"resamples must be >= 0, got {resamples}")
        self.names = list(parts[0][0])
        if not self.names:
            raise ValueError("IdentityBootstrap: no column given")
        self.resamples, self.level = int(resamples), float(level)
        cleaned = []
        for r, (columns, groups) in enumerate(parts):
            if list(columns) != self.names:
                raise ValueError(f"IdentityBootstrap: repeat {r} has columns {list(columns)}, expected {self.names}")
            g = np.asarray(groups)
            if g.ndim != 1:
                raise ValueError(f"IdentityBootstrap: groups of repeat {r}: expected shape (n,), got {g.shape}")
            cols = [_column(name, columns[name], len(g)) for name in self.names]
            valid = np.logical_and.reduce([np.isfinite(c) for c in cols])
            cleaned.append(([c[valid] for c in cols], g[valid]))
        # identities with at least one usable query, in sorted order, shared by all repeats
        self.ids = np.unique(np.concatenate([g for _, g in cleaned])) if cleaned else np.zeros(0)
        self.num_ids = int(len(self.ids))
        self.num_queries = int(sum(len(g) for _, g in cleaned))
        k = len(self.names)
        # point values: each repeat's plain mean (exactly the metric's own mean), averaged
        self.point = np.array([np.mean([c[j].mean() if len(c[j]) else math.nan for c, _ in cleaned])
                               for j in range(k)])
        self.draws = np.full((self.resamples, k), np.nan)
        if self.num_ids == 0 or self.resamples == 0:
            return
        sums, counts = [], []
        for cols, g in cleaned:
            idx = np.searchsorted(self.ids, g)
            sums.append(np.stack([np.bincount(idx, weights=c, minlength=self.num_ids) for c in cols]))  # (k, ids)
            counts.append(np.bincount(idx, minlength=self.num_ids).astype(np.float64))
        b0 = 0
        for c in identity_counts(self.num_ids, self.resamples, seed):
            cf = c.astype(np.float64)
            total = np.zeros((len(c), k))
            with np.errstate(invalid="ignore", divide="ignore"):
                for s, n in zip(sums, counts):
                    den = cf @ n
                    for j in range(k):   # one product per column: a column's draws never depend on the others
                        total[:, j] += (cf @ s[j]) / den
            self.draws[b0:b0 + len(c)] = total / len(sums)
            b0 += len(c)

    @classmethod
    def single(cls, columns: Mapping[str, Any], groups: Any, **kwargs: Any) -> IdentityBootstrap:
        """One query set: ``columns`` name -> (n,) values, ``groups`` (n,) identities."""
        return cls([(columns, groups)], **kwargs)

    @classmethod
    def over_repeats(cls, parts: Sequence[tuple[Mapping[str, Any], Any]], **kwargs: Any) -> IdentityBootstrap:
        """Several query sets (repeats); the statistic is the mean over repeats."""
        return cls(parts, **kwargs)

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"bootstrap column {name!r}: expected one of {self.names}") from None

    def _interval(self, value: float, draws: np.ndarray) -> Interval:
        lo = hi = math.nan
        if self.resamples and np.isfinite(draws).any():
            q = ((1.0 - self.level) / 2, (1.0 + self.level) / 2)
            lo, hi = (float(v) for v in np.nanquantile(draws, q))
        return Interval(float(value), lo, hi, self.level, self.resamples, self.num_queries, self.num_ids)

    def interval(self, name: str) -> Interval:
        """Column ``name``'s mean with its interval."""
        j = self._index(name)
        return self._interval(self.point[j], self.draws[:, j])

    def difference(self, a: str, b: str) -> Interval:
        """``mean(a) - mean(b)`` with the interval of the paired resampled differences."""
        i, j = self._index(a), self._index(b)
        return self._interval(self.point[i] - self.point[j], self.draws[:, i] - self.draws[:, j])


def interval(values: Any, groups: Any, *, resamples: int = 1000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of a per-query metric (NaN: skipped) with its identity-bootstrap interval.

    values: (n,) e.g. AP, or ``first_rank == 1`` as 0/1 for rank-1; groups: (n,) query ids.
    """
    return IdentityBootstrap.single({"x": values}, groups, resamples=resamples, seed=seed, level=level).interval("x")


def paired_difference(a: Any, b: Any, groups: Any, *, resamples: int = 1000, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """``mean(a) - mean(b)`` over the same queries, with the interval of the paired bootstrap.

    a, b: (n,) per-query values of the same queries in the same order (e.g. two modes or
    two runs paired by query key); a query NaN in either is left out of both.
    """
    boot = IdentityBootstrap.single({"a": a, "b": b}, groups, resamples=resamples, seed=seed, level=level)
    return boot.difference("a", "b")
