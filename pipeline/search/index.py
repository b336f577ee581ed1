"""A search index: an embedding folder in the evaluate stage's format, plus ``index.json``.

``INDEX/`` holds ``global.npy`` (N, C), ``local.npy`` (N, 4, C), ``visibility.npy`` (N, 4),
``ids.npy`` / ``cams.npy`` (N,) (-1 for images of a folder, which carry no labels),
``keys.txt`` (a folder image's path relative to the folder, or a shard sample's key) and
``index.json``::

    {"format": 1, "count": N, "model": {sha256, variant, feat_dim, image_size, distance},
     "backend": "torch" | "onnx", "source": {"kind": "folder" | "shards", "root", "split"},
     "skipped": ["<file>: <reason>", ...]}

Built by :func:`build_index` (every rank embeds its share of the images, one part file per
job; rank 0 merges them one at a time and swaps the folder in with its ``index.json``: an
interrupted build leaves no index, or the previous one). Read by :func:`index_blocks`
(memory-mapped, one block of rows at a time) and :func:`keys_at` (only the lines asked for).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import InputError
from pipeline.constants import NUM_PARTS
from pipeline.data.shards import MANIFEST, shard_urls
from pipeline.dist.env import DistInfo, barrier
from pipeline.evaluation.features import ARRAYS, FeatureSet, merge_part_files
from pipeline.reid.embed import embed_parts, embed_shards
from pipeline.search.encoder import Encoder
from pipeline.search.images import ImageError, list_images, read_image

INDEX_FILE = "index.json"
INDEX_FORMAT = 1


def build_index(source: Path, out: Path, encoder: Encoder, info: DistInfo, *, split: str | None = None,
                batch_size: int = 32, part_size: int = 512, skip_bad: bool = False) -> dict[str, Any] | None:
    """Index a folder of images, or one split of masked shards (their stored masks), into ``out``.

    Returns ``index.json``'s record on rank 0 (None elsewhere). A bad image is an
    :class:`~pipeline.search.images.ImageError` naming it, or with ``skip_bad`` left out and
    listed under ``skipped``.
    """
    source, out = Path(source), Path(out)
    if (source / MANIFEST).is_file():
        split = split or "gallery"
        try:
            jobs = shard_urls(source, split)
        except KeyError as exc:
            raise InputError(str(exc.args[0])) from None
        record_source = {"kind": "shards", "root": str(source.resolve()), "split": split}
        size = encoder.image_size

        def embed(url: str) -> dict[str, np.ndarray]:
            return {**embed_shards(encoder.reid, [url], size=size, batch_size=batch_size), "skipped": np.array([], str)}
    else:
        if split is not None:
            raise InputError(f"--split {split}: {source} is a folder of images, not shards (no {MANIFEST})")
        files = list_images(source)
        jobs = [files[i:i + part_size] for i in range(0, len(files), part_size)]
        record_source = {"kind": "folder", "root": str(source.resolve()), "split": None}

        def embed(names: list[str]) -> dict[str, np.ndarray]:
            return _embed_files(encoder, source, names, batch_size, skip_bad)
    staging = out.with_name(f".{out.name}.parts")
    record = None
    try:
        parts = embed_parts(jobs, embed, staging, info, desc=f"index {source.name}")
        if parts is not None:
            skipped, count = [], 0
            for part in parts:
                with np.load(part) as z:
                    skipped += [str(s) for s in z["skipped"].tolist()]
                    count += len(z["ids"])
            if count == 0:
                raise InputError(f"{source}: no image could be indexed ({len(skipped)} skipped, e.g. {skipped[:1]})")
            record = {"format": INDEX_FORMAT, "count": count, "model": encoder.model, "backend": encoder.backend,
                      "source": record_source, "skipped": skipped}
            merge_part_files(parts, out, {INDEX_FILE: json.dumps(record, indent=2) + "\n"})
    finally:
        # The staging parts are rank 0's to remove, after a success and after a bad image alike.
        if info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
    barrier(info)
    return record


def _embed_files(encoder: Encoder, folder: Path, names: list[str], batch_size: int,
                 skip_bad: bool) -> dict[str, np.ndarray]:
    """One job of a folder index: its files read, parsed and embedded in batches -> part arrays."""
    feats: dict[str, list[np.ndarray]] = {"global": [], "local": [], "visibility": []}
    keys, skipped = [], []
    for start in range(0, len(names), batch_size):
        images, batch_keys = [], []
        for name in names[start:start + batch_size]:
            try:
                images.append(read_image(folder / name))
                batch_keys.append(name)
            except ImageError as exc:
                if not skip_bad:
                    raise
                skipped.append(str(exc))
        if images:
            for key, value in encoder.features(images, encoder.masks(images)).items():
                feats[key].append(value)
            keys += batch_keys
    c = int(encoder.model["feat_dim"])
    empty = {"global": (0, c), "local": (0, NUM_PARTS, c), "visibility": (0, NUM_PARTS)}
    arrays = {k: np.concatenate(v) if v else np.zeros(empty[k], np.float32) for k, v in feats.items()}
    n = len(keys)
    return {**arrays, "ids": np.full(n, -1, np.int64), "cams": np.full(n, -1, np.int64),
            "views": np.full(n, np.nan), "keys": np.array(keys, dtype=str), "skipped": np.array(skipped, dtype=str)}


def read_index(folder: Path) -> dict[str, Any]:
    """``index.json`` of an index folder (InputError when it is not one)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise InputError(f"{folder}: not a search index (no {INDEX_FILE}; build one with `python -m pipeline.search "
                         f"index`)")
    record = json.loads(path.read_text())
    if record.get("format") != INDEX_FORMAT:
        raise InputError(f"{path}: index format {record.get('format')}, expected {INDEX_FORMAT}")
    return record


def check_compatible(record: dict[str, Any], encoder: Encoder, folder: Path) -> None:
    """The index was made with the encoder's model (same sha256, variant, feature size), else InputError."""
    made, used = record["model"], encoder.model
    if (made["sha256"], made["variant"], made["feat_dim"]) != (used["sha256"], used["variant"], used["feat_dim"]):
        raise InputError(f"{folder}: made with another model (sha256 {made['sha256'][:12]}, variant {made['variant']}, "
                         f"{made['feat_dim']}-d) than this query's (sha256 {used['sha256'][:12]}, variant "
                         f"{used['variant']}, {used['feat_dim']}-d): rebuild the index or query with its model")


def index_blocks(folder: Path, rows: int) -> Iterator[FeatureSet]:
    """The index as consecutive :class:`FeatureSet` blocks of at most ``rows`` images.

    Each block is read from the ``.npy`` files with plain reads (their headers give offset,
    dtype and shape), not through a memory map: a map's pages count as the process's resident
    memory as it walks a 10 GB index, reads hold one block.
    """
    layout = {}
    for name in ARRAYS:
        mapped = np.load(Path(folder) / f"{name}.npy", mmap_mode="r")
        layout[name] = (mapped.offset, mapped.dtype, mapped.shape)
        del mapped
    n = layout["ids"][2][0]
    files = {name: open(Path(folder) / f"{name}.npy", "rb") for name in ARRAYS}
    try:
        for start in range(0, n, rows):
            count = min(rows, n - start)
            piece = {}
            for name, (offset, dtype, shape) in layout.items():
                row = int(np.prod(shape[1:], dtype=np.int64))
                files[name].seek(offset + start * row * dtype.itemsize)
                piece[name] = np.fromfile(files[name], dtype, count * row).reshape(count, *shape[1:])
            yield FeatureSet(piece["ids"], piece["cams"], piece["global"], piece["local"], piece["visibility"])
    finally:
        for f in files.values():
            f.close()


def keys_at(folder: Path, rows: set[int]) -> dict[int, str]:
    """The keys of the given rows, read line by line (keys.txt is never held whole)."""
    found = {}
    with open(Path(folder) / "keys.txt") as f:
        for i, line in enumerate(f):
            if i in rows:
                found[i] = line.rstrip("\n")
                if len(found) == len(rows):
                    break
    return found
