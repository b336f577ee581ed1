"""The default distance provider: the exact tiled GEMM kernel, with negative counting fused into it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.constants import NUM_PARTS
from pipeline.threads import kernel_threads

from .features import FeatureSet
from .kernel import CUDA_TILE, DEFAULT_TILE, BlockKernel, Chunk, PreparedSet, check_tile, round_up
from .metrics import BlockRanker, TileCounter
from .spec import DistanceSpec

__all__ = ["TiledProvider"]


class TiledProvider:
    """Distances of ``spec`` with the tiled GEMM kernel: the default
    :class:`~pipeline.evaluation.provider.DistanceProvider`.

    Counting is fused: :meth:`count` filters each tile on the kernel worker that
    computed it. ``cache_bytes``: the gallery's GEMM layout is built once if it fits
    (else per chunk, twice per row).

    ``device``: where the GEMMs run. Per-set constants are always computed on the CPU
    (reproducible norms); on CUDA the laid-out chunks are copied there, tiles are
    ``CUDA_TILE`` unless ``tile`` is given, and only each tile's candidate negatives
    come back to the CPU for counting. GPU GEMMs round differently from the CPU's, so
    metrics agree with a CPU run to float precision, not bitwise.
    """

    def __init__(self, query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec, *, q_block: int,
                 g_block: int, matmul_dtype: torch.dtype | None = None,
                 tile: tuple[int, int] | None = None, cache_bytes: int = 3 << 29,
                 device: torch.device | str | None = None) -> None:
        self.device = _resolve(device)
        if tile is None:
            tile = CUDA_TILE if self.device.type == "cuda" else DEFAULT_TILE
        self.spec, self.tile, self.bf16 = spec, tuple(tile), matmul_dtype == torch.bfloat16
        self.cache_bytes = int(cache_bytes)
        self._cache: Chunk | None = None
        self.tm, self.tn = check_tile(tile)
        self.qs = PreparedSet(query, spec, matmul_dtype)
        self.gs = PreparedSet(gallery, spec, matmul_dtype)
        self.q_block = round_up(max(1, int(q_block)), self.tm)
        self.g_block = round_up(max(1, int(g_block)), self.tn)
        k = 0
        if spec.uses_global:
            k += self.qs.g.shape[1] + 2
        if spec.uses_local:
            k += NUM_PARTS * (self.qs.p.shape[2] + 2) + NUM_PARTS
        self.flops_per_pair = 2 * k   # all GEMMs, per (padded) query-gallery pair
        self.flops = 0
        self.counting_seconds = 0.0   # wall-time share of negative counting done on the workers
        self.kernel: BlockKernel | None = None
        self._buf = torch.empty(0)
        self._threads: Any = None

    def start(self) -> None:
        self._threads = kernel_threads()
        workers = self._threads.__enter__()
        self.kernel = BlockKernel(self.spec, self.tile, bf16=self.bf16, workers=workers, device=self.device)
        self._buf = torch.empty(min(self.q_block, round_up(max(self.qs.n, 1), self.tm))
                                * min(self.g_block, round_up(max(self.gs.n, 1), self.tn)), device=self.device)

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if self._threads is not None:
            self._threads.__exit__(None, None, None)
            self._threads = None
        self._buf = torch.empty(0)
        self._cache = None

    def queries(self, rows: torch.Tensor) -> Chunk:
        n = int(rows.numel())
        if n > self.q_block:
            raise ValueError(f"{n} queries exceed q_block={self.q_block}")
        return self.qs.chunk(rows, "query", round_up(n, self.tm), pool=self.kernel.pool()).to(self.device)

    def set_gallery_order(self, perm: np.ndarray) -> None:
        """Gallery rows will be requested by position in ``perm`` order (the evaluator's id order).

        If the whole gallery's GEMM layout fits in ``cache_bytes`` it is built once here
        and :meth:`gallery` returns views of it; otherwise each request lays out its rows.
        """
        self._perm = torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64))
        self._identity = bool(np.array_equal(perm, np.arange(len(perm))))
        self._cache = None
        if self.gs.layout_bytes(round_up(self.gs.n, self.tn)) <= self.cache_bytes:
            self._cache = self.gs.chunk(self._index(0, self.gs.n), "gallery",
                                        round_up(self.gs.n, self.tn), pool=self.kernel.pool()).to(self.device)

    def _index(self, s: int, e: int) -> torch.Tensor | slice:
        return slice(s, e) if self._identity else self._perm[s:e]

    def gallery(self, s: int, e: int) -> Chunk:
        """Layout of the gallery rows at positions ``s:e`` of the order (``s`` a tile multiple)."""
        if self._cache is not None:
            sub = self._cache.rows(s, round_up(e, self.tn))
            sub.n = e - s
            return sub
        return self.gs.chunk(self._index(s, e), "gallery", round_up(e - s, self.tn),
                             pool=self.kernel.pool()).to(self.device)

    def count(self, q: Chunk, g: Chunk, c0: int, c1: int, ranker: BlockRanker,
              q_codes: np.ndarray | None = None, g_codes: np.ndarray | None = None) -> None:
        """Count gallery rows ``c0:c1`` of ``g`` as negatives for ``ranker``'s queries.

        Fused: each tile is filtered against the queries' farthest positives by the
        worker that computed it, while it is in cache; no (n, c1 - c0) block is stored.
        With codes, same-code entries (positives, junk) are left out.
        """
        sub = g.rows(c0, round_up(c1, self.tn))
        counter = TileCounter(ranker, self.kernel.workers, c1 - c0, q_codes, g_codes, self.device)
        self.kernel.block(q, sub, None, counter)
        self.flops += self.flops_per_pair * q.n_pad * sub.n_pad
        counter.flush()
        self.counting_seconds += sum(counter.seconds) / self.kernel.workers

    def count_stored(self, d: torch.Tensor, ranker: BlockRanker, q_codes: np.ndarray,
                     g_codes: np.ndarray) -> None:
        """Count the negatives of a stored distance block ``d`` (n, w), tile by tile on the workers."""
        counter = TileCounter(ranker, self.kernel.workers, d.shape[1], q_codes, g_codes, self.device)
        tiles = [(i0, j0) for j0 in range(0, d.shape[1], self.tn) for i0 in range(0, d.shape[0], self.tm)]

        def work(w: int) -> None:
            for i0, j0 in tiles[w::self.kernel.workers]:
                counter(w, i0, j0, d[i0:i0 + self.tm, j0:j0 + self.tn])
        pool = self.kernel.pool()
        if pool is None:
            work(0)
        else:
            for f in [pool.submit(work, w) for w in range(self.kernel.workers)]:
                f.result()
        counter.flush()

    def distances(self, q: Chunk, g: Chunk, c0: int, c1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(q.n, c1 - c0) distances; into ``out`` (>= q.n_pad x padded width elements, e.g.
        from :meth:`range_buffer`) if given, else into the reused buffer."""
        sub = g.rows(c0, round_up(c1, self.tn))
        need = q.n_pad * sub.n_pad
        if out is None:
            if need > self._buf.numel():
                raise ValueError(f"block {q.n_pad}x{sub.n_pad} exceeds q_block x g_block")
            out = self._buf
        view = out[:need].view(q.n_pad, sub.n_pad)
        self.kernel.block(q, sub, view)
        self.flops += self.flops_per_pair * need
        return view[:q.n, :c1 - c0]

    def range_buffer(self, q: Chunk, width: int) -> torch.Tensor:
        """A fresh buffer for ``distances(out=...)`` of ``width`` gallery rows."""
        return torch.empty(q.n_pad * round_up(width, self.tn), device=self.device)


def _resolve(device: torch.device | str | None) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:<current>``), so that devices compare equal."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device={str(device)!r}: expected cpu or cuda")
    return device


