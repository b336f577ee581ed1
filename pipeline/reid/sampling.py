"""Identity-balanced P x K batches cut from a sample stream (a ``batch_fn`` for ``TrainStream``).

Batch-hard triplet losses need every batch to hold P identities with K images each.
:class:`PKBatcher` keeps a buffer per identity while the (already shuffled) shard
stream flows by; as soon as P identities have K samples buffered, it draws P of them
at random, K samples from each, and yields the batch (transformed, e.g. decoded and
augmented, only then: buffers hold encoded samples, a few KB each).

Memory is bounded by ``max_buffered`` samples. If the buffer is full before P
identities are complete (data with many identities of few images, e.g. VERI-Wild),
the P identities with the most buffered samples are used, their samples drawn with
replacement up to K (a repeated image gets its own augmentation); if fewer than P
identities are buffered, the oldest sample is dropped and reading goes on.

Randomness: one ``numpy`` Generator per pass over the stream, seeded from ``seed``,
the loader worker and the first sample's key. The stream itself is a pure function
of (seed, epoch, rank, worker) (see ``TrainStream``), so batches and augmentations
are reproducible, which is what makes a resumed run identical to an uninterrupted one.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


def _worker() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class PKBatcher:
    """``batch_fn``: iterator of samples with a ``vid`` -> iterator of lists of P*K transformed samples.

    ``transform(sample, rng)`` is applied to each chosen sample (default: identity).
    """

    def __init__(self, P: int, K: int, seed: int,
                 transform: Callable[[dict, np.random.Generator], Any] | None = None,
                 max_buffered: int = 2048):
        if P < 2 or K < 2:
            raise ValueError(f"P x K batches need P >= 2 and K >= 2, got P={P}, K={K}")
        if max_buffered < P * K:
            raise ValueError(f"max_buffered={max_buffered} must hold at least one batch (P*K={P * K})")
        self.P, self.K, self.seed = P, K, seed
        self.transform = transform
        self.max_buffered = max_buffered

    def __call__(self, src: Iterator[dict]) -> Iterator[list]:
        P, K = self.P, self.K
        buffers: OrderedDict[int, list] = OrderedDict()  # vid -> [(arrival number, sample)]
        ready: dict[int, None] = {}  # vids with >= K samples, insertion-ordered
        total = 0
        rng = None
        for arrival, sample in enumerate(src):
            if rng is None:
                key_hash = zlib.crc32(str(sample.get("__key__", sample.get("key", ""))).encode())
                rng = np.random.default_rng([self.seed, _worker(), key_hash])
            vid = sample["vid"]
            buffers.setdefault(vid, []).append((arrival, sample))
            total += 1
            if len(buffers[vid]) >= K:
                ready[vid] = None
            if len(ready) >= P:
                candidates = list(ready)
                vids = [candidates[i] for i in sorted(rng.choice(len(candidates), P, replace=False))]
                picked = [s for v in vids for s in self._take(buffers, ready, v, rng)]
                total -= len(picked)
                yield self._finish(picked, rng)
            elif total >= self.max_buffered:
                if len(buffers) >= P:
                    # Fullest identities first (ties: oldest first, as buffers is ordered).
                    vids = sorted(buffers, key=lambda v: -len(buffers[v]))[:P]
                    picked = [s for v in vids for s in self._take(buffers, ready, v, rng)]
                    total = sum(len(b) for b in buffers.values())
                    yield self._finish(picked, rng)
                else:
                    oldest = min(buffers, key=lambda v: buffers[v][0][0])
                    buffers[oldest].pop(0)
                    if not buffers[oldest]:
                        del buffers[oldest]
                    total -= 1

    def _take(self, buffers, ready, vid, rng) -> list:
        """Remove and return K samples of ``vid`` (with replacement when fewer are buffered)."""
        buf = buffers[vid]
        if len(buf) >= self.K:
            idx = sorted(rng.choice(len(buf), self.K, replace=False).tolist())
            chosen = [buf[i][1] for i in idx]
            for i in reversed(idx):
                buf.pop(i)
        else:
            chosen = [buf[i][1] for i in rng.choice(len(buf), self.K, replace=True).tolist()]
            buf.clear()
        if len(buf) < self.K:
            ready.pop(vid, None)
        if not buf:
            del buffers[vid]
        return chosen

    def _finish(self, picked: list, rng: np.random.Generator) -> list:
        if self.transform is None:
            return picked
        return [self.transform(s, rng) for s in picked]
