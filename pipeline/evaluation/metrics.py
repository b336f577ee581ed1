"""Exact ReID ranking metrics (mAP, CMC, mINP) that never sort a gallery row.

Protocol (Market-1501 / VeRi-776 style, docs/method.md §6):

* For a query, a gallery entry with the same id is a *true match* (positive), except
  that with ``remove_junk`` an entry with the same id AND the same camera is *junk*:
  it is removed from the ranking (neither positive nor negative). A camera that is
  unknown (``None`` for the whole set, or a per-entry value of ``-1``/``None``) is
  never junk. Entries with another id are negatives.
* ``AP`` = mean over the query's positives of the precision at each positive's rank;
  ``CMC(k)`` = 1 if the first positive is within rank ``k``; ``INP`` = (number of
  positives) / (rank of the last positive). ``mAP``, ``mINP`` and ``cmc`` average
  over the evaluated queries. Metrics are fractions in [0, 1], not percentages.
* A query with no valid positive is skipped and counted in ``num_skipped``; if every
  query is skipped the metrics are NaN and ``num_queries`` is 0.

**Tie rule** (one rule, in every code path): among equal distances, negatives rank
before positives (pessimistic). Positives tied with each other take consecutive
ranks, which gives the same AP whatever their order. Results therefore never depend
on the order of the gallery.

How ranks are counted without sorting rows: for a block of queries only the
positives' distances are sorted (a handful per query). A negative matters only if it
is <= the row's largest positive distance; those few candidates are located among
the sorted positives with one vectorised ``searchsorted`` and counted with a
``bincount``. The rank of the j-th positive (0-based) is ``j + 1 + #{negatives <=
it}``. :class:`BlockRanker` does this counting; :func:`rank_metrics` (dense matrix)
and :mod:`pipeline.evaluation.streaming` (distances computed block by block) both
use it, so they agree exactly on the same distance values.

**Positive subsets without re-ranking.** Removing some positives as junk changes no
negative's position, so a kept positive's rank in the reduced ranking is ``(its index
among the kept positives by distance) + 1 + (negatives ranked before it)``. With
``keep_positives=True`` an evaluation also returns a :class:`PositiveTable` (query
index, gallery index, negatives before, one row per valid positive; O(#positives)
memory) and :func:`subset_metrics` scores any subset of its rows exactly, e.g. the
cross-view bins of :mod:`pipeline.evaluation.crossview`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import native

__all__ = ["RankMetrics", "PositiveTable", "BlockRanker", "TileCounter", "MetricAccumulator", "rank_metrics",
           "subset_metrics", "encode_ids", "encode_cams"]

# A per-row sentinel key bigger than any value index (indices are < 2**32 - 1).
_SENTINEL = (1 << 32) - 1


@dataclasses.dataclass(frozen=True, eq=False)
class PositiveTable:
    """Every valid positive of an evaluation, one row each (junk and skipped queries have none).

    query:            (P,) int64 query index (input order)
    gallery:          (P,) int64 gallery index (input order)
    negatives_before: (P,) int64 negatives ranked before this positive (tie rule included)

    Rows are sorted by (query, negatives_before, gallery). The positive's 1-based rank
    is its index among the query's rows + 1 + ``negatives_before``; the same holds inside
    any subset of the rows (see :func:`subset_metrics`).
    """
    query: np.ndarray
    gallery: np.ndarray
    negatives_before: np.ndarray

    def __len__(self) -> int:
        return int(self.query.shape[0])

    def same_as(self, other: PositiveTable) -> bool:
        return (np.array_equal(self.query, other.query) and np.array_equal(self.gallery, other.gallery)
                and np.array_equal(self.negatives_before, other.negatives_before))


@dataclasses.dataclass(frozen=True, eq=False)
class RankMetrics:
    """Metrics of one evaluation.

    mAP, mINP:    floats in [0, 1] (NaN when no query could be evaluated)
    cmc:          (max_rank,) float64; ``cmc[k-1]`` is the rank-k accuracy
    num_queries:  queries evaluated (with at least one valid positive)
    num_skipped:  queries without a valid positive (not in the averages)
    ap, inp:      (Q,) float64 per query in input order, NaN for skipped queries
    first_rank:   (Q,) int64 1-based rank of the first positive, 0 for skipped queries
    positives:    :class:`PositiveTable` when the evaluation was asked to keep it, else None
    """
    mAP: float
    mINP: float
    cmc: np.ndarray
    num_queries: int
    num_skipped: int
    ap: np.ndarray
    inp: np.ndarray
    first_rank: np.ndarray
    positives: PositiveTable | None = None

    def rank(self, k: int) -> float:
        """Rank-k accuracy (CMC at k, 1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank k={k} outside 1..max_rank={len(self.cmc)}")
        return float(self.cmc[k - 1])

    def summary(self, ranks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
        """Flat dict for metrics files / MLflow: mAP, mINP, rank1, rank5, ..., counts."""
        out: dict[str, float | int] = {"mAP": float(self.mAP), "mINP": float(self.mINP)}
        for k in ranks:
            if k <= len(self.cmc):
                out[f"rank{k}"] = float(self.cmc[k - 1])
        out["num_queries"] = int(self.num_queries)
        out["num_skipped"] = int(self.num_skipped)
        return out

    def same_as(self, other: RankMetrics) -> bool:
        """Bitwise equality of every metric and per-query value (NaN equal to NaN), and of the
        positive tables when both results kept one."""
        tables = (self.positives is None or other.positives is None
                  or self.positives.same_as(other.positives))
        return (self.num_queries == other.num_queries and self.num_skipped == other.num_skipped
                and _eq(self.mAP, other.mAP) and _eq(self.mINP, other.mINP)
                and np.array_equal(self.cmc, other.cmc, equal_nan=True)
                and np.array_equal(self.ap, other.ap, equal_nan=True)
                and np.array_equal(self.inp, other.inp, equal_nan=True)
                and np.array_equal(self.first_rank, other.first_rank) and tables)


def _eq(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# --------------------------------------------------------------------------- labels

def _as_1d(name: str, x: Any, n: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = f"length {n}" if n is not None else "any length"
        raise ValueError(f"{name}: expected a 1-D array of {want}, got shape {arr.shape}")
    return arr


def encode_ids(q_ids: Any, g_ids: Any, nq: int | None = None,
               ng: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map query and gallery ids (ints or strings) to shared int64 codes (equal id <=> equal code)."""
    q = _as_1d("q_ids", q_ids, nq)
    g = _as_1d("g_ids", g_ids, ng)
    try:
        _, inv = np.unique(np.concatenate([q, g]), return_inverse=True)
    except TypeError as e:  # e.g. mixed str/int object arrays
        raise ValueError(f"ids must be all numbers or all strings: {e}") from None
    inv = inv.astype(np.int64).reshape(-1)
    return inv[: len(q)], inv[len(q):]


def _unknown_cam(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind in "iu":
        return arr < 0
    if arr.dtype.kind == "f":
        return ~np.isfinite(arr) | (arr < 0)
    # object / string arrays: None, "" or "-1" mean unknown
    return np.array([v is None or (isinstance(v, str) and v in ("", "-1"))
                     or (isinstance(v, (int, np.integer)) and v < 0) for v in arr], dtype=bool)


def encode_cams(q_cams: Any, g_cams: Any, nq: int, ng: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Shared int64 camera codes, -1 where unknown; ``None`` if either side has no cameras."""
    if q_cams is None or g_cams is None:
        return None
    q = _as_1d("q_cams", q_cams, nq)
    g = _as_1d("g_cams", g_cams, ng)
    both = np.concatenate([q, g])
    unknown = _unknown_cam(both)
    codes = np.full(len(both), -1, dtype=np.int64)
    if (~unknown).any():
        known = both[~unknown]
        if known.dtype == object:
            known = known.astype(str)
        _, inv = np.unique(known, return_inverse=True)
        codes[~unknown] = inv.reshape(-1)
    return codes[:nq], codes[nq:]


# --------------------------------------------------------------------------- ranking

class BlockRanker:
    """Exact ranks of the positives of a block of ``n`` queries (rows ``0..n-1``).

    Build it with every positive ``(row, distance)`` of the block, then feed it the
    block's negatives (:meth:`add_block` for a distance block, :meth:`add` for single
    entries) in any order and in any number of pieces; :meth:`finalize` gives per-row
    AP, INP and first rank. Memory: O(#positives + n) plus the candidates of one call.

    Counting: ``u`` holds all positive distances of the block, sorted. A value ``x``
    is replaced by ``j(x) = #{u < x}``; for a positive ``p``, ``p < x <=> j(p) < j(x)``,
    so integer keys ``(row << 32) | j`` compare like ``(row, distance)`` pairs and one
    1-D ``searchsorted`` over the block's sorted positive keys (plus a sentinel per
    row) gives every candidate's bucket: the number of the row's positives strictly
    below it. A negative in bucket ``b`` is ranked before positives ``b, b+1, ...``
    (so on a tie it goes first: the documented tie rule).

    With ``pos_cols`` (the gallery index of each positive) :meth:`positives` also gives,
    per positive, its row, gallery index and the number of negatives ranked before it.
    Positives tied with each other share a key and the same count, so which of them
    lands in which slot does not matter.
    """

    def __init__(self, n_rows: int, pos_rows: torch.Tensor, pos_vals: torch.Tensor,
                 pos_cols: torch.Tensor | None = None) -> None:
        if n_rows >= (1 << 31):
            raise ValueError(f"too many rows in one block: {n_rows}")
        device = pos_vals.device
        self.n = int(n_rows)
        pos_rows = pos_rows.to(device=device, dtype=torch.int64)
        self.u = torch.sort(pos_vals).values
        keys = (pos_rows << 32) | torch.searchsorted(self.u, pos_vals)
        sentinels = (torch.arange(self.n, device=device, dtype=torch.int64) << 32) | _SENTINEL
        if pos_cols is None:
            self.keys = torch.sort(torch.cat([keys, sentinels])).values
            self._slot_cols: torch.Tensor | None = None
        else:
            if pos_cols.shape != pos_rows.shape:
                raise ValueError(f"pos_cols: expected shape {tuple(pos_rows.shape)}, got {tuple(pos_cols.shape)}")
            self.keys, order = torch.sort(torch.cat([keys, sentinels]), stable=True)
            cols = torch.cat([pos_cols.to(device=device, dtype=torch.int64),
                              torch.full((self.n,), -1, dtype=torch.int64, device=device)])
            self._slot_cols = cols[order]            # gallery index per slot, -1 for sentinels
        self.npos = torch.bincount(pos_rows, minlength=self.n)
        seg_len = self.npos + 1
        self.seg_start = torch.cumsum(seg_len, 0) - seg_len
        self.hist = torch.zeros(self.keys.numel(), dtype=torch.int64, device=device)
        # Largest positive per row: only negatives <= it can change a rank. NaN for rows
        # without positives, so that every comparison with them is False.
        self.pmax = torch.full((self.n,), float("nan"), dtype=pos_vals.dtype, device=device)
        if pos_vals.numel():
            self.pmax.scatter_reduce_(0, pos_rows, pos_vals, reduce="amax", include_self=False)
        self._pmax_np = self.pmax.cpu().numpy()
        self.num_candidates = 0

    @property
    def has_positive(self) -> torch.Tensor:
        return self.npos > 0

    def add(self, rows: torch.Tensor, vals: torch.Tensor) -> None:
        """Count negatives given as parallel 1-D ``rows`` (0..n-1) and distances."""
        if rows.numel() == 0:
            return
        keys = (rows.to(torch.int64) << 32) | torch.searchsorted(self.u, vals.to(self.u.dtype))
        slots = torch.searchsorted(self.keys, keys)
        self.hist += torch.bincount(slots, minlength=self.keys.numel())
        self.num_candidates += int(rows.numel())

    def add_block(self, dist: torch.Tensor, q_codes: np.ndarray | None = None,
                  g_codes: np.ndarray | None = None) -> None:
        """Count the negatives of a distance block ``dist`` (n, w) (CPU tensor, any strides).

        Without codes every entry is a negative. With ``q_codes`` (n,) and ``g_codes``
        (w,) int arrays, entries with equal codes (positives and junk) are left out.

        Only entries <= the row's largest positive can move a rank. When they are a
        small part of the block (the usual case) they are picked out and located with
        :meth:`add`; when they are many (e.g. random features) every entry is located
        among its row's positives with one batched ``searchsorted`` instead. Both give
        the same counts. (numpy does the filtering: its broadcast compare and nonzero
        are several times faster than torch's single-threaded ones.)
        """
        dn = dist.detach().cpu().numpy()
        cand = dn <= self._pmax_np[:, None]          # NaN (no positive) compares False
        n_cand = int(np.count_nonzero(cand))
        if n_cand == 0:
            return
        if n_cand * 4 > cand.size:
            self._add_dense(dist, q_codes, g_codes)
            return
        rows, cols = np.nonzero(cand)
        if q_codes is not None:
            keep = q_codes[rows] != g_codes[cols]
            rows, cols = rows[keep], cols[keep]
        self.add(torch.from_numpy(rows), torch.from_numpy(dn[rows, cols]))

    def _padded_positives(self) -> torch.Tensor:
        """(n, max_pos + 1) sorted positive distances per row, padded with +inf."""
        if getattr(self, "_ppad", None) is None:
            row = self.keys >> 32
            local = torch.arange(self.keys.numel(), device=self.keys.device) - self.seg_start[row]
            is_pos = local < self.npos[row]
            width = int(self.npos.max()) + 1 if self.n else 1
            ppad = torch.full((self.n, width), float("inf"), dtype=self.u.dtype, device=self.u.device)
            ppad[row[is_pos], local[is_pos]] = self.u[self.keys[is_pos] & 0xFFFFFFFF]
            self._ppad = ppad
        return self._ppad

    def _add_dense(self, dist: torch.Tensor, q_codes: np.ndarray | None, g_codes: np.ndarray | None,
                   rows_per_step: int = 128) -> None:
        ppad = self._padded_positives()
        dump = self.keys.numel()            # extra bin for excluded entries, dropped below
        for r0 in range(0, self.n, rows_per_step):
            r1 = min(self.n, r0 + rows_per_step)
            # bucket = number of the row's positives strictly below the entry (+inf pads
            # are never below a finite entry); clamp to the row's sentinel slot.
            bucket = torch.searchsorted(ppad[r0:r1], dist[r0:r1].to(ppad.dtype).contiguous())
            torch.minimum(bucket, self.npos[r0:r1, None], out=bucket)
            bucket += self.seg_start[r0:r1, None]
            if q_codes is not None:
                bucket.masked_fill_(torch.from_numpy(q_codes[r0:r1, None] == g_codes[None, :]), dump)
            self.hist += torch.bincount(bucket.view(-1), minlength=dump + 1)[:dump]
            self.num_candidates += int(bucket.numel())

    def _positive_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, index among the row's positives, slot, negatives before) of every positive."""
        cum = torch.cumsum(self.hist, 0)
        slot = torch.arange(self.keys.numel(), device=self.keys.device)
        row = self.keys >> 32
        local = slot - self.seg_start[row]
        is_pos = local < self.npos[row]
        base = cum[self.seg_start] - self.hist[self.seg_start]  # negatives counted before row
        row, local, slot = row[is_pos], local[is_pos], slot[is_pos]
        return row, local, slot, cum[slot] - base[row]

    def positives(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per positive: (row, gallery index, negatives ranked before it), int64; needs ``pos_cols``."""
        if self._slot_cols is None:
            raise ValueError("BlockRanker.positives: the ranker was built without pos_cols")
        row, _, slot, before = self._positive_slots()
        return row.cpu().numpy(), self._slot_cols[slot].cpu().numpy(), before.cpu().numpy()

    def finalize(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: (AP float64, INP float64, first rank int64); NaN/NaN/0 without positives."""
        n = self.n
        row, local, slot, before = self._positive_slots()
        rank = local + 1 + before                                # 1-based, int64
        prec = (local + 1).to(torch.float64) / rank.to(torch.float64)
        npos = self.npos.to(torch.float64)
        ap = torch.zeros(n, dtype=torch.float64, device=prec.device).index_add_(0, row, prec)
        first = torch.zeros(n, dtype=torch.int64, device=prec.device)
        last = torch.zeros(n, dtype=torch.int64, device=prec.device)
        first[row[local == 0]] = rank[local == 0]
        is_last = local == self.npos[row] - 1
        last[row[is_last]] = rank[is_last]
        valid = self.npos > 0
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=prec.device)
        ap = torch.where(valid, ap / npos.clamp_min(1), nan)
        inp = torch.where(valid, npos / last.clamp_min(1).to(torch.float64), nan)
        return ap.cpu().numpy(), inp.cpu().numpy(), first.cpu().numpy()


def _float_keys(rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """int64 keys ordered like (row, value) pairs, for float32 values >= 0 (-0.0 taken as +0.0).

    Non-negative IEEE floats order like their bit patterns; the row goes in the high bits.
    """
    bits = np.ascontiguousarray(vals, dtype=np.float32).view(np.int32).astype(np.int64) & 0x7FFFFFFF
    return (rows.astype(np.int64) << 32) | bits


class TileCounter:
    """Counts a block's negatives from distance tiles handed over by kernel worker threads.

    ``__call__(worker, i0, j0, tile)`` takes a (tm, tn) float32 tile of non-negative
    distances whose rows start at query row ``i0`` of the ranker's block and columns at
    ``j0`` of the current gallery piece of ``width`` columns; rows >= n and columns >=
    width are padding. With ``q_codes`` (n,) and ``g_codes`` (width,) entries with
    equal codes are left out, else every entry is a negative. Candidates (<= the row's
    largest positive) are located among their row's sorted positives, on the worker,
    while the tile is in cache: one ``searchsorted`` of (row, value) integer keys; a
    tile dense in candidates is searched whole, row by row. :meth:`flush` adds the
    counts to the ranker. Exactly the counts of :meth:`BlockRanker.add_block`.
    """

    def __init__(self, ranker: BlockRanker, workers: int, width: int, q_codes: np.ndarray | None = None,
                 g_codes: np.ndarray | None = None, device: torch.device | str = "cpu") -> None:
        if ranker.u.dtype != torch.float32:
            raise ValueError(f"TileCounter needs float32 distances, got {ranker.u.dtype}")
        self.r = ranker
        self.width = int(width)
        self.q_codes = None if q_codes is None else np.ascontiguousarray(q_codes, dtype=np.int64)
        self.g_codes = None if g_codes is None else np.ascontiguousarray(g_codes, dtype=np.int64)
        self.ppad = ranker._padded_positives()      # built here, not lazily in worker threads
        self.ppad_np = self.ppad.numpy()             # C-contiguous (n, stride)
        self.stride = self.ppad.shape[1]
        self.npos = ranker.npos.cpu().numpy()
        self.seg_start = ranker.seg_start.cpu().numpy()
        self.hist = [np.zeros(ranker.keys.numel(), dtype=np.int64) for _ in range(workers)]
        self.slots: list[list[np.ndarray]] = [[] for _ in range(workers)]   # counted at flush
        self.count = [0] * workers
        self.seconds = [0.0] * workers    # time spent counting, per worker (for reports)
        self.device = torch.device(device)
        # CPU tiles: native.c counts in one pass (the same counts as the numpy path below);
        # GPU tiles: candidates are filtered there (_count_device)
        self.native = self.device.type == "cpu" and native.available()
        if self.device.type != "cpu":
            self.pmax_dev = ranker.pmax.to(self.device)
            self.q_dev = None if q_codes is None else torch.from_numpy(self.q_codes).to(self.device)
            self.g_dev = None if g_codes is None else torch.from_numpy(self.g_codes).to(self.device)
        if not self.native:                # (row, value) keys of the positives, for np.searchsorted
            rows = np.repeat(np.arange(ranker.n), self.stride)
            self.pkeys = _float_keys(rows, self.ppad_np.reshape(-1))   # row-major, sorted

    def __call__(self, worker: int, i0: int, j0: int, tile: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            self._count(worker, i0, j0, tile)
        finally:
            self.seconds[worker] += time.perf_counter() - t0

    def _count(self, worker: int, i0: int, j0: int, tile: torch.Tensor) -> None:
        nr, nc = min(self.r.n - i0, tile.shape[0]), min(self.width - j0, tile.shape[1])
        if nr <= 0 or nc <= 0:
            return
        if tile.device.type != "cpu":
            self._count_device(worker, i0, j0, tile[:nr, :nc])
            return
        t = tile.numpy()[:nr, :nc]
        if self.native:
            self.count[worker] += native.count_tile(
                t, self.r._pmax_np[i0:i0 + nr], self.ppad_np[i0:i0 + nr], self.npos[i0:i0 + nr],
                self.seg_start[i0:i0 + nr], None if self.q_codes is None else self.q_codes[i0:i0 + nr],
                None if self.g_codes is None else self.g_codes[j0:j0 + nc], self.hist[worker])
            return
        cand = t <= self.r._pmax_np[i0:i0 + nr, None]
        k = int(np.count_nonzero(cand))
        if k == 0:
            return
        if k * 4 > cand.size:
            # many candidates: locate every entry of the tile in its row's positives
            bucket = torch.searchsorted(self.ppad[i0:i0 + nr], tile[:nr, :nc].contiguous()).numpy()
            np.minimum(bucket, self.npos[i0:i0 + nr, None], out=bucket)
            bucket += self.seg_start[i0:i0 + nr, None]
            if self.q_codes is not None:
                bucket = bucket[self.q_codes[i0:i0 + nr, None] != self.g_codes[None, j0:j0 + nc]]
            self.hist[worker] += np.bincount(bucket.reshape(-1), minlength=len(self.hist[worker]))
            self.count[worker] += int(bucket.size)
            return
        rows, cols = np.nonzero(cand)
        if self.q_codes is not None:            # drop positives and junk (same id)
            keep = self.q_codes[rows + i0] != self.g_codes[cols + j0]
            rows, cols = rows[keep], cols[keep]
        if rows.size == 0:
            return
        self._add_candidates(worker, rows + i0, t[rows, cols])

    def _count_device(self, worker: int, i0: int, j0: int, t: torch.Tensor) -> None:
        """A GPU tile: candidates are picked out there; only they (row, value) cross to the CPU."""
        nr, nc = t.shape
        cand = t <= self.pmax_dev[i0:i0 + nr, None]
        if self.q_dev is not None:
            cand &= self.q_dev[i0:i0 + nr, None] != self.g_dev[None, j0:j0 + nc]
        rows, cols = cand.nonzero(as_tuple=True)
        if rows.numel():
            self._add_candidates(worker, rows.cpu().numpy() + i0, t[rows, cols].cpu().numpy())

    def _add_candidates(self, worker: int, rows: np.ndarray, vals: np.ndarray) -> None:
        """Bucket candidates given as block rows and distances among their row's positives."""
        pos = np.searchsorted(self.pkeys, _float_keys(rows, vals))
        bucket = np.minimum(pos - rows * self.stride, self.npos[rows])
        self.slots[worker].append(self.seg_start[rows] + bucket)
        self.count[worker] += int(rows.size)

    def flush(self) -> None:
        """Add everything counted so far to the ranker."""
        for w in range(len(self.hist)):
            if self.slots[w]:
                self.hist[w] += np.bincount(np.concatenate(self.slots[w]), minlength=len(self.hist[w]))
                self.slots[w] = []
            if self.count[w]:
                self.r.hist += torch.from_numpy(self.hist[w])
                self.r.num_candidates += self.count[w]
                self.hist[w][:] = 0
                self.count[w] = 0


class MetricAccumulator:
    """Collects per-query results (in input order) and averages them into :class:`RankMetrics`.

    With ``keep_positives`` each :meth:`put` also takes the block's positives (row within
    ``query_index``, gallery index, negatives before) and the result carries a
    :class:`PositiveTable`.
    """

    def __init__(self, num_queries: int, max_rank: int, keep_positives: bool = False) -> None:
        if int(max_rank) < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.max_rank = int(max_rank)
        self.ap = np.full(num_queries, np.nan)
        self.inp = np.full(num_queries, np.nan)
        self.first = np.zeros(num_queries, dtype=np.int64)
        self.keep_positives = bool(keep_positives)
        self._positives: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def put(self, query_index: np.ndarray, ap: np.ndarray, inp: np.ndarray, first: np.ndarray,
            positives: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        query_index = np.asarray(query_index)
        self.ap[query_index] = ap
        self.inp[query_index] = inp
        self.first[query_index] = first
        if self.keep_positives and positives is not None:
            rows, cols, before = positives
            self._positives.append((query_index[rows], cols, before))

    def table(self) -> PositiveTable | None:
        """The positives put so far, sorted by (query, negatives before, gallery); None if not kept."""
        if not self.keep_positives:
            return None
        parts = self._positives or [(np.zeros(0, np.int64),) * 3]
        q, g, b = (np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3))
        order = np.lexsort((g, b, q))
        return PositiveTable(q[order], g[order], b[order])

    def result(self) -> RankMetrics:
        valid = self.first > 0
        nq = int(valid.sum())
        table = self.table()
        if nq == 0:
            cmc = np.full(self.max_rank, np.nan)
            return RankMetrics(float("nan"), float("nan"), cmc, 0, len(self.first),
                               self.ap, self.inp, self.first, table)
        hits = np.bincount(np.minimum(self.first[valid], self.max_rank + 1) - 1,
                           minlength=self.max_rank + 1)[: self.max_rank]
        cmc = np.cumsum(hits) / nq
        return RankMetrics(float(self.ap[valid].mean()), float(self.inp[valid].mean()), cmc,
                           nq, len(self.first) - nq, self.ap, self.inp, self.first, table)


def subset_metrics(table: PositiveTable, keep: np.ndarray, num_queries: int, max_rank: int = 50) -> RankMetrics:
    """Exact metrics when only the positives ``table[keep]`` count and every other positive is junk.

    ``keep`` is a (P,) bool mask over the table's rows. A query is evaluated if it keeps at
    least one positive; the rest are skipped. The negatives (and the original junk rule)
    are those of the evaluation that produced ``table``: removing positives moves no
    negative, so each kept positive's rank is its index among the query's kept positives
    + 1 + its ``negatives_before``. The result has no positive table of its own.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(table),):
        raise ValueError(f"subset_metrics: keep must have shape ({len(table)},), got {keep.shape}")
    q, before = table.query[keep], table.negatives_before[keep]
    acc = MetricAccumulator(int(num_queries), max_rank)
    if q.size == 0:
        return acc.result()
    # the table is sorted by (query, negatives before): a subset keeps that order
    start = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    count = np.diff(np.r_[start, q.size])
    local = np.arange(q.size) - np.repeat(start, count)
    rank = local + 1 + before
    prec = (local + 1) / rank
    queries = q[start]
    ap = np.add.reduceat(prec, start) / count
    first = rank[start]
    last = rank[start + count - 1]
    acc.put(queries, ap, count / last, first)
    return acc.result()


def _distmat_tensor(distmat: Any) -> torch.Tensor:
    if isinstance(distmat, torch.Tensor):
        d = distmat.detach()
    else:
        d = torch.from_numpy(np.ascontiguousarray(np.asarray(distmat)))
    if d.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D (queries, gallery) matrix, got shape {tuple(d.shape)}")
    if d.dtype in (torch.float16, torch.bfloat16):
        d = d.float()  # exact widening
    elif not d.is_floating_point():
        if d.dtype == torch.bool or d.is_complex():
            raise ValueError(f"distmat: expected real distances, got dtype {d.dtype}")
        d = d.double()  # exact for |ints| < 2**53
    nan = torch.isnan(d)
    if nan.any():
        q, g = (int(i) for i in nan.nonzero()[0])
        raise ValueError(f"distmat has {int(nan.sum())} NaN entries (first at query {q}, gallery {g})")
    return d


def rank_metrics(distmat: Any, q_ids: Any, g_ids: Any, q_cams: Any = None, g_cams: Any = None, *,
                 remove_junk: bool = True, max_rank: int = 50, row_block: int = 256,
                 keep_positives: bool = False) -> RankMetrics:
    """mAP / CMC / mINP of a dense (Q, G) distance matrix (smaller = more similar).

    distmat: (Q, G) numpy array or torch tensor, any real dtype, no NaN (+-inf allowed)
    q_ids, g_ids: (Q,), (G,) ids (ints or strings); q_cams, g_cams: (Q,), (G,) or None
    remove_junk: drop gallery entries with the query's id and camera (see module doc)
    max_rank: length of the returned CMC curve
    row_block: queries processed together (memory O(row_block * G))
    keep_positives: also return the :class:`PositiveTable` (for :func:`subset_metrics`)

    Exact, with the module's tie rule (negatives before positives on equal distance);
    rows are never sorted, only each query's positives.
    """
    d = _distmat_tensor(distmat)
    nq, ng = d.shape
    qc, gc = encode_ids(q_ids, g_ids, nq, ng)
    cams = encode_cams(q_cams, g_cams, nq, ng) if remove_junk else None
    acc = MetricAccumulator(nq, max_rank, keep_positives)
    if int(row_block) < 1:
        raise ValueError(f"row_block must be >= 1, got {row_block}")
    for r0 in range(0, nq, int(row_block)):
        r1 = min(nq, r0 + int(row_block))
        block = d[r0:r1]
        pos = qc[r0:r1, None] == gc[None, :]
        if cams is not None:
            pos &= ~((cams[0][r0:r1, None] == cams[1][None, :]) & (cams[0][r0:r1, None] >= 0))
        rows, cols = np.nonzero(pos)
        rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(cols)
        ranker = BlockRanker(r1 - r0, rows_t, block[rows_t, cols_t], cols_t if keep_positives else None)
        ranker.add_block(block, qc[r0:r1], gc)
        acc.put(np.arange(r0, r1), *ranker.finalize(), ranker.positives() if keep_positives else None)
    return acc.result()
