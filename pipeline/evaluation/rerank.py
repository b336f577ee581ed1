"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without dense N x N matrices.

With all images ``A = queries + gallery`` (N of them) and the spec's distance ``d``:

1. ``d'(i, j) = d(i, j) / max_k d(i, k)`` (each row scaled by its maximum over A);
   ``N(i, k)`` = the k+1 nearest images of i (i itself included).
2. ``R(i) = {j in N(i, k1) : i in N(j, k1)}``; for each c in R(i) whose half set
   ``R_h(c)`` (same with round(k1/2)) shares more than 2/3 of its members with R(i),
   add R_h(c): the expansion ``E(i)``. ``V[i, j] = exp(-d'(i, j)) / sum_E exp(-d')`` on E(i).
3. Query expansion: ``V_qe[i] = mean of V[j]`` over the k2 nearest j of i.
4. ``t(q, g) = sum_l min(V_qe[q, l], V_qe[g, l])``; Jaccard distance ``1 - t / (2 - t)``.
5. Final ``D = (1 - lambda) * jaccard + lambda * d'``, for queries x gallery only.

How memory stays small: one blockwise pass over A x A (tiled kernel, O(block) memory)
gives every row's maximum and its top-M neighbour list (M >= k1 + 1); V and V_qe are
sparse (CSR, at most ~(k1+1)(k1/2+2) and k2 times that entries per row); the Jaccard
terms of a block of queries come from an inverted index over the gallery rows of V_qe.
The final distance is produced block by block for the streaming evaluator (it is a
distance *provider*), so ranking stays exact and streamed. Distances to expansion
members outside a row's top-M list are computed directly per pair (float64).

Limits: the pass over A x A costs N^2 distance evaluations (minutes for VERI-Wild
large on a CPU). Memory is checked up front against ``memory_limit_bytes`` with a
worst-case estimate; a larger problem raises :class:`ValueError` naming N, the
estimate and the limit (the authors' dense version fails beyond ~20k images).
Ties among equal distances at the k-th neighbour are broken by torch's ``topk``
(deterministic on the same input).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .features import FeatureSet
from .kernel import DEFAULT_TILE, round_up
from .metrics import BlockRanker
from .reference import pair_distance
from .spec import DistanceSpec
from .tiled import TiledProvider

__all__ = ["RerankConfig", "RerankProvider", "rerank_memory_estimate"]


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """k1, k2, lambda of k-reciprocal re-ranking (defaults: the paper's 20, 6, 0.3).

    memory_limit_bytes: refuse problems whose worst-case estimate exceeds this
    top_m: neighbour list length kept per image (None: 2 * (k1 + 1))
    """
    k1: int = 20
    k2: int = 6
    lambda_: float = 0.3
    memory_limit_bytes: int = 4 << 30
    top_m: int | None = None

    def __post_init__(self) -> None:
        if int(self.k1) < 1 or int(self.k2) < 1:
            raise ValueError(f"RerankConfig: k1={self.k1} and k2={self.k2} must be >= 1")
        if int(self.k2) > int(self.k1) + 1:
            raise ValueError(f"RerankConfig: k2={self.k2} must be <= k1 + 1 = {self.k1 + 1}")
        if not 0.0 <= float(self.lambda_) <= 1.0:
            raise ValueError(f"RerankConfig: lambda_={self.lambda_} must be in [0, 1]")

    @property
    def k_half(self) -> int:
        return int(np.around(self.k1 / 2.0))

    @property
    def m(self) -> int:
        return max(int(self.top_m or 2 * (self.k1 + 1)), self.k1 + 1)


def rerank_memory_estimate(n_images: int, cfg: RerankConfig) -> int:
    """Worst-case bytes of the sparse structures for ``n_images`` images (queries + gallery)."""
    e_max = (cfg.k1 + 1) * (cfg.k_half + 2)          # |E(i)| bound
    per_row = cfg.m * 12 + e_max * 16 + cfg.k2 * e_max * 16 * 2   # top-M, V, V_qe (+ index copy)
    return int(n_images) * per_row


class RerankProvider:
    """A :class:`~pipeline.evaluation.provider.DistanceProvider` giving re-ranked distances;
    pass it to the streaming evaluator via ``provider=`` or use ``evaluate(..., rerank=RerankConfig())``.

    Negatives are counted from whole distance blocks (the Jaccard term needs the block).
    """

    def __init__(self, query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec, cfg: RerankConfig, *,
                 q_block: int, g_block: int, matmul_dtype: torch.dtype | None = None,
                 tile: tuple[int, int] = DEFAULT_TILE) -> None:
        self.cfg = cfg
        self.nq, self.ng = len(query), len(gallery)
        n = self.nq + self.ng
        est = rerank_memory_estimate(n, cfg)
        if est > cfg.memory_limit_bytes:
            raise ValueError(
                f"k-reciprocal re-ranking of N={n} images ({self.nq} queries + {self.ng} gallery) with "
                f"k1={cfg.k1}, k2={cfg.k2} may need up to {est / 2**30:.2f} GiB for its neighbour lists and "
                f"sparse weights, above the limit of {cfg.memory_limit_bytes / 2**30:.2f} GiB "
                f"(RerankConfig.memory_limit_bytes); raise the limit or evaluate without re-ranking")
        self.all = FeatureSet.concat([query, gallery])
        self.spec = spec
        self.base = TiledProvider(self.all, self.all, spec, q_block=q_block, g_block=g_block,
                                  matmul_dtype=matmul_dtype, tile=tile)
        self.q_block, self.g_block = self.base.q_block, self.base.g_block
        self.tm, self.tn = self.base.tm, self.base.tn
        self._buf = torch.empty(0)

    @property
    def flops(self) -> int:
        return self.base.flops

    @property
    def counting_seconds(self) -> float:
        return 0.0   # counting is not fused: it is ranking time in the evaluator's own measure

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        self.base.start()
        self._buf = torch.empty(self.base._buf.numel())
        self._neighbours()
        self._weights()
        self._query_expansion()

    def close(self) -> None:
        self.base.close()
        self._buf = torch.empty(0)

    def _neighbours(self) -> None:
        """Row maxima and sorted top-M lists over all N x N distances, block by block."""
        n, m = self.nq + self.ng, self.cfg.m
        m = min(m, n)
        self.base.set_gallery_order(np.arange(n))
        self.dmax = np.zeros(n, dtype=np.float32)
        self.top_i = np.zeros((n, m), dtype=np.int64)
        self.top_d = np.zeros((n, m), dtype=np.float32)
        for r0 in range(0, n, self.q_block):
            r1 = min(n, r0 + self.q_block)
            qh = self.base.queries(torch.arange(r0, r1))
            best_d = best_i = None
            rmax = torch.full((r1 - r0,), -np.inf)
            for c0 in range(0, n, self.g_block):
                c1 = min(n, c0 + self.g_block)
                d = self.base.distances(qh, self.base.gallery(c0, c1), 0, c1 - c0)
                rmax = torch.maximum(rmax, d.amax(1))
                k = min(m, c1 - c0)
                vals, idx = torch.topk(d, k, dim=1, largest=False, sorted=False)
                idx = idx + c0
                if best_d is not None:
                    vals, idx = torch.cat([best_d, vals], 1), torch.cat([best_i, idx], 1)
                    vals, pick = torch.topk(vals, m, dim=1, largest=False, sorted=False)
                    idx = torch.gather(idx, 1, pick)
                best_d, best_i = vals, idx
            # sort each list by (distance, index) so ties are ordered deterministically
            order = torch.argsort(best_i, dim=1)
            best_i, best_d = torch.gather(best_i, 1, order), torch.gather(best_d, 1, order)
            order = torch.sort(best_d, dim=1, stable=True).indices
            self.top_i[r0:r1] = torch.gather(best_i, 1, order).numpy()
            self.top_d[r0:r1] = torch.gather(best_d, 1, order).numpy()
            self.dmax[r0:r1] = rmax.numpy()
        self._scale = np.where(self.dmax > 0, self.dmax, 1.0).astype(np.float32)

    def _reciprocal(self, k: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows), k+1) mask: top_i[i, t] is a k-reciprocal neighbour of i."""
        fwd = self.top_i[rows, :k + 1]
        back = self.top_i[fwd, :k + 1]                      # (n, k+1, k+1)
        return (back == rows[:, None, None]).any(-1)

    def _dnorm(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """d'(rows[a], cols[a, b]) from the top-M lists, computed per pair where missing."""
        hit = self.top_i[rows][:, None, :] == cols[:, :, None]             # (n, E, M)
        found = hit.any(-1)
        out = np.take_along_axis(self.top_d[rows], hit.argmax(-1), axis=1).astype(np.float64)
        miss = ~found & (cols >= 0)
        if miss.any():
            a, b = np.nonzero(miss)
            out[a, b] = pair_distance(self.all, rows[a], self.all, cols[a, b], self.spec)
        return out / self._scale[rows][:, None]

    def _weights(self, rows_per_step: int = 512) -> None:
        """Sparse V (CSR): k-reciprocal expansion sets with exp(-d') weights."""
        cfg, n = self.cfg, self.nq + self.ng
        k1, kh = min(cfg.k1, n - 1), min(cfg.k_half, n - 1)
        indptr, indices, data = [np.zeros(1, np.int64)], [], []
        for r0 in range(0, n, rows_per_step):
            rows = np.arange(r0, min(n, r0 + rows_per_step))
            fwd = self.top_i[rows, :k1 + 1]                                    # (b, k1+1)
            in_r = self._reciprocal(k1, rows)                                  # R(i) mask
            half = self.top_i[fwd, :kh + 1]                                    # (b, k1+1, kh+1): N(c, kh)
            half_ok = (self.top_i[half, :kh + 1] == fwd[:, :, None, None]).any(-1)   # R_h(c) mask
            # |R_h(c) & R(i)| > 2/3 |R_h(c)|, for c in R(i)
            member = ((half[..., None] == fwd[:, None, None, :]) & in_r[:, None, None, :]).any(-1)
            inter = (half_ok & member).sum(-1)
            size = half_ok.sum(-1)
            take = in_r & (inter > 2.0 / 3.0 * size)
            cand = np.concatenate([np.where(in_r, fwd, -1),
                                   np.where(take[:, :, None] & half_ok, half, -1).reshape(len(rows), -1)], 1)
            cand.sort(axis=1)
            cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1                      # drop duplicates
            cand.sort(axis=1)
            dn = self._dnorm(rows, cand)
            w = np.where(cand >= 0, np.exp(-dn), 0.0)
            total = w.sum(1, keepdims=True)
            w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
            valid = cand >= 0
            indices.append(cand[valid])
            data.append(w[valid])
            indptr.append(indptr[-1][-1] + np.cumsum(valid.sum(1)))
        self.v_indptr = np.concatenate(indptr)
        self.v_indices = np.concatenate(indices)
        self.v_data = np.concatenate(data)

    def _query_expansion(self, rows_per_step: int = 512) -> None:
        """V_qe (CSR) = mean of V over each image's k2 nearest images."""
        n, k2 = self.nq + self.ng, min(self.cfg.k2, self.top_i.shape[1])
        if k2 == 1:
            self.qe_indptr, self.qe_indices, self.qe_data = self.v_indptr, self.v_indices, self.v_data
            return
        indptr, indices, data = [np.zeros(1, np.int64)], [], []
        for r0 in range(0, n, rows_per_step):
            rows = np.arange(r0, min(n, r0 + rows_per_step))
            src = self.top_i[rows, :k2].reshape(-1)                 # V rows to average
            owner = np.repeat(rows - r0, k2)
            start, stop = self.v_indptr[src], self.v_indptr[src + 1]
            lens = stop - start
            pos = np.repeat(start - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
            key = np.repeat(owner, lens) * n + self.v_indices[pos]
            ukey, inv = np.unique(key, return_inverse=True)
            vals = np.bincount(inv.reshape(-1), weights=self.v_data[pos]) / k2
            r_local = ukey // n
            indices.append(ukey % n)
            data.append(vals)
            indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(r_local, minlength=len(rows))))
        self.qe_indptr = np.concatenate(indptr)
        self.qe_indices = np.concatenate(indices)
        self.qe_data = np.concatenate(data)

    # ------------------------------------------------------------------ provider protocol
    def set_gallery_order(self, perm: np.ndarray) -> None:
        """Requests come by position in ``perm``; build the gallery inverted index in that order."""
        perm = np.asarray(perm, dtype=np.int64)
        self.base.set_gallery_order(np.concatenate([self.nq + perm, np.arange(self.nq)]))
        pos_of = np.empty(self.ng, dtype=np.int64)
        pos_of[perm] = np.arange(self.ng)
        # inverted index over V_qe's gallery rows: for each column l, (gallery position, value)
        g0 = self.qe_indptr[self.nq]
        cols = self.qe_indices[g0:]
        rows = np.repeat(np.arange(self.ng), np.diff(self.qe_indptr[self.nq:]))
        order = np.lexsort((pos_of[rows], cols))
        n = self.nq + self.ng
        self.inv_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=n))])
        self.inv_pos = pos_of[rows][order]
        self.inv_val = self.qe_data[g0:][order]

    def queries(self, rows: torch.Tensor) -> dict[str, Any]:
        """Base layout plus the block's Jaccard overlaps t(q, g), sorted by gallery position."""
        r = rows.numpy().astype(np.int64)
        start, stop = self.qe_indptr[r], self.qe_indptr[r + 1]
        lens = stop - start
        pos = np.repeat(start - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        owner = np.repeat(np.arange(len(r)), lens)
        col, a = self.qe_indices[pos], self.qe_data[pos]
        c0, c1 = self.inv_ptr[col], self.inv_ptr[col + 1]
        clen = c1 - c0
        ipos = np.repeat(c0 - np.cumsum(clen) + clen, clen) + np.arange(clen.sum())
        key = self.inv_pos[ipos] * len(r) + np.repeat(owner, clen)
        val = np.minimum(np.repeat(a, clen), self.inv_val[ipos])
        ukey, inv = np.unique(key, return_inverse=True)
        t = np.bincount(inv.reshape(-1), weights=val)
        return {"rows": r, "base": self.base.queries(rows), "t_pos": ukey // len(r), "t_row": ukey % len(r),
                "t": t, "scale": torch.from_numpy(self._scale[r])}

    def gallery(self, s: int, e: int) -> dict[str, Any]:
        return {"s": s, "e": e, "base": self.base.gallery(s, e)}

    def range_buffer(self, qh: dict[str, Any], width: int) -> torch.Tensor:
        return torch.empty(qh["base"].n_pad * round_up(width, self.tn))

    def count(self, qh: dict[str, Any], gh: dict[str, Any], c0: int, c1: int, ranker: BlockRanker,
              q_codes: np.ndarray | None = None, g_codes: np.ndarray | None = None) -> None:
        ranker.add_block(self.distances(qh, gh, c0, c1), q_codes, g_codes)

    def count_stored(self, d: torch.Tensor, ranker: BlockRanker, q_codes: np.ndarray,
                     g_codes: np.ndarray) -> None:
        ranker.add_block(d, q_codes, g_codes)

    def distances(self, qh: dict[str, Any], gh: dict[str, Any], c0: int, c1: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        d = self.base.distances(qh["base"], gh["base"], c0, c1)
        n, w = d.shape
        out = (self._buf if out is None else out)[:n * w].view(n, w)
        lam = float(self.cfg.lambda_)
        torch.div(d, qh["scale"][:, None], out=out)
        out.mul_(lam)
        a, b = np.searchsorted(qh["t_pos"], [gh["s"] + c0, gh["s"] + c1])
        t = torch.zeros(n, w, dtype=torch.float64)
        t[torch.from_numpy(qh["t_row"][a:b]), torch.from_numpy(qh["t_pos"][a:b] - gh["s"] - c0)] = \
            torch.from_numpy(qh["t"][a:b])
        jac = 1.0 - t / (2.0 - t)
        out.add_(((1.0 - lam) * jac).float())
        return out
