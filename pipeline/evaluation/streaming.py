"""Streaming ReID evaluation: distances block by block, never the full (Q, G) matrix.

:class:`StreamingEvaluator` ranks a gallery for every query with the distance of a
:class:`~pipeline.evaluation.spec.DistanceSpec` (``global``, ``local``, ``pven``;
``paper`` or ``official``) and returns exactly the :class:`RankMetrics` that
:func:`~pipeline.evaluation.metrics.rank_metrics` gives on the dense matrix of
:func:`~pipeline.evaluation.dense.pven_distance` (same spec, tile and matmul dtype):
both rank bitwise-identical distance values with the same counting code.

Memory: O(q_block x g_block) distances (plus at most ``range_cap`` columns for the
block's own ids, see below), the kernel's scratch, the queries and one gallery chunk
in GEMM layout (or the whole gallery's layout, built once, when it fits in the
provider's ``cache_bytes``, 1.5 GiB by default), and per-query state (the positive
distances). Nothing of size Q x G is ever held.

How one pass suffices. Ranks need each query's positive distances before its
negatives can be counted. The gallery is visited in id order (a permutation; with
the tie rule results do not depend on gallery order), so the gallery images with the
ids of a block of id-sorted queries form one contiguous *range*. Per query block:

1. compute the range's distances (all positives and junk are there), extract the
   positives, build a :class:`~pipeline.evaluation.metrics.BlockRanker`, and count the
   range's negatives (other ids) from the same distances (kept if the range is at
   most ``range_cap`` columns wide, recomputed otherwise);
2. stream the rest of the gallery once, in ``g_block`` chunks met by every query
   block: all negatives, counted tile by tile on the kernel's worker threads while the
   tile is in cache (:class:`~pipeline.evaluation.metrics.TileCounter`): one
   comparison against each query's largest positive distance plus a ``searchsorted``
   of the few survivors among the positives.

Queries whose id has no gallery image are skipped without computing anything.
With ``keep_positives=True`` the result also carries the
:class:`~pipeline.evaluation.metrics.PositiveTable` (every positive's query, gallery
index and negatives ranked before it: O(#positives) more memory), from which
:func:`~pipeline.evaluation.metrics.subset_metrics` scores positive subsets exactly.
Optional ``matmul_dtype=torch.bfloat16`` runs the GEMMs' cross terms in bfloat16
(faster on CPUs with AVX512-BF16/AMX; distances change by ~1e-2, so metrics may too).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .features import FeatureSet
from .kernel import DEFAULT_TILE, round_up
from .metrics import BlockRanker, MetricAccumulator, RankMetrics, encode_cams, encode_ids
from .provider import DistanceProvider
from .rerank import RerankConfig, RerankProvider
from .spec import DistanceSpec
from .tiled import TiledProvider

__all__ = ["StreamingEvaluator", "evaluate"]


class _QueryBlock:
    """State of one block of id-sorted queries: rows, layout, id range, ranker."""

    def __init__(self, rows: np.ndarray, codes: np.ndarray, cams: np.ndarray | None, handle: Any,
                 span: tuple[int, int]) -> None:
        self.rows, self.codes, self.cams, self.handle, self.span = rows, codes, cams, handle, span
        self.ranker: BlockRanker | None = None


class StreamingEvaluator:
    """Exact ReID metrics of ``query`` against ``gallery`` with O(q_block x g_block) memory.

    query, gallery: :class:`FeatureSet` (ids, cams, features for the spec's mode)
    spec:           distance (mode/variant/lam), see :class:`DistanceSpec`
    remove_junk:    drop same-id same-camera gallery images (unknown cameras never junk)
    max_rank:       CMC length
    q_block, g_block: queries / gallery images per block (rounded up to tile multiples)
    range_cap:      widest id range (columns) kept in memory for a query block; wider
                    ranges are computed twice instead (default 2 x g_block)
    matmul_dtype:   None (float32) or torch.bfloat16 for the GEMMs' cross terms
    tile:           GEMM tile shape (same tile => bitwise-same distances as pven_distance);
                    None: ``DEFAULT_TILE`` on the CPU, ``CUDA_TILE`` on a GPU
    device:         where the GEMMs run (None: the CPU); see :class:`TiledProvider`
    rerank:         optional :class:`~pipeline.evaluation.rerank.RerankConfig`: rank by
                    k-reciprocal re-ranked distances (still streamed and exact)
    provider:       optional distance provider replacing the tiled kernel
    keep_positives: also return the per-positive table (``RankMetrics.positives``)

    The query layouts of all blocks are kept (Q x (feature dims + 10) floats); the
    gallery is streamed once in g_block chunks, each laid out once. While it runs,
    torch ops are single-threaded and the tile kernel uses one thread per former torch
    thread (see :func:`pipeline.threads.kernel_threads`).

    After :meth:`run`, ``stats`` holds: seconds in distance computation and in ranking
    (the counting done on the kernel workers, fused with the distances, is measured
    there and counted as ranking), GEMM flops, blocks, candidate negatives counted,
    ranges recomputed.
    """

    def __init__(self, query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(), *,
                 remove_junk: bool = True, max_rank: int = 50, q_block: int = 1024, g_block: int = 8192,
                 range_cap: int | None = None, matmul_dtype: torch.dtype | None = None,
                 tile: tuple[int, int] | None = None, rerank: RerankConfig | None = None,
                 provider: DistanceProvider | None = None, keep_positives: bool = False,
                 device: torch.device | str | None = None) -> None:
        self.query, self.gallery, self.spec = query, gallery, spec
        self.keep_positives = bool(keep_positives)
        self.remove_junk, self.max_rank = bool(remove_junk), int(max_rank)
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if provider is None and rerank is not None:
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError(f"device={device!r}: re-ranking runs on the CPU only")
            provider = RerankProvider(query, gallery, spec, rerank, q_block=q_block, g_block=g_block,
                                      matmul_dtype=matmul_dtype, tile=tile or DEFAULT_TILE)
        self.provider: DistanceProvider = provider if provider is not None else TiledProvider(
            query, gallery, spec, q_block=q_block, g_block=g_block, matmul_dtype=matmul_dtype, tile=tile,
            device=device)
        self.q_block, self.g_block = self.provider.q_block, self.provider.g_block
        self.tn = self.provider.tn
        self.range_cap = int(range_cap) if range_cap is not None else 2 * self.g_block
        self.stats: dict[str, float] = {}

    def run(self) -> RankMetrics:
        self.provider.start()
        try:
            return self._run()
        finally:
            self.provider.close()

    def _run(self) -> RankMetrics:
        nq, ng = len(self.query), len(self.gallery)
        t_start = time.perf_counter()
        self._t_dist = 0.0
        self._t_fused = 0.0
        self._n_blocks = 0
        counting0 = self.provider.counting_seconds
        qcode, gcode = encode_ids(self.query.ids, self.gallery.ids, nq, ng)
        cams = encode_cams(self.query.cams, self.gallery.cams, nq, ng) if self.remove_junk else None
        acc = MetricAccumulator(nq, self.max_rank, self.keep_positives)

        g_perm = np.argsort(gcode, kind="stable")
        self._g_perm = g_perm
        gcode_s = gcode[g_perm]
        self._gcode_s = gcode_s
        self._gcam_s = cams[1][g_perm] if cams is not None else None
        t0 = time.perf_counter()
        self.provider.set_gallery_order(g_perm)
        self._t_dist += time.perf_counter() - t0
        # where each id's images start / end in the id-sorted gallery
        n_codes = int(max(qcode.max(initial=-1), gcode.max(initial=-1))) + 1
        code_start = np.searchsorted(gcode_s, np.arange(n_codes), "left")
        code_end = np.searchsorted(gcode_s, np.arange(n_codes), "right")
        self._code_start, self._code_end = code_start, code_end
        q_rows = np.nonzero(code_end[qcode] > code_start[qcode])[0] if nq else np.zeros(0, np.int64)
        q_rows = q_rows[np.argsort(qcode[q_rows], kind="stable")]

        blocks: list[_QueryBlock] = []
        n_recomputed = 0
        for b0 in range(0, len(q_rows), self.q_block):
            rows = q_rows[b0:b0 + self.q_block]
            t0 = time.perf_counter()
            handle = self.provider.queries(torch.from_numpy(rows))
            self._t_dist += time.perf_counter() - t0
            lo, hi = int(code_start[qcode[rows[0]]]), int(code_end[qcode[rows[-1]]])
            span = ((lo // self.tn) * self.tn, min(ng, round_up(hi, self.tn)))
            blk = _QueryBlock(rows, qcode[rows], cams[0][rows] if cams is not None else None, handle, span)
            n_recomputed += self._rank_range(blk)
            if bool(blk.ranker.has_positive.any()):
                blocks.append(blk)
            else:                                   # every query of the block is junk-only
                acc.put(rows, *self._finalize(blk.ranker))

        # Stream the gallery once; each chunk is laid out once and met by every block,
        # skipping the columns of the block's own id range (counted above).
        for c0 in range(0, ng, self.g_block):
            c1 = min(ng, c0 + self.g_block)
            gh = None
            for blk in blocks:
                rs, re = blk.span
                for a, b in ((c0, min(c1, rs)), (max(c0, re), c1)):
                    if a >= b:
                        continue
                    if gh is None:
                        t0 = time.perf_counter()
                        gh = self.provider.gallery(c0, c1)
                        self._t_dist += time.perf_counter() - t0
                    self._count(blk, gh, a - c0, b - c0)
        n_cand = 0
        for blk in blocks:
            acc.put(blk.rows, *self._finalize(blk.ranker))
            n_cand += blk.ranker.num_candidates
        t_all = time.perf_counter() - t_start
        # counting fused into the distance workers is ranking work: move its share over
        counting = self.provider.counting_seconds - counting0
        self.stats = {"seconds_total": t_all, "seconds_distance": self._t_dist - counting,
                      "seconds_ranking": t_all - self._t_dist + counting, "seconds_fused": self._t_fused,
                      "seconds_counting_on_workers": counting,
                      "gemm_flops": float(self.provider.flops), "blocks": self._n_blocks,
                      "candidates": n_cand, "ranges_recomputed": n_recomputed,
                      "queries_without_gallery_id": int(nq - len(q_rows))}
        return acc.result()

    def _finalize(self, ranker: BlockRanker) -> tuple:
        """The ranker's per-row metrics, plus its positives when they are kept."""
        return (*ranker.finalize(), ranker.positives() if self.keep_positives else None)

    def _count(self, blk: _QueryBlock, gh: Any, c0: int, c1: int) -> None:
        """Negatives of gallery rows c0:c1 (all other ids) for the block's queries."""
        t0 = time.perf_counter()
        self.provider.count(blk.handle, gh, c0, c1, blk.ranker)   # distances and counting in one call
        self._t_dist += time.perf_counter() - t0
        self._t_fused += time.perf_counter() - t0
        self._n_blocks += 1

    def _rank_range(self, blk: _QueryBlock) -> int:
        """Positives from the block's id range, its ranker, and the range's negatives.

        Returns 1 if the range was too wide to keep and had to be computed twice.
        """
        rs, re = blk.span
        keep = re - rs <= self.range_cap
        kept: list[tuple[int, int, torch.Tensor]] = []
        # The gallery is id-sorted, so each query's same-id images are one interval of
        # positions: list the (row, position) pairs once, drop junk, read their distances.
        lo, hi = self._code_start[blk.codes], self._code_end[blk.codes]
        lens = hi - lo
        p_row = np.repeat(np.arange(len(blk.rows)), lens)
        p_pos = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        if blk.cams is not None:
            qc = blk.cams[p_row]
            keep_pos = ~((qc == self._gcam_s[p_pos]) & (qc >= 0))
            p_row, p_pos = p_row[keep_pos], p_pos[keep_pos]
        pos_rows, pos_vals, pos_cols = [], [], []
        for s in range(rs, re, self.g_block):
            e = min(re, s + self.g_block)
            t0 = time.perf_counter()
            gh = self.provider.gallery(s, e)
            self._t_dist += time.perf_counter() - t0
            out = self.provider.range_buffer(blk.handle, e - s) if keep else None
            t0 = time.perf_counter()
            d = self.provider.distances(blk.handle, gh, 0, e - s, out)
            self._t_dist += time.perf_counter() - t0
            self._n_blocks += 1
            sel = (p_pos >= s) & (p_pos < e)
            r, c = torch.from_numpy(p_row[sel]), torch.from_numpy(p_pos[sel] - s)
            pos_rows.append(r)
            pos_vals.append(d[r.to(d.device), c.to(d.device)].cpu())
            if self.keep_positives:                 # original gallery indices
                pos_cols.append(torch.from_numpy(self._g_perm[p_pos[sel]]))
            if keep:
                kept.append((s, e, d))
        blk.ranker = BlockRanker(len(blk.rows), torch.cat(pos_rows), torch.cat(pos_vals),
                                 torch.cat(pos_cols) if self.keep_positives else None)
        if not bool(blk.ranker.has_positive.any()):
            return 0
        if keep:
            for s, e, d in kept:
                self.provider.count_stored(d, blk.ranker, blk.codes, self._gcode_s[s:e])
            return 0
        for s in range(rs, re, self.g_block):
            e = min(re, s + self.g_block)
            gh = self.provider.gallery(s, e)
            t0 = time.perf_counter()
            self.provider.count(blk.handle, gh, 0, e - s, blk.ranker, blk.codes, self._gcode_s[s:e])
            self._t_dist += time.perf_counter() - t0
            self._n_blocks += 1
        return 1


def evaluate(query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(), **kwargs: Any) -> RankMetrics:
    """Exact metrics by streaming (see :class:`StreamingEvaluator` for the keyword arguments)."""
    return StreamingEvaluator(query, gallery, spec, **kwargs).run()
