"""The evaluation kernel's compiled tile loops (``native.c``): built once with the system C compiler, cached.

Why: the pure-torch tile path makes one pass over a (256, 512) tile per torch op (about 20
in PVEN mode) and counts negatives with several numpy passes; ``native.c`` does each step in
one pass, with the same float operations in the same order (so the same bits; pinned by
``tests/test_evaluation_native.py``) and the same integer counts.

Build: ``$CC`` (default ``cc``) with ``-O3 -ffp-contract=off -fno-math-errno -fno-trapping-math``
(+ ``-mavx2 -mfma`` where the CPU has both; the last two ``-f`` flags change no result in the
default floating-point environment, they only let GCC vectorise), into ``$PVEN_NATIVE_CACHE`` (default
``$TORCH_EXTENSIONS_DIR/pven_native`` or ``~/.cache/pven-pipeline/native``), named by the
hash of source, compiler, flags and machine, so nodes of a cluster sharing the cache
never load a library built for another CPU. It is compiled to a temporary name and
renamed: processes building at once each finish with a complete file.

``PVEN_NATIVE``: ``auto`` (default: use it when it builds, else the torch path, with one
warning), ``0`` (never), ``1`` (required: an error if it cannot be built; CI sets this).
Calls go through ctypes, which releases the GIL, so the kernel's worker threads run
them in parallel.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["NativeError", "available", "count_tile", "finish", "lib", "part_accum"]

SOURCE = Path(__file__).with_name("native.c")
_BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "pven_part_accum": (None, [_P, _P, _I, _I, ctypes.c_int, ctypes.c_int, _P, _P]),
    "pven_finish": (None, [_P, _I, _P, _P, _P, _I, _I, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float]),
    "pven_count_tile": (_I, [_P, _I, _I, _I, _P, _P, _I, _P, _P, _P, _P, _P]),
}


class NativeError(RuntimeError):
    """The compiled kernel was required (``PVEN_NATIVE=1``) but could not be built or loaded."""


def _mode() -> str:
    mode = os.environ.get("PVEN_NATIVE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"PVEN_NATIVE={mode!r}: expected auto, 0 or 1")
    return mode


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    if os.environ.get("PVEN_NATIVE_CACHE"):
        return Path(os.environ["PVEN_NATIVE_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "pven_native"
    return Path.home() / ".cache" / "pven-pipeline" / "native"


def build() -> Path:
    """Compile ``native.c`` (or find it in the cache); the shared library's path. Raises NativeError."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise NativeError(f"no C compiler: {cc!r} is not on PATH (set CC, or PVEN_NATIVE=0 for the torch path)")
    flags, cpu = list(_BASE_FLAGS), _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeError(f"{cc} --version failed: {e}") from None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, " ".join(flags), platform.machine(),
                                    " ".join(sorted(cpu))]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"pven_native_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise NativeError(f"compiling {SOURCE} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    except subprocess.SubprocessError as e:
        raise NativeError(f"compiling {SOURCE} with {cc} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _load(mode: str) -> ctypes.CDLL | None:
    if mode == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        return lib
    except (NativeError, OSError, AttributeError) as e:
        if mode == "1":
            raise NativeError(f"PVEN_NATIVE=1 but the compiled kernel is unavailable: {e}") from None
        warnings.warn(f"evaluation runs its pure-torch tile path (same results, slower): {e}", stacklevel=3)
        return None


def lib() -> ctypes.CDLL | None:
    """The loaded library, or None when ``PVEN_NATIVE`` is 0 or (auto) it cannot be built."""
    return _load(_mode())


def available() -> bool:
    return lib() is not None


def _ptr(t: torch.Tensor | np.ndarray | None) -> int | None:
    if t is None:
        return None
    return t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr()


# The wrappers below are called per tile by the kernel's workers, so they do not check
# their arguments (a few microseconds each would add up to seconds at VERI-Wild size):
# callers pass float32 / int64 CPU arrays of the stated shapes with unit column
# stride, as BlockKernel and TileCounter do.

def part_accum(num: torch.Tensor, t: torch.Tensor, first: bool, part_root: bool = False,
               wq: torch.Tensor | None = None, wg: torch.Tensor | None = None) -> None:
    """``num (+)= max(t, 0) * rsqrt(max(t, FLT_MIN))`` on contiguous (tm, tn) tiles; with
    ``part_root`` the root of the root, floored as the torch path (``wq`` (tm,) / ``wg``
    (tn,) the part's weight columns of (n, 4) arrays, i.e. ``w[:, i]``, stride 4)."""
    rows, cols = t.shape
    _lib().pven_part_accum(num.data_ptr(), t.data_ptr(), rows, cols, int(first), int(part_root),
                           _ptr(wq), _ptr(wg))


_MODES = {"global": 0, "local": 1, "pven": 2}


def finish(out: torch.Tensor, num: torch.Tensor | None, den: torch.Tensor | None, g: torch.Tensor | None,
           mode: str, squared: bool, local_sq: bool, lam: float) -> None:
    """The tile's distances into ``out`` (tm, tn; any row stride) from the part sum ``num``,
    the weight sum ``den`` and the global GEMM output ``g`` (contiguous (tm, tn) tiles;
    None where the mode has no such term)."""
    rows, cols = out.shape
    _lib().pven_finish(out.data_ptr(), out.stride(0), _ptr(num), _ptr(den), _ptr(g), rows, cols, _MODES[mode],
                       int(squared), int(local_sq), float(lam))


def count_tile(tile: np.ndarray, pmax: np.ndarray, ppad: np.ndarray, npos: np.ndarray, seg_start: np.ndarray,
               q_codes: np.ndarray | None, g_codes: np.ndarray | None, hist: np.ndarray) -> int:
    """Count a (rows, cols) float32 tile's candidate negatives into ``hist`` (see ``native.c``);
    the number of candidates.

    ``tile`` may have any row stride; ``pmax`` (rows,) and ``ppad`` (rows, stride) float32,
    ``npos`` / ``seg_start`` (rows,), codes (rows,) / (cols,) and ``hist`` int64, C-contiguous.
    """
    rows, cols = tile.shape
    return _lib().pven_count_tile(tile.ctypes.data, tile.strides[0] // 4, rows, cols, pmax.ctypes.data,
                                  ppad.ctypes.data, ppad.shape[1], npos.ctypes.data, seg_start.ctypes.data,
                                  _ptr(q_codes), _ptr(g_codes), hist.ctypes.data)


def _lib() -> ctypes.CDLL:
    handle = lib()
    if handle is None:
        raise NativeError("the compiled kernel is not available (PVEN_NATIVE=0 or it failed to build)")
    return handle
