"""Distances between ReID feature sets: Euclidean and PVEN's view-aware distance (method.md §3, §5).

Shapes: global features ``(N, Cg)``, part features ``(N, 4, Cp)`` (front, back, side,
top), visibilities ``(N, 4)`` (mask pixel counts or any non-negative scores).

PVEN local distance between images p and q (eq. 3-4)::

    a_i(p, q) = v_i^p v_i^q / sum_j v_j^p v_j^q
    D_l(p, q) = sum_i a_i(p, q) * ||f_i^p - f_i^q||         (0 if no part is visible in both)
    D(p, q)   = D_g(p, q) + lam * D_l(p, q)

Variants (:class:`DistanceSpec`):

* ``paper`` (default): raw features, ``D_g = ||g^p - g^q||`` (Euclidean), ``lam = 1``.
* ``official``: what the authors' public code evaluates (``Clck_R1_mAP`` and
  ``clck_dist`` in ``examples/parsing_reid/math_tools.py``, model in ``model.py``):
  visibilities ``v + 1`` (their "Laplace smoothing"), global and part features
  L2-normalised (``feat_norm``), per-part distance ``sqrt`` of their squared-distance
  routine, i.e. the plain Euclidean distance, ``D_g`` left *squared*, and
  ``D = D_g + 0.5 * D_l``. (method.md words this as "the local term squared"; in the
  code it is the global term that stays squared. Each piece can be overridden:
  ``lam``, ``global_squared``, ``normalize``.)

Every distance here is computed with GEMMs (``||a||^2 + ||b||^2 - 2 a.b``, clamped at
0) and never produces NaN/inf for finite inputs. The kernel (not the torch version)
treats a part whose visibility is below ``MIN_WEIGHT`` (1e-6) of the image's most
visible part as invisible; mask pixel counts are never that small.

Exactness across block sizes: BLAS libraries may round differently for different
matrix shapes (MKL does for small ones). So every GEMM of the evaluation runs on
fixed-shape tiles (``tile``, zero-padded at the edges); within one shape each output
element is computed the same way wherever it sits, hence the same query/gallery pair
gets bitwise the same distance whatever block decomposition, gallery order or block
sizes the caller uses. The elementwise steps run on whole tiles whose width is a
multiple of 64 (no scalar tail, so fused multiply-adds round alike everywhere), and
per-row constants (norms, weights) are computed once per whole feature set.
:func:`pven_distance` (dense) and :mod:`~pipeline.evaluation.streaming` share this
kernel, which is what makes streaming metrics equal dense metrics.

The norm terms ride inside the GEMM: a query row ``[-2 a x, a |x|^2, a]`` dotted with
a gallery row ``[b y, b, b |y|^2]`` gives ``a b ||x - y||^2``; with ``a = w_p^2``,
``b = w_q^2`` (per-part visibility weights) the square root is directly the weighted
part distance ``w_p w_q ||x - y||``. Visibilities are rescaled per image to a maximum
of 1 first (the attention ``a_i`` is invariant to that), which keeps these products
far from float32 overflow.

:func:`pven_distance_torch` is the differentiable form (plain torch ops on
:mod:`pipeline.reid.distance`, the training loss's implementation; NaN-free gradients).
"""
from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_TILE", "MODES", "VARIANTS", "NUM_PARTS", "DistanceSpec", "FeatureSet",
           "PreparedSet", "Chunk", "BlockKernel", "kernel_threads", "check_tile", "MIN_WEIGHT",
           "pven_distance", "euclidean_distance",
           "pair_distance", "pven_distance_torch"]

NUM_PARTS = 4
MODES = ("global", "local", "pven")
VARIANTS = ("paper", "official")
# (rows, cols) of every GEMM output. 256 rows amortise MKL's packing of the gallery
# tile; 512 columns keep a tile's float32 scratch (512 KiB) in L2.
DEFAULT_TILE = (256, 512)
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize
_NORM_ROWS = 4096  # fixed row chunk for per-row reductions (keeps them reproducible)
MIN_WEIGHT = 1e-6  # visibility below this fraction of an image's most visible part = invisible
_DEN_FLOOR = 1e-30  # < MIN_WEIGHT**2: clamping the attention denominator to it only touches 0
_FLT_MIN = float(torch.finfo(torch.float32).tiny)


@dataclasses.dataclass(frozen=True)
class DistanceSpec:
    """Which distance ranks the gallery.

    mode:     ``global`` (D_g), ``local`` (D_l) or ``pven`` (D_g + lam * D_l)
    variant:  ``paper`` or ``official`` (see module doc)
    lam:      weight of D_l in ``pven`` mode; None: 1.0 (paper) / 0.5 (official)
    global_squared: rank on squared D_g; None: False (paper) / True (official)
    normalize: L2-normalise global and part features; None: False (paper) / True (official)
    """
    mode: str = "pven"
    variant: str = "paper"
    lam: float | None = None
    global_squared: bool | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DistanceSpec.mode={self.mode!r}: expected one of {MODES}")
        if self.variant not in VARIANTS:
            raise ValueError(f"DistanceSpec.variant={self.variant!r}: expected one of {VARIANTS}")
        if self.lam is not None and not (np.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"DistanceSpec.lam={self.lam!r}: expected a finite number >= 0")

    @property
    def official(self) -> bool:
        return self.variant == "official"

    @property
    def lam_value(self) -> float:
        return float(self.lam) if self.lam is not None else (0.5 if self.official else 1.0)

    @property
    def squared(self) -> bool:
        return self.global_squared if self.global_squared is not None else self.official

    @property
    def l2norm(self) -> bool:
        return self.normalize if self.normalize is not None else self.official

    @property
    def vis_offset(self) -> float:
        return 1.0 if self.official else 0.0

    @property
    def uses_global(self) -> bool:
        return self.mode in ("global", "pven")

    @property
    def uses_local(self) -> bool:
        return self.mode in ("local", "pven")


def _to_tensor(name: str, x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name}: expected a numeric array, got dtype object")
    return torch.from_numpy(arr)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
    """Embeddings of N images with their labels (numpy arrays or torch tensors).

    ids:          (N,) vehicle ids (ints or strings)
    cams:         (N,) camera ids, -1 where unknown, or None (no cameras, e.g. VehicleID)
    global_feats: (N, Cg) float, or None if only ``local`` mode is used
    part_feats:   (N, 4, Cp) float, or None if only ``global`` mode is used
    visibility:   (N, 4) float >= 0 (part mask areas), required with part_feats
    """
    ids: Any
    cams: Any = None
    global_feats: Any = None
    part_feats: Any = None
    visibility: Any = None

    def __post_init__(self) -> None:
        ids = self.ids.detach().cpu().numpy() if isinstance(self.ids, torch.Tensor) else np.asarray(self.ids)
        if ids.ndim != 1:
            raise ValueError(f"FeatureSet.ids: expected shape (N,), got {ids.shape}")
        n = ids.shape[0]
        object.__setattr__(self, "ids", ids)
        if self.cams is not None:
            cams = self.cams.detach().cpu().numpy() if isinstance(self.cams, torch.Tensor) else np.asarray(self.cams)
            if cams.shape != (n,):
                raise ValueError(f"FeatureSet.cams: expected shape ({n},), got {cams.shape}")
            object.__setattr__(self, "cams", cams)
        if self.global_feats is None and self.part_feats is None:
            raise ValueError("FeatureSet: needs global_feats and/or part_feats")
        if self.global_feats is not None:
            g = _to_tensor("FeatureSet.global_feats", self.global_feats)
            if g.ndim != 2 or g.shape[0] != n or not g.is_floating_point():
                raise ValueError(f"FeatureSet.global_feats: expected float (N={n}, Cg), got "
                                 f"{tuple(g.shape)} {g.dtype}")
        if self.part_feats is not None:
            p = _to_tensor("FeatureSet.part_feats", self.part_feats)
            if p.ndim != 3 or p.shape[:2] != (n, NUM_PARTS) or not p.is_floating_point():
                raise ValueError(f"FeatureSet.part_feats: expected float (N={n}, {NUM_PARTS}, Cp), got "
                                 f"{tuple(p.shape)} {p.dtype}")
            if self.visibility is None:
                raise ValueError("FeatureSet.visibility: required with part_feats")
            v = _to_tensor("FeatureSet.visibility", self.visibility)
            if tuple(v.shape) != (n, NUM_PARTS):
                raise ValueError(f"FeatureSet.visibility: expected shape ({n}, {NUM_PARTS}), got {tuple(v.shape)}")
            bad = ~torch.isfinite(v.double()) | (v.double() < 0)
            if bad.any():
                i, j = (int(t) for t in bad.nonzero()[0])
                raise ValueError(f"FeatureSet.visibility: {int(bad.sum())} entries are negative or not "
                                 f"finite (first: image {i}, part {j}, value {float(v[i, j])})")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def subset(self, index: Any) -> "FeatureSet":
        """The images at ``index`` (int array / slice / bool mask), same field types."""
        idx = np.arange(len(self))[index] if not isinstance(index, slice) else index

        def take(x: Any) -> Any:
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return x[torch.as_tensor(idx) if not isinstance(idx, slice) else idx]
            return np.asarray(x)[idx]
        return FeatureSet(take(self.ids), take(self.cams), take(self.global_feats),
                          take(self.part_feats), take(self.visibility))

    @staticmethod
    def concat(sets: Sequence["FeatureSet"]) -> "FeatureSet":
        """Stack several sets (e.g. query + gallery for re-ranking) as numpy/torch like the first."""
        def cat(name: str) -> Any:
            vals = [getattr(s, name) for s in sets]
            if any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"FeatureSet.concat: {name} is missing in some sets")
                return None
            if isinstance(vals[0], torch.Tensor):
                return torch.cat([_to_tensor(name, v) for v in vals])
            return np.concatenate([np.asarray(v) for v in vals])
        return FeatureSet(cat("ids"), cat("cams"), cat("global_feats"), cat("part_feats"), cat("visibility"))


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
    t = _to_tensor(name, x).cpu().float()
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

    def rows(self, r0: int, r1: int) -> "Chunk":
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
            v = _to_tensor("visibility", fs.visibility).cpu().double() + spec.vis_offset
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
        div = torch.sqrt(sq).clamp_min(_NORM_EPS)
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
                self._layout(self.p[:, i], index, idx_np, self.p_sq[index, i],
                             None if self.p_div is None else self.p_div[index, i],
                             w[:, i] * w[:, i], role, out.pA[i], None if out.pN is None else out.pN[i])
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


_THREADS_DEPTH = [0, 1]   # nesting depth of kernel_threads, worker count of the outermost


@contextlib.contextmanager
def kernel_threads() -> Iterator[int]:
    """While active, torch ops run single-threaded with denormals flushed to zero.

    The kernel parallelises over tiles with its own threads instead (one tile per
    core, each GEMM and its elementwise tail on the same core: elementwise ops on a
    tile are too small for OpenMP to pay off). Yields the worker count (the torch
    thread count on entry of the outermost use). Restores both settings on exit;
    nested uses leave them to the outermost.
    """
    if _THREADS_DEPTH[0]:
        _THREADS_DEPTH[0] += 1
        try:
            yield _THREADS_DEPTH[1]
        finally:
            _THREADS_DEPTH[0] -= 1
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    _THREADS_DEPTH[:] = [1, n]
    try:
        yield n
    finally:
        _THREADS_DEPTH[0] = 0
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(n)


class BlockKernel:
    """Computes distance blocks tile by tile: fixed tile shape, per-worker scratch buffers.

    Use inside :func:`kernel_threads` (which sets ``workers``); :meth:`block` spreads a
    block's tile columns over ``workers`` threads. Call :meth:`close` when done.
    """

    def __init__(self, spec: DistanceSpec, tile: tuple[int, int] = DEFAULT_TILE, bf16: bool = False,
                 workers: int = 1) -> None:
        tm, tn = check_tile(tile)
        self.spec, self.tm, self.tn, self.bf16 = spec, tm, tn, bf16
        self.lam = spec.lam_value
        self.workers = max(1, int(workers))
        self._scratch = [self._new_scratch() for _ in range(self.workers)]
        self._pool: ThreadPoolExecutor | None = None

    def _new_scratch(self) -> dict[str, torch.Tensor]:
        s = {k: torch.empty(self.tm, self.tn) for k in ("dg", "rg", "num", "tmp", "r", "den", "out")}
        if self.bf16:
            s["t16"] = torch.empty(self.tm, self.tn, dtype=torch.bfloat16)
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

    def tile(self, q: Chunk, rs: slice, g: Chunk, cs: slice, out: torch.Tensor,
             s: dict[str, torch.Tensor] | None = None) -> None:
        """Distances of query rows ``rs`` x gallery rows ``cs`` (one tile) into ``out`` (tm, tn).

        Square roots are taken as ``max(x, 0) * rsqrt(max(x, FLT_MIN))`` (exact 0 for
        x <= 0; torch's vectorised sqrt is ~6x slower on exact zeros, and weighted part
        distances are mostly zeros), with the multiply fused into the accumulation.
        """
        s = s if s is not None else self._scratch[0]
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
            if i == 0:                         # num = sum_i w_p,i w_q,i ||f_p,i - f_q,i||
                torch.mul(tmp, r, out=num)
            else:
                num.addcmul_(tmp, r)
        den = s["den"]
        torch.mm(q.w[rs], g.w[cs].T, out=den)  # sum_i w_p,i w_q,i: 0 or >= MIN_WEIGHT**2
        # no common visible part: den == 0 and num == 0 exactly, so num / floor = 0 (D_l = 0)
        den.clamp_min_(_DEN_FLOOR)
        if spec.mode == "local":
            torch.div(num, den, out=out)
            return
        num.div_(den)
        if self.lam != 1.0:
            num.mul_(self.lam)
        if spec.squared:
            torch.add(num, dg, out=out)
        else:
            torch.addcmul(num, dg, rg, out=out)

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


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pven_distance(query: FeatureSet, gallery: FeatureSet, spec: DistanceSpec = DistanceSpec(), *,
                  matmul_dtype: torch.dtype | None = None, tile: tuple[int, int] = DEFAULT_TILE,
                  q_block: int = 1024, g_block: int = 8192) -> np.ndarray:
    """Dense (Q, G) float32 distance matrix for ``spec`` (numpy).

    Computed with the same tiled kernel as the streaming evaluator, so its values are
    bitwise those the evaluator ranks (for the same ``spec``, ``tile``, ``matmul_dtype``).
    Memory: the (Q, G) result plus O(q_block x g_block).
    """
    qs = PreparedSet(query, spec, matmul_dtype)
    gs = PreparedSet(gallery, spec, matmul_dtype)
    nq, ng = qs.n, gs.n
    out = np.empty((nq, ng), dtype=np.float32)
    with kernel_threads() as workers:
        kernel = BlockKernel(spec, tile, bf16=matmul_dtype == torch.bfloat16, workers=workers)
        try:
            qb = _round_up(max(1, int(q_block)), kernel.tm)
            gb = _round_up(max(1, int(g_block)), kernel.tn)
            buf = torch.empty(min(qb, _round_up(max(nq, 1), kernel.tm)), min(gb, _round_up(max(ng, 1), kernel.tn)))
            for g0 in range(0, ng, gb):
                g1 = min(ng, g0 + gb)
                gc = gs.chunk(slice(g0, g1), "gallery", _round_up(g1 - g0, kernel.tn), pool=kernel.pool())
                for q0 in range(0, nq, qb):
                    q1 = min(nq, q0 + qb)
                    qc = qs.chunk(slice(q0, q1), "query", _round_up(q1 - q0, kernel.tm), pool=kernel.pool())
                    view = buf[:qc.n_pad, :gc.n_pad]
                    kernel.block(qc, gc, view)
                    out[q0:q1, g0:g1] = view[:q1 - q0, :g1 - g0].numpy()
        finally:
            kernel.close()
    return out


def euclidean_distance(a: Any, b: Any, *, squared: bool = False,
                       tile: tuple[int, int] = DEFAULT_TILE) -> np.ndarray:
    """Dense (Na, Nb) float32 (squared) Euclidean distances between rows of a (Na, C) and b (Nb, C)."""
    ta, tb = _to_tensor("a", a), _to_tensor("b", b)
    if ta.ndim != 2 or tb.ndim != 2 or ta.shape[1] != tb.shape[1]:
        raise ValueError(f"euclidean_distance: expected (Na, C) and (Nb, C), got {tuple(ta.shape)} "
                         f"and {tuple(tb.shape)}")
    spec = DistanceSpec(mode="global", global_squared=squared)
    return pven_distance(FeatureSet(np.zeros(len(ta)), global_feats=ta),
                         FeatureSet(np.zeros(len(tb)), global_feats=tb), spec, tile=tile)


def pair_distance(query: FeatureSet, qi: Any, gallery: FeatureSet, gi: Any,
                  spec: DistanceSpec = DistanceSpec(), chunk: int = 65536) -> np.ndarray:
    """Distances of the pairs ``(query[qi[k]], gallery[gi[k]])`` in float64 (direct differences).

    Reference-quality values for a few pairs (no GEMM, no cancellation); they agree
    with the tiled kernel to float32 rounding, not bitwise.
    """
    qi = np.asarray(qi, dtype=np.int64).reshape(-1)
    gi = np.asarray(gi, dtype=np.int64).reshape(-1)
    if qi.shape != gi.shape:
        raise ValueError(f"pair_distance: qi and gi must have the same length, got {qi.shape} and {gi.shape}")
    out = np.empty(len(qi))
    for s in range(0, len(qi), chunk):
        a, b = torch.from_numpy(qi[s:s + chunk]), torch.from_numpy(gi[s:s + chunk])
        out[s:s + chunk] = _pairs_torch(query, a, gallery, b, spec).numpy()
    return out


def _pairs_torch(q: FeatureSet, a: torch.Tensor, g: FeatureSet, b: torch.Tensor, spec: DistanceSpec) -> torch.Tensor:
    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return F.normalize(x, dim=-1, eps=_NORM_EPS) if spec.l2norm else x
    total = torch.zeros(len(a), dtype=torch.float64)
    if spec.uses_global:
        d2 = ((prep(_to_tensor("global_feats", q.global_feats)[a])
               - prep(_to_tensor("global_feats", g.global_feats)[b])) ** 2).sum(-1)
        dg = d2 if spec.squared else d2.sqrt()
        if spec.mode == "global":
            return dg
        total = dg
    dp = (prep(_to_tensor("part_feats", q.part_feats)[a])
          - prep(_to_tensor("part_feats", g.part_feats)[b])).pow(2).sum(-1).sqrt()   # (n, 4)
    w = ((_to_tensor("visibility", q.visibility)[a].double() + spec.vis_offset)
         * (_to_tensor("visibility", g.visibility)[b].double() + spec.vis_offset))
    den = w.sum(-1)
    dl = torch.where(den > 0, (w * dp).sum(-1) / torch.where(den > 0, den, 1.0), 0.0)
    if spec.mode == "local":
        return dl
    return total + spec.lam_value * dl


# --------------------------------------------------------------------------- torch / autograd

def pven_distance_torch(q_global: torch.Tensor | None, q_parts: torch.Tensor | None, q_vis: torch.Tensor | None,
                        g_global: torch.Tensor | None = None, g_parts: torch.Tensor | None = None,
                        g_vis: torch.Tensor | None = None, spec: DistanceSpec = DistanceSpec()) -> torch.Tensor:
    """Differentiable (Nq, Ng) distance for ``spec`` between two batches (any device/dtype).

    q_global (Nq, Cg), q_parts (Nq, 4, Cp), q_vis (Nq, 4); the ``g_*`` default to the
    query tensors (all pairs within one batch, as the batch-hard triplet losses need).
    Same formulas as :func:`pven_distance`, built from the training loss's own
    :mod:`pipeline.reid.distance` (one implementation of D_l): gradients are finite
    everywhere, zero distances come out as ~1e-6 (the square root is floored there)
    and pairs without a common visible part get D_l = 0.
    """
    from pipeline.reid.distance import euclidean, local_distance, squared_euclidean
    if g_global is None and g_parts is None:
        g_global, g_parts, g_vis = q_global, q_parts, q_vis
    dg = None
    if spec.uses_global:
        if q_global is None or g_global is None:
            raise ValueError(f"mode {spec.mode!r} needs global features")
        qg, gg = q_global, g_global
        if spec.l2norm:
            qg, gg = F.normalize(qg, dim=-1, eps=_NORM_EPS), F.normalize(gg, dim=-1, eps=_NORM_EPS)
        dg = squared_euclidean(qg, gg) if spec.squared else euclidean(qg, gg)
        if spec.mode == "global":
            return dg
    if q_parts is None or g_parts is None or q_vis is None or g_vis is None:
        raise ValueError(f"mode {spec.mode!r} needs part features and visibilities")
    dl, _ = local_distance(q_parts, q_vis, g_parts, g_vis, normalize=spec.l2norm, vis_offset=spec.vis_offset)
    if spec.mode == "local":
        return dl
    return dg + spec.lam_value * dl
