"""The tiled GEMM kernel behind every evaluation distance: exact, reproducible, O(tile) scratch.

Shapes: global features ``(N, Cg)``, part features ``(N, 4, Cp)`` (front, back, side,
top), visibilities ``(N, 4)``. :class:`PreparedSet` computes a set's per-row
constants once, :meth:`PreparedSet.chunk` lays rows out for the GEMMs (a
:class:`Chunk`), and :class:`BlockKernel` turns a query chunk x gallery chunk into
distances tile by tile (formulas: :mod:`pipeline.evaluation.spec`).

Every distance here is computed with GEMMs (``||a||^2 + ||b||^2 - 2 a.b``, clamped at
0) and never produces NaN/inf for finite inputs. A part whose visibility is below
``MIN_WEIGHT`` (1e-6) of the image's most visible part counts as invisible; mask
pixel counts are never that small.

Exactness across block sizes: BLAS libraries may round differently for different
matrix shapes (MKL does for small ones). So every GEMM of the evaluation runs on
fixed-shape tiles (``tile``, zero-padded at the edges); within one shape each output
element is computed the same way wherever it sits, hence the same query/gallery pair
gets bitwise the same distance whatever block decomposition, gallery order or block
sizes the caller uses. The elementwise steps run on whole tiles whose width is a
multiple of 64 (no scalar tail, so fused multiply-adds round alike everywhere), and
per-row constants (norms, weights) are computed once per whole feature set, always
under :func:`pipeline.threads.kernel_threads`. The dense API
(:mod:`~pipeline.evaluation.dense`) and the streaming evaluator share this kernel,
which is what makes streaming metrics equal dense metrics.

The norm terms ride inside the GEMM: a query row ``[-2 a x, a |x|^2, a]`` dotted with
a gallery row ``[b y, b, b |y|^2]`` gives ``a b ||x - y||^2``; with ``a = w_p^2``,
``b = w_q^2`` (per-part visibility weights) the square root is directly the weighted
part distance ``w_p w_q ||x - y||``. For the ``sqrt_euclidean`` part distance
(``official``) ``a = w_p^4``, ``b = w_q^4`` and the fourth root gives
``w_p w_q sqrt(||x - y||)``. Visibilities are rescaled per image to a maximum of 1
first (the attention ``a_i`` is invariant to that), which keeps these products far
from float32 overflow.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.constants import NUM_PARTS
from pipeline.threads import kernel_threads

from . import native
from .features import FeatureSet, as_tensor
from .spec import DistanceSpec

__all__ = ["CUDA_TILE", "DEFAULT_TILE", "MIN_WEIGHT", "NORM_EPS", "BlockKernel", "Chunk", "PreparedSet", "check_tile",
           "round_up"]

# (rows, cols) of every GEMM output. 256 rows amortise MKL's packing of the gallery
# tile; 512 columns keep a tile's float32 scratch (512 KiB) in L2.
DEFAULT_TILE = (256, 512)
# On a GPU one tile is a whole default block: few, large launches (scratch 8 x 32 MiB).
CUDA_TILE = (1024, 8192)
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
_NORM_ROWS = 4096  # fixed row chunk for per-row reductions (keeps them reproducible)
MIN_WEIGHT = 1e-6  # visibility below this fraction of an image's most visible part = invisible
_DEN_FLOOR = 1e-30  # < MIN_WEIGHT**2: clamping the attention denominator to it only touches 0
_FLT_MIN = float(torch.finfo(torch.float32).tiny)
_ROOT_FLOOR = 1e-6  # sqrt_euclidean: ||x - y|| >= sqrt(1e-12), the authors' clamp before their two roots


def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``n``."""
    return -(-n // m) * m


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norms over the last dim, in fixed row chunks (no full-size temporaries)."""
    flat = x.reshape(-1, x.shape[-1]) if x.numel() else x.reshape(0, max(1, x.shape[-1]))
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    for r in range(0, flat.shape[0], _NORM_ROWS):
        blk = flat[r:r + _NORM_ROWS].float()
        out[r:r + _NORM_ROWS] = (blk * blk).sum(-1)
    return out.reshape(x.shape[:-1])


def _float_feats(name: str, x: Any) -> torch.Tensor:
    """Features as a float32 CPU tensor; a NaN/inf value is refused."""
    t = as_tensor(name, x).cpu().float()
    _check_finite(name, t)
    return t


def _check_finite(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    flat = x.reshape(x.shape[0], -1).numpy()          # numpy: no threads to wake
    for r in range(0, flat.shape[0], _NORM_ROWS):
        blk = flat[r:r + _NORM_ROWS]
        ok = np.isfinite(blk)
        if not ok.all():
            i = int(np.nonzero(~ok)[0][0]) + r
            raise ValueError(f"{name}: {int((~ok).sum())} non-finite values in rows {r}..{r + len(blk) - 1} "
                             f"(first in row {i})")


@dataclasses.dataclass(eq=False)
class Chunk:
    """Rows of a set laid out for the GEMM kernel, padded with zero rows to ``n_pad``.

    fp32 mode: ``gA`` (n_pad, Cg+2) and ``pA`` (4, n_pad, Cp+2) carry the norm terms
    in their last two columns. bf16 mode: ``gA``/``pA`` hold only the (scaled) features
    in bfloat16 and ``gN`` (n_pad, 2) / ``pN`` (4, n_pad, 2) the float32 norm terms.
    ``w`` (n_pad, 4): per-image part weights (visibility / its max).
    """
    n: int
    n_pad: int
    gA: torch.Tensor | None = None
    gN: torch.Tensor | None = None
    pA: torch.Tensor | None = None
    pN: torch.Tensor | None = None
    w: torch.Tensor | None = None

    def to(self, device: torch.device) -> Chunk:
        """The same chunk on ``device`` (itself when it is there already)."""
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=True)
        present = [x for x in (self.gA, self.pA) if x is not None]
        if not present or present[0].device == device:
            return self
        return Chunk(n=self.n, n_pad=self.n_pad, gA=move(self.gA), gN=move(self.gN), pA=move(self.pA),
                     pN=move(self.pN), w=move(self.w))

    def rows(self, r0: int, r1: int) -> Chunk:
        """Rows ``r0:r1`` as views (``r1 <= n_pad``); ``n`` counts the real rows among them."""
        def cut(x: torch.Tensor | None, part_dim: bool = False) -> torch.Tensor | None:
            if x is None:
                return None
            return x[:, r0:r1] if part_dim else x[r0:r1]
        return Chunk(n=max(0, min(self.n, r1) - r0), n_pad=r1 - r0, gA=cut(self.gA), gN=cut(self.gN),
                     pA=cut(self.pA, True), pN=cut(self.pN, True), w=cut(self.w))


class PreparedSet:
    """Per-set constants for one :class:`DistanceSpec`, computed once on the whole set.

    Holds views of the caller's features (float32 inputs are not copied; other float
    dtypes are converted once), squared norms ``(N,)`` / ``(N, 4)``, normalisation
    divisors and part weights. :meth:`chunk` lays out any subset of rows for the kernel.
    """

    def __init__(self, fs: FeatureSet, spec: DistanceSpec, matmul_dtype: torch.dtype | None = None) -> None:
        if matmul_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"matmul_dtype={matmul_dtype}: expected None, torch.float32 or torch.bfloat16")
        # Single-threaded, as the kernel: the same settings wherever a set is prepared keep
        # its norms bitwise reproducible, and small OpenMP regions stall on a busy machine.
        with kernel_threads():
            self._prepare(fs, spec, matmul_dtype)

    def _prepare(self, fs: FeatureSet, spec: DistanceSpec, matmul_dtype: torch.dtype | None) -> None:
        self.spec = spec
        self.n = len(fs)
        self.bf16 = matmul_dtype == torch.bfloat16
        self.g = self.p = self.w = None
        if spec.uses_global:
            if fs.global_feats is None:
                raise ValueError(f"mode {spec.mode!r} needs global_feats")
            self.g = _float_feats("global_feats", fs.global_feats)
            self.g_sq, self.g_div = self._norms(self.g)
        if spec.uses_local:
            if fs.part_feats is None:
                raise ValueError(f"mode {spec.mode!r} needs part_feats and visibility")
            self.p = _float_feats("part_feats", fs.part_feats)
            self.p_sq, self.p_div = self._norms(self.p)
            v = as_tensor("visibility", fs.visibility).cpu().double() + spec.vis_offset
            if spec.uniform:  # a_i = 1/4: every part weighs the same, seen or not
                v = torch.ones_like(v)
            vmax = v.amax(dim=1, keepdim=True)
            # Rescale each image's visibilities to max 1 (a_i is invariant to it), so the
            # squared weights in the GEMM stay far from float32 overflow; parts below
            # MIN_WEIGHT of the image's most visible part count as invisible, so a
            # non-zero sum of weight products is >= MIN_WEIGHT**2 (see BlockKernel).
            w = torch.where(vmax > 0, v / torch.where(vmax > 0, vmax, 1.0), 0.0)
            self.w = torch.where(w >= MIN_WEIGHT, w, 0.0).float()

    def _norms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        sq = _row_sq_norms(x)
        if not self.spec.l2norm:
            return sq, None
        # x / max(||x||, eps) as F.normalize; the normalised squared norm is exactly 1
        # (0 for a zero vector): using the exact value keeps it reproducible.
        div = torch.sqrt(sq).clamp_min(NORM_EPS)
        return (sq > 0).float(), div

    def layout_bytes(self, n_rows: int) -> int:
        """Bytes of a :meth:`chunk` of ``n_rows`` rows."""
        per = 0
        if self.g is not None:
            per += (self.g.shape[1] * 2 + 8) if self.bf16 else (self.g.shape[1] + 2) * 4
        if self.p is not None:
            per += NUM_PARTS * ((self.p.shape[2] * 2 + 8) if self.bf16 else (self.p.shape[2] + 2) * 4) + NUM_PARTS * 4
        return per * int(n_rows)

    def chunk(self, index: torch.Tensor | slice, role: str, n_pad: int | None = None,
              pool: ThreadPoolExecutor | None = None) -> Chunk:
        """Lay out rows ``index`` for the kernel as ``role`` 'query' or 'gallery'.

        ``pool``: optional thread pool; the global feature and each part are laid out
        as separate tasks (memory-bound copies, worth spreading over cores).
        """
        if role not in ("query", "gallery"):
            raise ValueError(f"role={role!r}")
        n = len(range(self.n)[index]) if isinstance(index, slice) else int(index.numel())
        n_pad = n if n_pad is None else int(n_pad)
        out = Chunk(n=n, n_pad=n_pad)
        jobs = []
        idx_np = None if isinstance(index, slice) else index.cpu().numpy()
        if self.g is not None:
            out.gA = torch.empty(n_pad, self.g.shape[1] + (0 if self.bf16 else 2),
                                 dtype=torch.bfloat16 if self.bf16 else torch.float32)
            out.gN = torch.empty(n_pad, 2) if self.bf16 else None
            jobs.append(lambda: self._layout(self.g, index, idx_np, self.g_sq[index],
                                             None if self.g_div is None else self.g_div[index],
                                             None, role, out.gA, out.gN))
        if self.p is not None:
            w = self.w[index]
            out.w = torch.zeros(n_pad, NUM_PARTS)
            out.w[:n] = w
            out.pA = torch.empty(NUM_PARTS, n_pad, self.p.shape[2] + (0 if self.bf16 else 2),
                                 dtype=torch.bfloat16 if self.bf16 else torch.float32)
            out.pN = torch.empty(NUM_PARTS, n_pad, 2) if self.bf16 else None

            def part(i: int) -> None:
                a = w[:, i] * w[:, i]
                if self.spec.part_root:
                    a = a * a   # w^4: the fourth root of the product is w_p w_q sqrt(||x - y||)
                self._layout(self.p[:, i], index, idx_np, self.p_sq[index, i],
                             None if self.p_div is None else self.p_div[index, i],
                             a, role, out.pA[i], None if out.pN is None else out.pN[i])
            jobs += [lambda i=i: part(i) for i in range(NUM_PARTS)]
        if pool is None or len(jobs) == 1:
            for job in jobs:
                job()
        else:
            for f in [pool.submit(job) for job in jobs]:
                f.result()
        return out

    def _layout(self, src: torch.Tensor, index: torch.Tensor | slice, idx_np: np.ndarray | None,
                sq: torch.Tensor, div: torch.Tensor | None, a: torch.Tensor | None, role: str,
                feats: torch.Tensor, norms: torch.Tensor | None) -> None:
        """Write rows ``index`` of ``src`` (N, C), scaled by ``a`` (None: 1) and divided by
        ``div`` (L2 normalisation; None: none), into ``feats`` (n_pad, C[+2])."""
        if idx_np is None:
            x = src[index]
        elif src.device.type == "cpu":
            x = torch.from_numpy(src.numpy()[idx_np])     # numpy's row gather is ~3x torch's here
        else:
            x = src[index]
        n, c = x.shape
        # query: [-2 a x, a |x|^2, a]; gallery: [a x, a, a |x|^2]  (dot = a_q a_g ||x_q - x_g||^2)
        if a is None:
            a = torch.ones(n)
        scale = a * -2.0 if role == "query" else a          # *-2 is exact in binary floats
        norm_cols = torch.stack([a * sq, a], 1) if role == "query" else torch.stack([a, a * sq], 1)
        factor = scale if div is None else scale / div     # normalisation folded into the scale
        if self.bf16:
            feats[:n] = x * factor[:, None]
            feats[n:] = 0
            norms[:n] = norm_cols
            norms[n:] = 0
            return
        torch.mul(x, factor[:, None], out=feats[:n, :c])
        feats[:n, c:] = norm_cols
        feats[n:] = 0


def check_tile(tile: Sequence[int]) -> tuple[int, int]:
    """Validate a GEMM tile shape: rows >= 1, columns a positive multiple of 64.

    Columns a multiple of 64: every element of a tile then goes through the same
    vectorised code (no scalar tail), so fused operations round the same everywhere.
    """
    try:
        tm, tn = (int(t) for t in tile)
    except (TypeError, ValueError):
        raise ValueError(f"tile={tile!r}: expected (rows, cols)") from None
    if tm < 1 or tn < 64 or tn % 64:
        raise ValueError(f"tile={tuple(tile)}: expected rows >= 1 and cols a positive multiple of 64")
    return tm, tn


class BlockKernel:
    """Computes distance blocks tile by tile: fixed tile shape, per-worker scratch buffers.

    Use inside :func:`kernel_threads` (which sets ``workers``); :meth:`block` spreads a
    block's tile columns over ``workers`` threads. Call :meth:`close` when done.
    ``device``: where the chunks and the scratch live (CUDA: one worker; the torch ops
    run there, the compiled CPU loops do not).
    """

    def __init__(self, spec: DistanceSpec, tile: tuple[int, int] = DEFAULT_TILE, bf16: bool = False,
                 workers: int = 1, device: torch.device | str = "cpu") -> None:
        tm, tn = check_tile(tile)
        self.spec, self.tm, self.tn, self.bf16 = spec, tm, tn, bf16
        self.lam = spec.lam_value
        self.device = torch.device(device)
        self.workers = max(1, int(workers)) if self.device.type == "cpu" else 1
        # the compiled tile loops (same bits, one pass each) unless PVEN_NATIVE=0 / no compiler
        self.native = self.device.type == "cpu" and native.available()
        self._scratch = [self._new_scratch() for _ in range(self.workers)]
        self._pool: ThreadPoolExecutor | None = None

    def _new_scratch(self) -> dict[str, torch.Tensor]:
        s = {k: torch.empty(self.tm, self.tn, device=self.device)
             for k in ("dg", "rg", "num", "tmp", "r", "den", "out", "floor")}
        if self.bf16:
            s["t16"] = torch.empty(self.tm, self.tn, dtype=torch.bfloat16, device=self.device)
        return s

    def pool(self) -> ThreadPoolExecutor | None:
        """The kernel's worker pool (None with one worker), for other per-block work."""
        if self.workers == 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pven-tile")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _gram(self, qa: torch.Tensor, ga: torch.Tensor, qn: torch.Tensor | None, gn: torch.Tensor | None,
              out: torch.Tensor, s: dict[str, torch.Tensor]) -> None:
        if not self.bf16:
            torch.mm(qa, ga.T, out=out)
            return
        torch.mm(qa, ga.T, out=s["t16"])    # CPU bf16 GEMM returns bf16: cross term only
        out.copy_(s["t16"])
        out.addmm_(qn, gn.T)                # norm terms in float32 (K=2)

    def _weight_sums(self, q: Chunk, rs: slice, g: Chunk, cs: slice, den: torch.Tensor) -> None:
        torch.mm(q.w[rs], g.w[cs].T, out=den)

    def tile(self, q: Chunk, rs: slice, g: Chunk, cs: slice, out: torch.Tensor,
             s: dict[str, torch.Tensor] | None = None) -> None:
        """Distances of query rows ``rs`` x gallery rows ``cs`` (one tile) into ``out`` (tm, tn).

        Square roots are taken as ``max(x, 0) * rsqrt(max(x, FLT_MIN))`` (exact 0 for
        x <= 0; torch's vectorised sqrt is ~6x slower on exact zeros, and weighted part
        distances are mostly zeros), with the multiply fused into the accumulation.
        """
        s = s if s is not None else self._scratch[0]
        if self.native:
            self._tile_native(q, rs, g, cs, out, s)
            return
        spec = self.spec
        dg, rg = s["dg"], s["rg"]
        if spec.uses_global:
            self._gram(q.gA[rs], g.gA[cs], q.gN[rs] if self.bf16 else None,
                       g.gN[cs] if self.bf16 else None, dg, s)
            if not spec.squared:
                torch.clamp_min(dg, _FLT_MIN, out=rg)
                rg.rsqrt_()
            dg.clamp_min_(0)                   # D_g = dg (squared) or dg * rg
            if spec.mode == "global":
                out.copy_(dg) if spec.squared else torch.mul(dg, rg, out=out)
                return
        num, tmp, r = s["num"], s["tmp"], s["r"]
        for i in range(NUM_PARTS):
            self._gram(q.pA[i, rs], g.pA[i, cs], q.pN[i, rs] if self.bf16 else None,
                       g.pN[i, cs] if self.bf16 else None, tmp, s)
            torch.clamp_min(tmp, _FLT_MIN, out=r)
            r.rsqrt_()
            tmp.clamp_min_(0)
            if spec.part_root:
                # tmp = sqrt(tmp) = (w_p w_q)^2 ||x - y||, floored as the authors' euclidean_dist
                # floors ||x - y||^2 at 1e-12 (so ||x - y|| >= 1e-6); the sum below takes the second root.
                tmp.mul_(r)
                floor = s["floor"]
                torch.mm(q.w[rs, i:i + 1], g.w[cs, i:i + 1].T, out=floor)
                floor.mul_(floor)
                floor.mul_(_ROOT_FLOOR)
                torch.maximum(tmp, floor, out=tmp)
                torch.clamp_min(tmp, _FLT_MIN, out=r)
                r.rsqrt_()
            if i == 0:                         # num = sum_i w_p,i w_q,i d(f_p,i, f_q,i)
                torch.mul(tmp, r, out=num)
            else:
                num.addcmul_(tmp, r)
        den = s["den"]
        self._weight_sums(q, rs, g, cs, den)   # sum_i w_p,i w_q,i: 0 or >= MIN_WEIGHT**2
        # no common visible part: den == 0 and num == 0 exactly, so num / floor = 0 (D_l = 0)
        den.clamp_min_(_DEN_FLOOR)
        if spec.mode == "local":
            torch.div(num, den, out=out)
            return
        num.div_(den)
        if spec.local_sq:
            num.mul_(num)
        if self.lam != 1.0:
            num.mul_(self.lam)
        if spec.squared:
            torch.add(num, dg, out=out)
        else:
            torch.addcmul(num, dg, rg, out=out)

    def _tile_native(self, q: Chunk, rs: slice, g: Chunk, cs: slice, out: torch.Tensor,
                     s: dict[str, torch.Tensor]) -> None:
        """:meth:`tile` with the elementwise steps in ``native.c``: the same GEMMs, the same
        float operations in the same order, one pass over the tile per part and one to finish."""
        spec = self.spec
        dg = None
        if spec.uses_global:
            dg = s["dg"]
            self._gram(q.gA[rs], g.gA[cs], q.gN[rs] if self.bf16 else None, g.gN[cs] if self.bf16 else None, dg, s)
            if spec.mode == "global":
                native.finish(out, None, None, dg, "global", spec.squared, False, 1.0)
                return
        num, tmp, den = s["num"], s["tmp"], s["den"]
        for i in range(NUM_PARTS):
            self._gram(q.pA[i, rs], g.pA[i, cs], q.pN[i, rs] if self.bf16 else None,
                       g.pN[i, cs] if self.bf16 else None, tmp, s)
            native.part_accum(num, tmp, i == 0, spec.part_root, q.w[rs, i], g.w[cs, i])
        self._weight_sums(q, rs, g, cs, den)
        native.finish(out, num, den, dg, spec.mode, spec.squared, spec.local_sq, self.lam)

    def block(self, q: Chunk, g: Chunk, out: torch.Tensor | None,
              hook: Callable[[int, int, int, torch.Tensor], None] | None = None) -> None:
        """All tiles of ``q`` x ``g``; pads must be tile multiples.

        With ``out`` (q.n_pad, g.n_pad) the distances are written there. With
        ``out=None`` each tile goes to the worker's scratch and ``hook(worker, i0, j0,
        tile)`` consumes it right away, on the worker thread, while it is in cache
        (the streaming evaluator counts candidate negatives this way).
        """
        if q.n_pad % self.tm or g.n_pad % self.tn:
            raise ValueError(f"chunk padding {q.n_pad}x{g.n_pad} is not a multiple of the tile {self.tm}x{self.tn}")
        if out is None and hook is None:
            raise ValueError("block() needs out or hook")
        # column-major: consecutive tiles share a gallery tile; worker w takes every workers-th
        tiles = [(i0, j0) for j0 in range(0, g.n_pad, self.tn) for i0 in range(0, q.n_pad, self.tm)]

        def work(w: int) -> None:
            s = self._scratch[w]
            for i0, j0 in tiles[w::self.workers]:
                rs, cs = slice(i0, i0 + self.tm), slice(j0, j0 + self.tn)
                dst = out[rs, cs] if out is not None else s["out"]
                self.tile(q, rs, g, cs, dst, s)
                if hook is not None:
                    hook(w, i0, j0, dst)

        if self.workers == 1 or len(tiles) == 1:
            work(0)
            return
        pool = self.pool()
        for f in [pool.submit(work, w) for w in range(min(self.workers, len(tiles)))]:
            f.result()
