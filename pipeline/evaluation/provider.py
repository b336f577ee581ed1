"""The interface between the streaming evaluator and whatever computes distances.

:class:`~pipeline.evaluation.streaming.StreamingEvaluator` asks a provider for
distance blocks and for negative counts; two implement it: the exact tiled kernel
(:class:`~pipeline.evaluation.tiled.TiledProvider`, counting fused into the kernel's
workers) and k-reciprocal re-ranking
(:class:`~pipeline.evaluation.rerank.RerankProvider`, distances block by block).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from .metrics import BlockRanker

__all__ = ["DistanceProvider"]


class DistanceProvider(Protocol):
    """What the evaluator calls, in this order: ``start``, ``set_gallery_order``, then
    ``queries`` / ``gallery`` handles and ``distances`` / ``count`` on them, ``close``.

    q_block, g_block: rows per query / gallery handle (tile multiples); tn: gallery
    tile width (block boundaries are multiples of it); flops: GEMM flops so far;
    counting_seconds: wall time spent counting inside :meth:`count` (ranking work).
    """
    q_block: int
    g_block: int
    tn: int

    @property
    def flops(self) -> int: ...

    @property
    def counting_seconds(self) -> float: ...

    def start(self) -> None:
        """Acquire threads and buffers for one run."""

    def close(self) -> None:
        """Release what :meth:`start` acquired."""

    def set_gallery_order(self, perm: np.ndarray) -> None:
        """Gallery rows will be requested by position in ``perm`` (the evaluator's id order)."""

    def queries(self, rows: torch.Tensor) -> Any:
        """A handle on query rows ``rows`` (original indices, at most ``q_block``)."""

    def gallery(self, s: int, e: int) -> Any:
        """A handle on the gallery rows at positions ``s:e`` of the order (``s`` a tile multiple)."""

    def distances(self, q: Any, g: Any, c0: int, c1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n_queries, c1 - c0) distances to the handle's rows ``c0:c1`` (``c0`` a tile multiple).

        Into ``out`` (from :meth:`range_buffer`) if given, else a view of a reused
        buffer: copy it to keep it.
        """

    def range_buffer(self, q: Any, width: int) -> torch.Tensor:
        """A fresh buffer for ``distances(out=...)`` of ``width`` gallery rows."""

    def count(self, q: Any, g: Any, c0: int, c1: int, ranker: BlockRanker,
              q_codes: np.ndarray | None = None, g_codes: np.ndarray | None = None) -> None:
        """Count gallery rows ``c0:c1`` of ``g`` as negatives for ``ranker``'s queries (same-code
        entries, i.e. positives and junk, left out when codes are given)."""

    def count_stored(self, d: torch.Tensor, ranker: BlockRanker, q_codes: np.ndarray,
                     g_codes: np.ndarray) -> None:
        """Count the negatives of a stored distance block ``d`` (n, w)."""
