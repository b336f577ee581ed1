"""Embeddings with their labels: :class:`FeatureSet`, and the on-disk embedding folder.

A folder ``<dir>/<split>/`` (written by :func:`write_feature_folder`, e.g. by the
evaluate stage) holds ``global.npy`` (N, C) float32, ``local.npy`` (N, 4, C) float32,
``visibility.npy`` (N, 4) float32 (mask cells of each view on the feature map),
``ids.npy`` (N,) int64, ``cams.npy`` (N,) int64 (-1: unknown), ``keys.txt`` (one
sample key a line) and, only for a dataset with view angles (the synthetic set),
``views.npy`` (N,) float64: the azimuth in degrees (the renderer's convention: 0 front,
90 left side, +-180 back; values in (-180, 180]), NaN where unknown. A folder without
``views.npy`` loads with ``views=None``. The folder is built under a temporary name and
swapped in. :func:`merge_part_files` builds one from part files (one rank's or one shard's
share each) holding one part in memory at a time, through memory-mapped ``.npy`` files: a
million-image index needs no more memory than its largest part.
"""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic
from pipeline.constants import NUM_PARTS

__all__ = ["ARRAYS", "VIEWS", "FeatureSet", "as_tensor", "load_features", "merge_part_files",
           "write_feature_folder"]

ARRAYS = ("global", "local", "visibility", "ids", "cams")
VIEWS = "views"   # the optional array: views.npy, written only when the split has view angles


def as_tensor(name: str, x: Any) -> torch.Tensor:
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
    views:        (N,) float azimuth in degrees (0 front, 90 left side, +-180 back, in
                  (-180, 180]), NaN where unknown; None for a dataset without views
    """
    ids: Any
    cams: Any = None
    global_feats: Any = None
    part_feats: Any = None
    visibility: Any = None
    views: Any = None

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
        if self.views is not None:
            views = self.views
            views = views.detach().cpu().numpy() if isinstance(views, torch.Tensor) else np.asarray(views)
            if views.shape != (n,) or views.dtype.kind not in "fiu":
                raise ValueError(f"FeatureSet.views: expected a numeric array of shape ({n},), got "
                                 f"{views.shape} {views.dtype}")
            views = views.astype(np.float64)
            bad = np.isfinite(views) & ((views <= -180.0) | (views > 180.0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"FeatureSet.views: {int(bad.sum())} azimuths outside (-180, 180] degrees "
                                 f"(first: image {i}, value {views[i]})")
            object.__setattr__(self, "views", views)
        if self.global_feats is None and self.part_feats is None:
            raise ValueError("FeatureSet: needs global_feats and/or part_feats")
        if self.global_feats is not None:
            g = as_tensor("FeatureSet.global_feats", self.global_feats)
            if g.ndim != 2 or g.shape[0] != n or not g.is_floating_point():
                raise ValueError(f"FeatureSet.global_feats: expected float (N={n}, Cg), got "
                                 f"{tuple(g.shape)} {g.dtype}")
        if self.part_feats is not None:
            p = as_tensor("FeatureSet.part_feats", self.part_feats)
            if p.ndim != 3 or p.shape[:2] != (n, NUM_PARTS) or not p.is_floating_point():
                raise ValueError(f"FeatureSet.part_feats: expected float (N={n}, {NUM_PARTS}, Cp), got "
                                 f"{tuple(p.shape)} {p.dtype}")
            if self.visibility is None:
                raise ValueError("FeatureSet.visibility: required with part_feats")
            v = as_tensor("FeatureSet.visibility", self.visibility)
            if tuple(v.shape) != (n, NUM_PARTS):
                raise ValueError(f"FeatureSet.visibility: expected shape ({n}, {NUM_PARTS}), got {tuple(v.shape)}")
            bad = ~torch.isfinite(v.double()) | (v.double() < 0)
            if bad.any():
                i, j = (int(t) for t in bad.nonzero()[0])
                raise ValueError(f"FeatureSet.visibility: {int(bad.sum())} entries are negative or not "
                                 f"finite (first: image {i}, part {j}, value {float(v[i, j])})")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def subset(self, index: Any) -> FeatureSet:
        """The images at ``index`` (int array / slice / bool mask), same field types."""
        idx = np.arange(len(self))[index] if not isinstance(index, slice) else index

        def take(x: Any) -> Any:
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return x[torch.as_tensor(idx) if not isinstance(idx, slice) else idx]
            return np.asarray(x)[idx]
        return FeatureSet(take(self.ids), take(self.cams), take(self.global_feats),
                          take(self.part_feats), take(self.visibility), take(self.views))

    @staticmethod
    def concat(sets: Sequence[FeatureSet]) -> FeatureSet:
        """Stack several sets (e.g. query + gallery for re-ranking) as numpy/torch like the first.

        ``views`` (optional metadata) are kept only when every set has them, else None.
        """
        def cat(name: str) -> Any:
            vals = [getattr(s, name) for s in sets]
            if name == "views" and any(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"FeatureSet.concat: {name} is missing in some sets")
                return None
            if isinstance(vals[0], torch.Tensor):
                return torch.cat([as_tensor(name, v) for v in vals])
            return np.concatenate([np.asarray(v) for v in vals])
        return FeatureSet(cat("ids"), cat("cams"), cat("global_feats"), cat("part_feats"), cat("visibility"),
                          cat("views"))


def write_feature_folder(folder: Path, arrays: dict[str, np.ndarray], keys: Sequence[str]) -> Path:
    """Write one split's :data:`ARRAYS` and keys as ``folder`` (staged beside it, then swapped in).

    ``arrays[VIEWS]`` (azimuths, NaN where unknown), when present and not None, is written
    as ``views.npy`` (float64); without it the folder has no ``views.npy``.
    """
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.merged")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ARRAYS:
        np.save(staging / f"{name}.npy", arrays[name])
    if arrays.get(VIEWS) is not None:
        np.save(staging / f"{VIEWS}.npy", np.asarray(arrays[VIEWS], dtype=np.float64))
    atomic.write_text(staging / "keys.txt", "".join(f"{k}\n" for k in keys))
    atomic.swap_dir(staging, folder)
    return folder


def merge_part_files(parts: Sequence[Path], folder: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Concatenate part files, in the given order, into the embedding folder ``folder``.

    Each part is an ``.npz`` of :data:`ARRAYS`, ``views`` (azimuths, NaN where unknown) and
    ``keys``. The result equals :func:`write_feature_folder` of the concatenated arrays
    (``views.npy`` only when some image has a view), built in a staging folder beside
    ``folder`` and swapped in; one part's arrays are in memory at a time.
    """
    folder = Path(folder)
    if not parts:
        raise ValueError(f"{folder}: no part files to merge")
    counts, has_views = [], False
    for part in parts:
        with np.load(part) as z:
            counts.append(len(z["ids"]))
            has_views |= bool(np.isfinite(z[VIEWS]).any())
    with np.load(parts[0]) as z:
        layout = {name: (z[name].dtype, z[name].shape[1:]) for name in ARRAYS}
    names = [*ARRAYS, VIEWS] if has_views else list(ARRAYS)
    layout[VIEWS] = (np.dtype(np.float64), ())
    staging = folder.with_name(f".{folder.name}.merged")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    total = int(sum(counts))
    out = {name: np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=layout[name][0],
                                           shape=(total, *layout[name][1])) for name in names}
    start = 0
    with open(staging / "keys.txt", "w") as keys:
        for part, n in zip(parts, counts):
            with np.load(part) as z:
                for name in names:
                    out[name][start:start + n] = z[name]
                keys.writelines(f"{k}\n" for k in z["keys"].tolist())
            start += n
    for array in out.values():
        array.flush()
    del out
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    atomic.swap_dir(staging, folder)
    return folder


def load_features(folder: Path) -> tuple[FeatureSet, list[str]]:
    """An embedding folder -> (FeatureSet with global, part features, visibilities and views, keys).

    ``views`` is None when the folder has no ``views.npy``.
    """
    folder = Path(folder)
    missing = [n for n in ARRAYS if not (folder / f"{n}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(m + '.npy' for m in missing)}")
    a = {name: np.load(folder / f"{name}.npy") for name in ARRAYS}
    views = np.load(folder / f"{VIEWS}.npy") if (folder / f"{VIEWS}.npy").is_file() else None
    keys = (folder / "keys.txt").read_text().splitlines()
    return FeatureSet(a["ids"], a["cams"], a["global"], a["local"], a["visibility"], views), keys
