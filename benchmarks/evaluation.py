"""Benchmark: streaming exact evaluation vs the dense "full matrix + argsort" baseline.

Run (the machine is shared: run the large size once, at the end)::

    .venv/bin/python benchmarks/evaluation.py --sizes veri                 # ~1 min
    .venv/bin/python benchmarks/evaluation.py --sizes veri,wild-large \\
        --out benchmarks/RESULTS-evaluation.md                              # ~10 min

Synthetic features with planted structure (so the metrics are non-trivial): ids belong
to families (similar models: hard negatives), every image is its id's centre plus a
camera offset plus noise, for the global feature and each of the 4 parts; each image
sees 1-3 parts (the others have zero visibility and zero features). Sizes:

* ``veri``: VeRi-776 test split, 1,678 queries x 11,579 gallery, 200 ids, 20 cameras
* ``wild-large``: VERI-Wild large, 10,000 queries (one per id) x 128,517 gallery, 174 cameras

Per size, in one process: (b) ours: :class:`StreamingEvaluator` in float32 and with
bfloat16 GEMMs, plus the same GEMM calls alone (its "own GEMMs"); (a) the dense
baseline as common toolkits do it: the full (Q, G) distance matrix with whole-matrix
torch ops, ``np.argsort`` of every row, then per-query metrics. The baseline can run
on a subset of queries (``--baseline-queries``; it needs ~5 GB for the float32 matrix
alone at VERI-Wild large, plus 8 bytes per entry for the argsort); its time is then
extrapolated linearly to all queries and its memory from the matrix sizes, and the
report says so. Peak memory = peak RSS (sampled every 2 ms) minus RSS at the start of
the phase (features already allocated).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import publish  # noqa: E402
from pipeline.constants import NUM_PARTS, VARIANTS  # noqa: E402
from pipeline.evaluation import native  # noqa: E402
from pipeline.evaluation.features import FeatureSet  # noqa: E402
from pipeline.evaluation.kernel import DEFAULT_TILE, BlockKernel  # noqa: E402
from pipeline.evaluation.metrics import RankMetrics, rank_metrics  # noqa: E402
from pipeline.evaluation.spec import MODES, DistanceSpec  # noqa: E402
from pipeline.evaluation.streaming import StreamingEvaluator  # noqa: E402
from pipeline.evaluation.tiled import TiledProvider  # noqa: E402
from pipeline.threads import kernel_threads  # noqa: E402

SIZES = {
    # name: (queries, gallery, ids, cameras, one query per id)
    "veri": (1678, 11579, 200, 20, False),
    "wild-large": (10000, 128517, 10000, 174, True),
    "smoke": (300, 3000, 100, 10, False),        # seconds: checks the script end to end
}


# --------------------------------------------------------------------------- data

DIFFICULTY = {"id": 0.36, "family": 0.30, "camera": 0.08, "part_id": 0.31}


def make_features(name: str, global_dim: int, part_dim: int, seed: int,
                  shuffle_gallery: bool = False) -> tuple[FeatureSet, FeatureSet]:
    """Synthetic query and gallery sets of size ``name`` with planted id structure.

    The gallery is grouped by id, as the real test lists are (VeRi-776 ``name_test.txt``
    is sorted by file name, i.e. by id; VERI-Wild lists are grouped by vehicle folder);
    ``shuffle_gallery`` puts it in random order instead (the evaluator then gathers rows).
    """
    nq, ng, nid, ncam, one_per_id = SIZES[name]
    gen = torch.Generator().manual_seed(seed)
    # Difficulty is set per dimension: the gap between same-id and other-id squared
    # distances must beat the noise's spread (~sqrt(C)), so the centre scale ~ C^-1/4.
    def scales(c: int, part: bool) -> tuple[float, float, float]:
        k = (512 / c) ** 0.25
        return (DIFFICULTY["part_id" if part else "id"] * k, DIFFICULTY["family"] * k,
                DIFFICULTY["camera"] * k)
    n_fam = max(1, nid // 8)
    fam = torch.randint(0, n_fam, (nid,), generator=gen)

    def centres(c: int, parts: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        s_id, s_fam, s_cam = scales(c, parts is not None)
        shape = (c,) if parts is None else (parts, c)
        f = torch.randn((n_fam, *shape), generator=gen) * s_fam
        mu = f[fam] + torch.randn((nid, *shape), generator=gen) * s_id
        cam = torch.randn((ncam, *shape), generator=gen) * s_cam
        return mu, cam

    g_mu, g_cam = centres(global_dim, None)
    p_mu, p_cam = centres(part_dim, NUM_PARTS)
    # gallery ids: every id at least once, the rest uniform (VeRi ~58, VERI-Wild ~13 per id)
    g_ids = torch.cat([torch.arange(nid), torch.randint(0, nid, (ng - nid,), generator=gen)])
    g_ids = g_ids[torch.randperm(ng, generator=gen)] if shuffle_gallery else torch.sort(g_ids).values
    q_ids = torch.arange(nq) if one_per_id else torch.randint(0, nid, (nq,), generator=gen)

    def images(ids: torch.Tensor) -> FeatureSet:
        n = len(ids)
        cams = torch.randint(0, ncam, (n,), generator=gen)
        out_g = torch.empty(n, global_dim)
        out_p = torch.empty(n, NUM_PARTS, part_dim)
        vis = torch.zeros(n, NUM_PARTS)
        # a view sees the side plus front or back, sometimes the top; areas in pixels of a 16x16 map
        front = torch.rand(n, generator=gen) < 0.5
        vis[:, 0] = torch.where(front, torch.randint(10, 120, (n,), generator=gen).float(), 0.0)
        vis[:, 1] = torch.where(~front, torch.randint(10, 120, (n,), generator=gen).float(), 0.0)
        # the side is always visible, so every pair has a common visible part
        vis[:, 2] = torch.randint(5, 150, (n,), generator=gen).float()
        vis[:, 3] = torch.where(torch.rand(n, generator=gen) < 0.5,
                                torch.randint(5, 60, (n,), generator=gen).float(), 0.0)
        for s in range(0, n, 16384):       # in chunks: no full-size temporaries
            i, c = ids[s:s + 16384], cams[s:s + 16384]
            m = len(i)
            out_g[s:s + m] = g_mu[i] + g_cam[c] + torch.randn(m, global_dim, generator=gen)
            out_p[s:s + m] = (p_mu[i] + p_cam[c] + torch.randn(m, NUM_PARTS, part_dim, generator=gen)) \
                * (vis[s:s + m, :, None] > 0)
        return FeatureSet(ids.numpy(), cams.numpy(), out_g.numpy(), out_p.numpy(), vis.numpy())

    return images(q_ids), images(g_ids)


# --------------------------------------------------------------------------- measuring

class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms from /proc."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def cpu_seconds() -> float:
    """CPU time of this process, all threads (less sensitive than wall time to other load)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_ours(q: FeatureSet, g: FeatureSet, spec: DistanceSpec, **kw: object) -> tuple[RankMetrics, dict]:
    """One evaluation; construction (per-set norms, checks) counts as distance time."""
    c0 = cpu_seconds()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ev = StreamingEvaluator(q, g, spec, **kw)
        t_prep = time.perf_counter() - t0
        m = ev.run()
    st = dict(ev.stats)
    st["seconds_distance"] += t_prep
    st["seconds_total"] += t_prep
    st["cpu_seconds"] = cpu_seconds() - c0
    st["peak_bytes"] = mem.delta
    return m, st


class GemmOnlyKernel(BlockKernel):
    """The evaluator's kernel with only its GEMM calls (same tiles, shapes and threads)."""

    def tile(self, q, rs, g, cs, out, s=None):  # noqa: ANN001 - mirrors BlockKernel.tile
        s = s if s is not None else self._scratch[0]
        o = s["t16"] if self.bf16 else s["tmp"]
        if self.spec.uses_global:
            torch.mm(q.gA[rs], g.gA[cs].T, out=o)
        if self.spec.uses_local:
            for i in range(NUM_PARTS):
                torch.mm(q.pA[i, rs], g.pA[i, cs].T, out=o)
            torch.mm(q.w[rs], g.w[cs].T, out=s["den"])


def gemm_only_seconds(q: FeatureSet, g: FeatureSet, spec: DistanceSpec, q_block: int, g_block: int,
                      matmul_dtype: torch.dtype | None = None, device: str = "cpu") -> tuple[float, float, float]:
    """Wall seconds, flops and CPU seconds of the evaluator's GEMMs alone over all Q x G
    pairs (same tiles and threads; layout excluded)."""
    prov = TiledProvider(q, g, spec, q_block=q_block, g_block=g_block, matmul_dtype=matmul_dtype, device=device)
    prov.start()
    try:
        prov.kernel = GemmOnlyKernel(spec, prov.tile, bf16=prov.bf16, workers=prov.kernel.workers,
                                     device=prov.device)
        prov.cache_bytes = 0
        prov.set_gallery_order(np.arange(len(g)))
        secs = cpu = 0.0
        for g0 in range(0, len(g), prov.g_block):
            gh = prov.gallery(g0, min(len(g), g0 + prov.g_block))
            for q0 in range(0, len(q), prov.q_block):
                qh = prov.queries(torch.arange(q0, min(len(q), q0 + prov.q_block)))
                sync(device)
                t0, c0 = time.perf_counter(), cpu_seconds()
                prov.distances(qh, gh, 0, gh.n)
                sync(device)
                secs += time.perf_counter() - t0
                cpu += cpu_seconds() - c0
        return secs, float(prov.flops), cpu
    finally:
        prov.close()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def baseline(q: FeatureSet, g: FeatureSet, spec: DistanceSpec, n_queries: int,
             remove_junk: bool = True, max_rank: int = 50) -> dict:
    """Dense baseline on the first ``n_queries`` queries: full matrix, argsort rows, metrics."""
    qq = q.subset(slice(0, n_queries))
    out: dict = {}
    c0 = cpu_seconds()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        with torch.no_grad():
            dist = dense_torch_distance(qq, g, spec)
        t1 = time.perf_counter()
        order = np.argsort(dist, axis=1)               # what common toolkits do
        t2 = time.perf_counter()
        m = argsort_metrics(order, np.asarray(qq.ids), np.asarray(g.ids), np.asarray(qq.cams),
                            np.asarray(g.cams), remove_junk, max_rank)
        t3 = time.perf_counter()
    out.update(seconds_distance=t1 - t0, seconds_argsort=t2 - t1, seconds_metrics=t3 - t2,
               peak_bytes=mem.delta, metrics=m, dist=dist, cpu_seconds=cpu_seconds() - c0)
    return out


def dense_torch_distance(q: FeatureSet, g: FeatureSet, spec: DistanceSpec) -> np.ndarray:
    """The whole (Q, G) matrix with whole-matrix torch ops (as PVEN's own evaluation code)."""
    from pipeline.reid.distance import pven_distance_torch
    t = lambda x: torch.as_tensor(x)  # noqa: E731
    d = pven_distance_torch(t(q.global_feats), t(q.part_feats), t(q.visibility),
                            t(g.global_feats), t(g.part_feats), t(g.visibility), spec)
    return d.numpy()


def argsort_metrics(order: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, q_cams: np.ndarray,
                    g_cams: np.ndarray, remove_junk: bool, max_rank: int) -> dict:
    """Classic per-query metrics from argsorted rows (Market-1501 style, vectorised per row)."""
    aps, inps, cmc_hits, n_valid = [], [], np.zeros(max_rank), 0
    ap_all = np.full(order.shape[0], np.nan)
    for i in range(order.shape[0]):
        o = order[i]
        gi = g_ids[o]
        keep = ~((gi == q_ids[i]) & (g_cams[o] == q_cams[i])) if remove_junk else np.ones(len(o), bool)
        match = (gi == q_ids[i])[keep]
        if not match.any():
            continue
        n_valid += 1
        pos = np.nonzero(match)[0] + 1
        aps.append(float(np.mean(np.arange(1, len(pos) + 1) / pos)))
        ap_all[i] = aps[-1]
        inps.append(len(pos) / pos[-1])
        if pos[0] <= max_rank:
            cmc_hits[pos[0] - 1:] += 1
    return {"mAP": float(np.mean(aps)) if aps else math.nan, "mINP": float(np.mean(inps)) if inps else math.nan,
            "cmc": cmc_hits / max(n_valid, 1), "num_queries": n_valid, "ap": ap_all}


# --------------------------------------------------------------------------- report

def bench_size(name: str, args: argparse.Namespace) -> list[str]:
    spec = DistanceSpec(mode=args.mode, variant=args.variant)
    nq, ng = SIZES[name][:2]
    print(f"[{name}] generating {nq} x {ng} features (global {args.global_dim}, parts 4x{args.part_dim})",
          flush=True)
    t0 = time.perf_counter()
    q, g = make_features(name, args.global_dim, args.part_dim, args.seed)
    feat_bytes = sum(np.asarray(x).nbytes for s in (q, g) for x in (s.global_feats, s.part_feats, s.visibility))
    print(f"[{name}] features {gib(feat_bytes)} in {time.perf_counter() - t0:.1f} s", flush=True)
    kw = dict(q_block=args.q_block, g_block=args.g_block)
    load0 = os.getloadavg()[0]

    m32, s32 = run_ours(q, g, spec, **kw)
    print(f"[{name}] ours fp32: {s32['seconds_total']:.2f} s (distance {s32['seconds_distance']:.2f}, "
          f"ranking {s32['seconds_ranking']:.2f}), peak +{gib(s32['peak_bytes'])}, mAP {m32.mAP:.4f}", flush=True)
    gemm_s, gemm_f, gemm_cpu = gemm_only_seconds(q, g, spec, args.q_block, args.g_block)
    print(f"[{name}] own GEMMs alone: {gemm_s:.2f} s, {gemm_f / gemm_s / 1e9:.1f} GFLOP/s", flush=True)
    shuffled = None
    if ng <= 20000:   # same gallery in random order: rows are then gathered; metrics must not change
        perm = np.random.default_rng(args.seed).permutation(ng)
        g_shuf = g.subset(perm)
        m_sh, s_sh = run_ours(q, g_shuf, spec, **kw)
        shuffled = (m_sh.same_as(m32), s_sh)
        del g_shuf
        print(f"[{name}] ours fp32, gallery shuffled: {s_sh['seconds_total']:.2f} s, same metrics: {shuffled[0]}",
              flush=True)
    rerank_line = ""
    if ng <= 20000 and not args.no_rerank:   # k-reciprocal re-ranking costs (Q+G)^2 distances
        from pipeline.evaluation.rerank import RerankConfig
        m_rr, s_rr = run_ours(q, g, spec, rerank=RerankConfig(), **kw)
        rerank_line = (f"- k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3; sparse, streamed, no (Q+G)^2 "
                       f"matrix): {s_rr['seconds_total']:.2f} s, peak +{gib(s_rr['peak_bytes'])}, mAP "
                       f"{m_rr.mAP:.4f} (plain {m32.mAP:.4f}), R1 {m_rr.cmc[0]:.4f} (plain {m32.cmc[0]:.4f}).")
        print(f"[{name}] {rerank_line}", flush=True)
    m16, s16 = run_ours(q, g, spec, matmul_dtype=torch.bfloat16, **kw)
    gemm16_s, _, _ = gemm_only_seconds(q, g, spec, args.q_block, args.g_block, torch.bfloat16)
    print(f"[{name}] ours bf16: {s16['seconds_total']:.2f} s, mAP {m16.mAP:.4f}", flush=True)

    # the dense baseline needs ~(4 + 8) bytes per pair plus temporaries: a subset at VERI-Wild size
    nb = min(nq, args.baseline_queries or (500 if ng > 20000 else nq))
    b = baseline(q, g, spec, nb)
    scale = nq / nb
    print(f"[{name}] baseline on {nb} queries: distance {b['seconds_distance']:.2f} s, argsort "
          f"{b['seconds_argsort']:.2f} s, metrics {b['seconds_metrics']:.2f} s, peak +{gib(b['peak_bytes'])}",
          flush=True)
    # exactness: our ranking on the baseline's own matrix vs its argsort metrics, and
    # streaming vs dense rank_metrics on our kernel's matrix (subset of queries)
    qq = q.subset(slice(0, nb))
    rm_b = rank_metrics(b["dist"], qq.ids, g.ids, qq.cams, g.cams)
    # argsort resolves ties between a positive and a negative arbitrarily; we rank the
    # negative first. Count the queries that differ and whether each has such a tie.
    ap_b = b["metrics"]["ap"]
    ap_r = rm_b.ap
    differ = ~np.isclose(ap_b, ap_r, rtol=0, atol=1e-12, equal_nan=True)
    tied = 0
    for i in np.nonzero(differ)[0]:
        row, same = b["dist"][i], np.asarray(g.ids) == np.asarray(qq.ids)[i]
        tied += bool(np.isin(row[same], row[~same]).any())
    vs_argsort = (f"{int(differ.sum())} of {nb} queries differ (max |dAP| "
                  f"{np.nanmax(np.abs(ap_b - ap_r)) if differ.any() else 0.0:.1e}), {tied} of them have a "
                  f"positive at exactly the distance of a negative (float32 tie), which argsort may put "
                  f"first and we put last (documented tie rule)")
    del b["dist"]
    from pipeline.evaluation.dense import pven_distance
    dense = pven_distance(qq, g, spec, q_block=args.q_block, g_block=args.g_block)
    rm_dense = rank_metrics(dense, qq.ids, g.ids, qq.cams, g.cams)
    del dense
    m_sub = StreamingEvaluator(qq, g, spec, **kw).run()
    streaming_exact = m_sub.same_as(rm_dense)

    full = nb == nq
    ex = "" if full else f" (x{scale:.1f}, extrapolated from {nb} queries)"
    rank_base = (b["seconds_argsort"] + b["seconds_metrics"]) * scale
    dist_base = b["seconds_distance"] * scale
    mem_base = b["peak_bytes"] * (scale if not full else 1.0)
    lines = [
        f"### {name}: {nq:,} queries x {ng:,} gallery, {args.mode} ({args.variant}), "
        f"global {args.global_dim}-d + 4 x {args.part_dim}-d parts",
        "",
        f"Load average (1 min) at the start / end of this size: {load0:.2f} / {os.getloadavg()[0]:.2f} "
        f"(2 cores; above ~0.5 other processes were competing for them).",
        "",
        f"Features: {gib(feat_bytes)}. Planted structure: mAP {m32.mAP:.4f}, mINP {m32.mINP:.4f}, "
        f"R1 {m32.cmc[0]:.4f}, R5 {m32.cmc[4]:.4f}, R10 {m32.cmc[9]:.4f} ({m32.num_queries} queries, "
        f"{m32.num_skipped} skipped).",
        "",
        "| | distance (s) | ranking + metrics (s) | total (s) | peak memory above features |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| dense baseline (full matrix, argsort rows){ex} | {dist_base:.2f} | {rank_base:.2f} | "
        f"{dist_base + rank_base:.2f} | {gib(mem_base)}{'' if full else ' (extrapolated)'} |",
        f"| ours, streaming, fp32 | {s32['seconds_distance']:.2f} | {s32['seconds_ranking']:.2f} | "
        f"{s32['seconds_total']:.2f} | {gib(s32['peak_bytes'])} |",
        f"| ours, streaming, bf16 GEMMs | {s16['seconds_distance']:.2f} | {s16['seconds_ranking']:.2f} | "
        f"{s16['seconds_total']:.2f} | {gib(s16['peak_bytes'])} |",
    ]
    if shuffled is not None:
        sh = shuffled[1]
        lines.append(f"| ours, fp32, same gallery in random order (rows gathered) | {sh['seconds_distance']:.2f} | "
                     f"{sh['seconds_ranking']:.2f} | {sh['seconds_total']:.2f} | {gib(sh['peak_bytes'])} |")
    lines += [
        "",
        "The gallery is grouped by id as in the real test lists (VeRi-776 `name_test.txt`, VERI-Wild "
        "lists). Ours, ranking = everything but the distance kernel, including the negative counting "
        f"fused into the kernel's worker threads ({s32['seconds_counting_on_workers']:.2f} s of wall time).",
        "",
        f"- Ranking phase speed-up vs argsort baseline: **{rank_base / s32['seconds_ranking']:.1f}x** "
        f"(goal >= 10x)."
        + ("" if shuffled is None else f" Random gallery order gives the same metrics: **{shuffled[0]}**."),
        f"- Own GEMMs alone (same tiles): fp32 {gemm_s:.2f} s = {gemm_f / gemm_s / 1e9:.1f} GFLOP/s; whole "
        f"evaluation / own GEMMs = **{s32['seconds_total'] / gemm_s:.2f}x** (goal <= 1.25x). "
        f"bf16: GEMMs {gemm16_s:.2f} s ({gemm_f / gemm16_s / 1e9:.1f} GFLOP/s equivalent), "
        f"whole {s16['seconds_total'] / gemm16_s:.2f}x of them. In CPU seconds (all threads; less "
        f"affected by other load): ours {s32['cpu_seconds']:.1f}, own GEMMs {gemm_cpu:.1f} "
        f"(**{s32['cpu_seconds'] / gemm_cpu:.2f}x**), dense baseline {b['cpu_seconds'] * scale:.1f}"
        f"{'' if full else ' (extrapolated)'}.",
        f"- Candidate negatives counted (<= the query's farthest positive): {s32['candidates']:,} "
        f"({s32['candidates'] / (nq * ng):.4%} of all pairs); id ranges recomputed: {s32['ranges_recomputed']}.",
        f"- Metrics identical: streaming vs dense `rank_metrics` on the same kernel's matrix "
        f"({nb} queries): **{streaming_exact}** (bitwise); our ranking vs argsort metrics on the "
        f"baseline's own matrix: {vs_argsort}.",
        f"- bf16 GEMMs vs fp32: mAP {m16.mAP:.4f} vs {m32.mAP:.4f} (diff {m16.mAP - m32.mAP:+.2e}), "
        f"R1 {m16.cmc[0]:.4f} vs {m32.cmc[0]:.4f}, mINP {m16.mINP:.4f} vs {m32.mINP:.4f}: "
        f"{'identical' if m16.same_as(m32) else 'not identical'}.",
    ]
    if rerank_line:
        lines.append(rerank_line)
    lines.append("")
    return lines


# --------------------------------------------------------------------------- the GEMM limit

MODE_VARIANTS = [(m, v) for v in VARIANTS for m in MODES]


def machine_peak(device: str, reps: int = 3) -> float:
    """The machine's float32 GEMM rate in GFLOP/s: the better of one large GEMM (4096 x 16384 x 512)
    with all of torch's threads and, on the CPU, the kernel's own tile shape on every worker
    thread at once (what the evaluator can reach at best); best of ``reps`` each."""
    def best(fn: Callable[[], None], flops: float) -> float:
        fn()                        # warm-up (MKL / cuBLAS set-up)
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9
    a, b = torch.randn(4096, 512, device=device), torch.randn(16384, 512, device=device)
    c = torch.empty(4096, 16384, device=device)
    rate = best(lambda: torch.mm(a, b.T, out=c), 2 * 4096 * 16384 * 512)
    if device == "cpu":
        from concurrent.futures import ThreadPoolExecutor
        (tm, tn), k, n = DEFAULT_TILE, 514, torch.get_num_threads()
        ops = [(torch.randn(tm, k), torch.randn(tn, k), torch.empty(tm, tn)) for _ in range(n)]

        def tiles(w: int) -> None:
            qa, ga, out = ops[w]
            for _ in range(20):
                torch.mm(qa, ga.T, out=out)
        with kernel_threads(), ThreadPoolExecutor(n) as pool:
            rate = max(rate, best(lambda: list(pool.map(tiles, range(n))), 2 * tm * tn * k * 20 * n))
    return rate


class ProfilingKernel(BlockKernel):
    """The evaluator's kernel, timing per worker its GEMMs and whole tiles (the rest is elementwise work)."""
    last: ProfilingKernel | None = None

    def __init__(self, *a, **kw):  # noqa: ANN002, ANN003 - BlockKernel's arguments
        super().__init__(*a, **kw)
        self.t_gemm = [0.0] * self.workers
        self.t_tile = [0.0] * self.workers
        self._who = threading.local()
        ProfilingKernel.last = self

    def _gram(self, *a, **kw):  # noqa: ANN002, ANN003
        t0 = time.perf_counter()
        super()._gram(*a, **kw)
        self.t_gemm[self._who.w] += time.perf_counter() - t0

    def _weight_sums(self, *a, **kw):  # noqa: ANN002, ANN003
        t0 = time.perf_counter()
        super()._weight_sums(*a, **kw)
        self.t_gemm[self._who.w] += time.perf_counter() - t0

    def tile(self, q, rs, g, cs, out, s=None):  # noqa: ANN001 - mirrors BlockKernel.tile
        self._who.w = w = 0 if s is None else next(i for i, x in enumerate(self._scratch) if x is s)
        t0 = time.perf_counter()
        super().tile(q, rs, g, cs, out, s)
        self.t_tile[w] += time.perf_counter() - t0


def profiled_run(q: FeatureSet, g: FeatureSet, spec: DistanceSpec, kw: dict) -> dict:
    """One evaluation with :class:`ProfilingKernel`: wall-second shares of GEMMs, elementwise
    steps, counting on the workers and everything else (layout, positives, ranking)."""
    import pipeline.evaluation.tiled as tiled
    plain = tiled.BlockKernel
    tiled.BlockKernel = ProfilingKernel
    try:
        ev = StreamingEvaluator(q, g, spec, **kw)
        t0 = time.perf_counter()
        ev.run()
        total = time.perf_counter() - t0
    finally:
        tiled.BlockKernel = plain
    k = ProfilingKernel.last
    n = k.workers
    gemm, tile = sum(k.t_gemm) / n, sum(k.t_tile) / n
    counting = ev.stats["seconds_counting_on_workers"]
    return {"total": total, "gemm": gemm, "elementwise": tile - gemm, "counting": counting,
            "other": total - tile - counting}


def limit_rows(name: str, q: FeatureSet, g: FeatureSet, args: argparse.Namespace, peak: float) -> list[str]:
    """One table row per (mode, variant): whole evaluation / its own GEMMs, GFLOP/s, breakdown."""
    rows = []
    nq = len(q)
    check_q = q.subset(slice(0, min(nq, args.check_queries)))
    for mode, variant in args.mode_variants:
        spec = DistanceSpec(mode=mode, variant=variant)
        kw = dict(q_block=args.q_block, g_block=args.g_block, device=args.device)
        m, st = run_ours(q, g, spec, **kw)
        gemm_s, gemm_f, gemm_cpu = gemm_only_seconds(q, g, spec, args.q_block, args.g_block, device=args.device)
        prof = profiled_run(q, g, spec, kw) if args.device == "cpu" else None
        same = "n/a (GPU)"
        if args.device == "cpu":    # the compiled loops against the pure-torch path, same queries
            fast = StreamingEvaluator(check_q, g, spec, **kw).run()
            before = os.environ.get("PVEN_NATIVE")
            os.environ["PVEN_NATIVE"] = "0"
            native._load.cache_clear()
            try:
                ref = StreamingEvaluator(check_q, g, spec, **kw).run()
            finally:
                if before is None:
                    del os.environ["PVEN_NATIVE"]
                else:
                    os.environ["PVEN_NATIVE"] = before
                native._load.cache_clear()
            same = f"{fast.same_as(ref)} ({len(check_q):,} q)"
        total = st["seconds_total"]
        brk = "" if prof is None else (
            f"{prof['gemm'] / prof['total']:.0%} / {prof['elementwise'] / prof['total']:.0%} / "
            f"{prof['counting'] / prof['total']:.0%} / {prof['other'] / prof['total']:.0%}")
        rate = gemm_f / gemm_s / 1e9
        rows.append(f"| {name} | {mode} ({variant}) | {total:.2f} | {gemm_s:.2f} | **{total / gemm_s:.2f}x** | "
                    f"{st['cpu_seconds'] / gemm_cpu:.2f}x | {rate:.0f} ({rate / peak:.0%} of peak) | {brk} | "
                    f"{gib(st['peak_bytes'])} | {same} | {m.mAP:.4f} |")
        print(rows[-1], flush=True)
    return rows


def limit_section(args: argparse.Namespace) -> list[str]:
    native.lib()                    # build (or load) once, outside every timing
    peak = machine_peak(args.device)
    lines = [f"## Whole evaluation against its own GEMMs ({args.device})", "",
             f"Machine GEMM peak (float32; the better of one 4096 x 16384 x 512 GEMM on all threads and "
             f"the kernel's {DEFAULT_TILE[0]} x {DEFAULT_TILE[1]} x 514 tiles on every worker at once): "
             f"**{peak:.0f} GFLOP/s**. Compiled tile loops (pipeline/evaluation/native.c): "
             f"{native.available() if args.device == 'cpu' else 'not used on a GPU'}. Load average at the "
             f"start: {os.getloadavg()[0]:.2f}.", "",
             "| size | mode | whole (s) | own GEMMs (s) | whole / GEMMs (wall) | (CPU time) | GEMM GFLOP/s | "
             "GEMM / elementwise / counting / other | peak memory above features | metrics = torch path | mAP |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
    for name in args.sizes.split(","):
        q, g = make_features(name.strip(), args.global_dim, args.part_dim, args.seed)
        lines += limit_rows(name.strip(), q, g, args, peak)
        del q, g
    lines += ["", "Whole = construction (per-set norms) + layout + distances + ranking + metrics, wall time. "
              "Own GEMMs = the same GEMM calls on the same tiles and threads, nothing else. The breakdown "
              "(shares of the whole, from a second run with per-worker timers) puts the weight-sum GEMM (K = 4) "
              "under GEMM; other = layout, positives, ranker set-up and finalisation. `metrics = torch path`: "
              "the same evaluation with PVEN_NATIVE=0 (the pure-torch tile path), RankMetrics bitwise equal.", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="veri", help="comma list of " + ",".join(SIZES))
    ap.add_argument("--global-dim", type=int, default=512)
    ap.add_argument("--part-dim", type=int, default=512)
    ap.add_argument("--mode", default="pven", choices=("global", "local", "pven"))
    ap.add_argument("--variant", default="paper", choices=("paper", "official"))
    ap.add_argument("--q-block", type=int, default=1024)
    ap.add_argument("--g-block", type=int, default=8192)
    ap.add_argument("--baseline-queries", type=int, default=0,
                    help="run the dense baseline on this many queries and extrapolate "
                         "(0: all, except 500 for galleries above 20,000 images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rerank", action="store_true", help="skip the re-ranking line (VeRi size)")
    ap.add_argument("--out", default="-", help="write the markdown report here (atomically); '-' prints only")
    ap.add_argument("--sections", default="baseline,limit",
                    help="comma list: baseline (streaming vs dense argsort, --mode/--variant), "
                         "limit (whole / own GEMMs for every mode, see --modes)")
    ap.add_argument("--modes", default="all", help="limit section: all, or a comma list of mode:variant")
    ap.add_argument("--check-queries", type=int, default=2000,
                    help="limit section: queries whose metrics are checked against the pure-torch path")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the GEMMs run")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    sections = {x.strip() for x in args.sections.split(",")}
    if not sections <= {"baseline", "limit"}:
        ap.error(f"--sections {args.sections!r}: expected baseline and/or limit")
    if args.device == "cuda" and "baseline" in sections:
        ap.error("--device cuda: the baseline section runs on the CPU only; add --sections limit")
    args.mode_variants = MODE_VARIANTS if args.modes == "all" else [tuple(x.strip().split(":"))
                                                                    for x in args.modes.split(",")]
    bad = [":".join(x) for x in args.mode_variants if x not in MODE_VARIANTS]
    if bad:
        ap.error(f"--modes {args.modes!r}: {', '.join(bad)} is not mode:variant with mode in {MODES} "
                 f"and variant in {VARIANTS}")
    lines = ["# Evaluation benchmark: streaming exact metrics vs dense argsort", "",
             f"Command: `python benchmarks/evaluation.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}. "
             f"One run; timings on a shared machine vary by tens of percent between runs.", ""]
    if "limit" in sections:
        lines += limit_section(args)
    if "baseline" in sections:
        for name in args.sizes.split(","):
            lines += bench_size(name.strip(), args)
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
