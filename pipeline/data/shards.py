"""WebDataset shards: writing every split of a dataset, and the readers later stages use.

On disk (``<out_dir>/``)::

    train-000000.tar ...   samples: <key>.jpg, <key>.json [, <key>.mask.png] [, <key>.orig.jpg]
    train-000000.tar.idx.json ...  the tar's member index (see below)
    query-000000.tar ...
    manifest.json          per split: counts and every shard with its sample count and sha256;
                           every skipped input with its reason

``json`` holds ``vid``, ``camera``, ``split``, ``source_key``, ``width``/``height`` of the
stored image in pixels and, where known, ``view`` (the renderer's azimuth/elevation in
degrees). ``mask.png`` is a uint8 label map (0 background, 1 front, 2 back, 3 side, 4 top)
with the stored image's size.

Every tar written here (:func:`write_tar`, also the masks stage's) gets a sidecar
``<name>.tar.idx.json``: the tar's size in bytes, its sha256 and crc32 and, in file order, each
sample's key and members as ``[ext, byte offset, size]``. Readers (:func:`read_shard`)
take the offsets from it and read the tar front to back with one ``pread`` a member,
no tar parsing; they check the tar's size before the first sample, each member's own
header before its sample, and the crc32 of every byte read after the last one (crc32,
not sha256: 3 GB/s against 1.3, and an accident, not an attacker, is what it guards against).
WebDataset's tar walk (``wds.tarfile_to_samples``) cost 0.14-0.4 ms a sample in pure
Python, more than a folder of loose JPEGs costs to open and read (~0.04 ms); the indexed
read costs about the loose files' time warm and a quarter of it cold, and beats one
whole-shard read into memory cold (``benchmarks/RESULTS-shards.md``). WebDataset still composes the pipelines (shard
lists, worker splitting, resampling, map stages); only its tar walk is replaced, by
:func:`shard_samples`, which yields the same samples in the same order
(``tests/test_shard_reader.py`` compares the two). A tar without a sidecar (written
before the index existed, or by another tool) is still read: its index is built by
walking its headers with :mod:`tarfile`, at about the old speed. A sidecar that
disagrees with its tar is a :class:`ShardIndexError` naming both files.

Readers are explicit about distribution, so they never depend on global state:
:func:`eval_pipeline` gives rank ``r`` of ``w`` the shards ``r::w`` (each sample exactly
once over all ranks); :class:`TrainStream` resamples shards with a seed derived from
(seed, epoch, rank, worker) and yields a fixed number of batches per epoch, so ranks
with unequal data never wait on each other at the end of an epoch.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from pipeline import atomic
from pipeline.cli import InputError
from pipeline.constants import NUM_LABELS
from pipeline.data.records import SPLITS, Record
from pipeline.dist.env import DistInfo
from pipeline.progress import progress

MANIFEST = "manifest.json"
INDEX_SUFFIX = ".idx.json"  # <shard>.tar -> <shard>.tar.idx.json, its member index
INDEX_FORMAT = 1


class ShardError(InputError):
    """An input that cannot be sharded (raised for corrupt images in strict mode)."""


class ShardReadError(InputError):
    """A shard that is not a readable tar (single bad images are skipped; a broken shard is fatal)."""


class ShardIndexError(ShardReadError):
    """A shard's sidecar index that is malformed or disagrees with its tar (size, layout, checksum)."""


class EmptyFileError(ValueError):
    """An input file of 0 bytes."""


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_failure(exc: BaseException) -> str:
    """Why an input did not decode, as a stable sentence (it goes into manifests, which must be
    byte-reproducible): no memory addresses; empty and truncated files named as such."""
    if isinstance(exc, EmptyFileError):
        return str(exc)
    text = _ADDRESS.sub("the data", str(exc))
    low = text.lower()
    kind = "truncated file" if "truncated" in low or "broken data stream" in low else "not decodable"
    return f"{kind} ({type(exc).__name__}: {text})"


@dataclass(frozen=True)
class ShardOptions:
    """How samples are encoded (mirrors the params ``shard`` section)."""
    samples_per_shard: int = 1000
    min_shards: int = 4
    resize: tuple[int, int] | None = None  # (height, width) in pixels
    keep_originals: bool = False
    jpeg_quality: int = 95
    strict: bool = False

    @classmethod
    def from_config(cls, cfg) -> ShardOptions:
        """From the params ``shard`` section (:class:`pipeline.config.ShardConfig`)."""
        return cls(samples_per_shard=cfg.samples_per_shard, min_shards=cfg.min_shards, resize=cfg.resize,
                   keep_originals=cfg.keep_originals, jpeg_quality=cfg.jpeg_quality, strict=cfg.strict)


# --------------------------------------------------------------------------- writing

def write_shards(splits: dict[str, list[Record]], out_dir: Path, opts: ShardOptions,
                 seed: int, workers: int = 1, extra: dict | None = None, show_progress: bool = False,
                 skipped: list[dict] | None = None) -> dict:
    """Shard every split into ``out_dir`` and return the manifest (also written there).

    The training split is shuffled with ``seed`` before it is cut into shards, so each
    shard holds a mix of identities; other splits keep their list order. The folder is
    built under a temporary name and swapped in at the end: an interrupted run leaves
    the previous output (or nothing), never a partial shard. ``show_progress`` reports
    the shards written so far (:mod:`pipeline.progress`). ``skipped`` lists entries the
    dataset reader already left out (``{"split", "key", "image", "reason"}``); they head the
    manifest's ``skipped``, before the images that did not decode.
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest: dict[str, Any] = {"format": 1, "options": _options_dict(opts), "splits": {},
                                "skipped": list(skipped or [])}
    manifest.update(extra or {})
    jobs = []  # (split, records of one shard, shard path), every split's shards in one pool
    for split in SPLITS:
        records = list(splits.get(split, []))
        if split == "train":
            order = np.random.default_rng([seed, 0x5EED]).permutation(len(records))
            records = [records[i] for i in order]
        if records:
            jobs += [(split, chunk, staging / f"{split}-{i:06d}.tar")
                     for i, chunk in enumerate(_even_chunks(records, opts))]
    write = functools.partial(_write_one_shard, opts=opts)
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(workers))
                done = pool.map(write, [j[1] for j in jobs], [j[2] for j in jobs])
            else:
                done = (write(chunk, path) for _, chunk, path in jobs)
            results = list(progress(done, desc="shard", unit="shard", total=len(jobs), enabled=show_progress))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for split in SPLITS:
        mine = [r for (s, _, _), r in zip(jobs, results) if s == split]
        if not mine:
            continue
        samples = [kept for _, kept_list, _ in mine for kept in kept_list]
        manifest["splits"][split] = {
            "samples": len(samples),
            "identities": len({s["vid"] for s in samples}),
            "cameras": len({s["camera"] for s in samples if s["camera"] >= 0}),
            "labels": sum(s["label"] for s in samples),
            "shards": [info for info, _, _ in mine],
        }
        manifest["skipped"] += [bad for _, _, bad_list in mine for bad in bad_list]
    atomic.write_json(staging / MANIFEST, manifest)
    atomic.swap_dir(staging, out_dir)
    return manifest


def shard_metrics(manifest: dict) -> dict:
    """The split counts of a manifest: per split its samples, identities, cameras, labels and shards."""
    metrics = {split: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
               for split, info in manifest["splits"].items()}
    metrics["skipped"] = len(manifest["skipped"])
    return metrics


def _even_chunks(records: list[Record], opts: ShardOptions) -> list[list[Record]]:
    """Cut records into the fewest equal-size shards that respect both size and count floors."""
    n = len(records)
    count = min(n, max(opts.min_shards, math.ceil(n / opts.samples_per_shard)))
    return [records[i * n // count:(i + 1) * n // count] for i in range(count)]


def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write WebDataset samples (``{"__key__": str, "<ext>": bytes, ...}``) to the tar at ``path``, and its index.

    The tar is written under a temporary name and renamed when complete, so a reader
    never sees a partial shard; then its sidecar index (:func:`index_path`) is written
    the same way. Fixed mtime and owner make the file (and its sha256) a pure function
    of the samples. Returns ``{"name", "samples", "sha256"}``.
    """
    path = Path(path)
    count = 0
    sidecar = index_path(path)
    with atomic.replacing(path) as tmp:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0.0, user="pven", group="pven", encoder=False)
            try:
                for sample in samples:
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()  # also on error, before the file closes (else tarfile writes to it later)
        # The index is this tar's own header walk, done once here so that no reader repeats it.
        sha256, crc32 = _checksums(tmp)
        index = {"format": INDEX_FORMAT, "tar": path.name, "size": tmp.stat().st_size, "sha256": sha256, "crc32": crc32,
                 "samples": [[key, [[ext, off, size] for ext, (off, size) in members.items()]]
                             for key, members in walk_tar(tmp)]}
        # Gone before the new tar is renamed in: a crash in between leaves a tar without a sidecar
        # (read by walking it), never a tar with a stale sidecar.
        sidecar.unlink(missing_ok=True)
    # Compact: a sidecar is read whole by every reader of its shard (~70 bytes a sample).
    atomic.write_text(sidecar, json.dumps(index, separators=(",", ":")) + "\n")
    return {"name": path.name, "samples": count, "sha256": index["sha256"]}


def _write_one_shard(records: list[Record], path: Path, opts: ShardOptions):
    """Encode ``records`` into the shard at ``path``; corrupt inputs are skipped (or fatal if strict).

    Returns (shard info, kept sample summaries, skipped entries).
    """
    kept, skipped = [], []

    def samples():
        for rec in records:
            try:
                sample = encode_sample(rec, opts)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                reason = decode_failure(exc)
                if opts.strict:
                    raise ShardError(f"{rec.split} image {rec.image}: {reason} (shard.strict is on)") from exc
                skipped.append({"split": rec.split, "key": rec.key, "image": str(rec.image), "reason": reason})
                continue
            kept.append({"vid": rec.vid, "camera": rec.camera, "label": "mask.png" in sample})
            yield sample

    info = write_tar(path, samples())
    return info, kept, skipped


def encode_sample(rec: Record, opts: ShardOptions) -> dict[str, Any]:
    """Decode, check and (optionally) resize one record into a WebDataset sample of bytes.

    Raises OSError/ValueError for an image or label that cannot be decoded or does not fit.
    """
    raw = rec.image.read_bytes()
    if not raw:
        raise EmptyFileError("empty file (0 bytes)")
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # forces a full decode: truncated or corrupt files fail here, not in training
        image = im.convert("RGB")
    orig_size = image.size  # (width, height)
    if opts.resize is not None:
        height, width = opts.resize
        image = image.resize((width, height), Image.BILINEAR)
        jpg = _encode(image, "JPEG", quality=opts.jpeg_quality)
    else:
        jpg = raw  # originals pass through byte for byte
    meta = {"vid": rec.vid, "camera": rec.camera, "split": rec.split, "source_key": rec.key,
            "width": image.size[0], "height": image.size[1],
            "orig_width": orig_size[0], "orig_height": orig_size[1]}
    if rec.meta:
        meta["view"] = dict(rec.meta)
    sample = {"__key__": rec.key, "jpg": jpg}
    if rec.label is not None:
        sample["mask.png"] = _encode(_load_label(rec.label, orig_size, image.size), "PNG")
    if opts.resize is not None and opts.keep_originals:
        sample["orig.jpg"] = raw
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def _load_label(path: Path, orig_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "P"):
            raise ValueError(f"label {path}: mode {im.mode}, expected a single-channel PNG (L or P)")
        # A palette (P) label holds the class index per pixel; convert("L") would map it to the
        # palette colour's brightness instead (a red "front" would become 76).
        label = im if im.mode == "L" else Image.fromarray(np.asarray(im), "L")
        if label.size != orig_size:
            raise ValueError(f"label {path}: size {label.size} differs from its image's {orig_size}")
    top = int(np.asarray(label).max())
    if top >= NUM_LABELS:
        raise ValueError(f"label {path}: value {top} found, expected labels 0..{NUM_LABELS - 1}")
    # Nearest keeps labels labels: no blend of 'front' and 'back' into a fake class.
    return label if label.size == size else label.resize(size, Image.NEAREST)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _checksums(path: Path) -> tuple[str, int]:
    """(sha256 hex, crc32) of the file at ``path``, in one pass."""
    digest, crc = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
            crc = zlib.crc32(block, crc)
    return digest.hexdigest(), crc


def _options_dict(opts: ShardOptions) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()}


# --------------------------------------------------------------------------- reading

def read_manifest(shard_dir: Path) -> dict:
    """The manifest of a shard folder; a clear error if the shard stage has not run."""
    path = Path(shard_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard manifest (run the shard stage first)") from None


def shard_urls(shard_dir: Path, split: str) -> list[str]:
    """Paths of the split's shards, in manifest order."""
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(shard_dir) / MANIFEST}: no split {split!r} "
                       f"(has {', '.join(manifest['splits'])})")
    return [str(Path(shard_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]


def decode_image(data: bytes) -> np.ndarray:
    """JPEG (or any PIL-readable) bytes -> (H, W, 3) uint8 RGB, fully decoded (a truncated file fails here)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """Label PNG bytes -> (H, W) uint8 labels: mode L values or mode P palette indices (never
    colours: WebDataset's "pil" decoder would make it RGB)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im if im.mode in ("L", "P") else im.convert("L"))


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Bytes -> arrays: ``image`` HxWx3 uint8 RGB, ``mask`` HxW uint8 labels or None, ``meta`` dict."""
    mask = decode_mask(sample["mask.png"]) if "mask.png" in sample else None
    return {"key": sample["__key__"], "image": decode_image(sample["jpg"]), "mask": mask,
            "meta": json.loads(sample["json"])}


Members = dict[str, tuple[int, int]]  # ext -> (byte offset, size) of one sample's files in its tar
Index = list[tuple[str, Members]]  # (key, members) of every sample, in file order

# WebDataset's rule (tariterators.tar_file_iterator): members named "__...__" are metadata, not samples.
_META = re.compile(r"__[^/]*__($|/)")


def index_path(path: str | Path) -> Path:
    """The sidecar index of the tar at ``path``: ``<name>.tar.idx.json`` next to it."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def walk_tar(source: str | Path) -> Index:
    """Samples of a WebDataset tar in file order, by walking its headers: ``[(key, {ext: (offset, size)})]``.

    Only headers are read (:mod:`tarfile` seeks past the data). Member names are grouped
    as WebDataset groups them (``wds.tarfile_to_samples``): the key is the name up to the
    first dot of its last path part, the ext the rest, lowercased (``k.jpg``, ``k.json``,
    ``k.mask.png``); consecutive members with one key form a sample; non-files,
    ``__meta__`` entries and names without a dot are skipped. Raises
    :class:`ShardReadError` naming the file when it is not a readable tar, or a sample
    holds one ext twice.
    """
    out: Index = []
    try:
        with tarfile.open(source) as tar:
            for member in tar:
                key, ext = _sample_name(member.name) if member.isfile() else (None, None)
                if key is None:
                    continue
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                if ext in out[-1][1]:
                    raise ShardReadError(f"{source}: member {member.name} appears twice in sample {key}; "
                                         "rerun the shard stage")
                out[-1][1][ext] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as exc:
        raise ShardReadError(f"{source}: not a readable shard ({type(exc).__name__}: {exc}); "
                             "rerun the shard stage") from None
    return out


def _sample_name(name: str) -> tuple[str | None, str | None]:
    """A tar member name -> (sample key, ext) by WebDataset's rules; (None, None) for names it skips."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None, None
    key, ext = base_plus_ext(name)
    return (None, None) if key is None else (key, ext.lower())


def read_index(path: str | Path) -> dict | None:
    """The sidecar of the tar at ``path`` as ``{"size", "crc32", "samples": Index}``; None when it has none.

    Checks what can be checked without reading the tar: the sidecar's format, that it
    names this tar, that the tar's size in bytes is the recorded one, and that members
    come in file order, each after a 512-byte header and inside the tar. Raises
    :class:`ShardIndexError` naming both files otherwise.
    """
    path = Path(path)
    sidecar = index_path(path)
    try:
        text = sidecar.read_text()
    except FileNotFoundError:
        return None

    def bad(why: str) -> ShardIndexError:
        return ShardIndexError(f"{sidecar}: {why}; it does not describe {path}: rerun the shard stage "
                               f"(or delete the sidecar to read the tar by walking it)")
    try:
        raw = json.loads(text)
        head = (raw.get("format"), raw.get("tar"))
        size, crc32 = int(raw["size"]), int(raw["crc32"])
        samples = [(str(key), {str(e): (int(o), int(n)) for e, o, n in members}) for key, members in raw["samples"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise bad(f"not a valid index ({type(exc).__name__}: {exc})") from None
    if head != (INDEX_FORMAT, path.name):
        raise bad(f"format {head[0]!r} for tar {head[1]!r}, expected format {INDEX_FORMAT} for {path.name!r}")
    actual = path.stat().st_size  # FileNotFoundError names the tar
    if actual != size:
        raise bad(f"records {size} bytes but the tar has {actual}")
    end = 0
    for key, members in samples:  # in file order, each after its own 512-byte header, all inside the tar
        for ext, (offset, length) in members.items():
            if offset < end + 512 or length < 0 or offset + length > size:
                raise bad(f"member {key}.{ext} ({length} bytes at byte {offset}) overlaps the one before it or "
                          f"lies outside the tar's {size} bytes")
            end = offset + length
    return {"size": size, "crc32": crc32, "samples": samples}


def index_tar(path: str | Path) -> Index:
    """Samples of a WebDataset tar in file order: ``[(key, {ext: (byte offset, size)})]``.

    From the tar's sidecar index when it has one (size-checked, :func:`read_index`),
    else by walking its headers (:func:`walk_tar`). Raises :class:`ShardReadError`
    naming the file when it is not a readable tar.
    """
    index = read_index(path)
    return walk_tar(path) if index is None else index["samples"]


def read_shard(path: str | Path, verify: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of one tar in file order as ``(key, {ext: bytes})``: its sidecar index, then one read a member.

    The tar is read front to back exactly once, on one file descriptor: each ``pread``
    spans from the end of the previous member to the end of this one (its header, padding
    and data), so the kernel's readahead streams the file while samples are consumed. This
    beat one whole-shard read on a cold cache (``benchmarks/RESULTS-shards.md``) and holds one
    sample in memory, not the shard. Each member's own tar header (the 512 bytes before
    its data) must record the indexed size, or a :class:`ShardIndexError` comes before the
    sample. ``verify`` also sums every byte read into a crc32 (about 3 GB/s): a tar whose
    crc32 is not its sidecar's is a :class:`ShardIndexError` after its last sample, when
    that is known. Without a sidecar the index comes from walking the tar
    (:func:`walk_tar`) and there is no checksum to compare.
    """
    index = read_index(path)
    samples = walk_tar(path) if index is None else index["samples"]
    crc = 0 if verify and index is not None else None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ShardReadError(f"{path}: not a readable shard ({type(exc).__name__}: {exc})") from None
    try:
        done = 0  # bytes of the tar read so far
        for key, members in samples:
            out = {}
            for ext, (offset, size) in members.items():
                span = os.pread(fd, offset + size - done, done)
                if len(span) != offset + size - done or _header_size(span, size) != size:
                    raise ShardIndexError(f"{index_path(path)}: member {key}.{ext} of {size} bytes at byte {offset} "
                                          f"is not where {path} has it: rerun the shard stage (or delete the sidecar)")
                if crc is not None:
                    crc = zlib.crc32(span, crc)
                out[ext] = span[len(span) - size:]
                done = offset + size
            yield key, out
        if crc is not None:
            crc = zlib.crc32(os.pread(fd, index["size"] - done, done), crc)  # the end-of-archive blocks
            if crc != index["crc32"]:
                raise ShardIndexError(f"{index_path(path)}: records crc32 {index['crc32']:08x} but {path} sums to "
                                      f"{crc:08x}: the tar changed after it was indexed (its samples were read "
                                      "already); rerun the shard stage")
    finally:
        os.close(fd)


def _header_size(span: bytes, size: int) -> int:
    """The size field of the tar header that ends ``size`` bytes before the end of ``span``; -1 if unreadable."""
    field = span[len(span) - size - 512 + 124:len(span) - size - 512 + 136]
    try:
        if field[:1] == b"\x80":  # base-256, for members of 8 GiB or more
            return int.from_bytes(field[1:], "big")
        return int(field.replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return -1


def shard_samples(shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard dicts ``{"url": path}`` -> samples ``{"__key__", "__url__", ext: bytes, ...}``.

    What ``wds.tarfile_to_samples()`` yields for the same tars (same samples, order, keys
    and bytes), read by :func:`read_shard` instead of a tar walk.
    """
    for shard in shards:
        url = shard["url"]
        for key, members in read_shard(url):
            yield {"__key__": key, "__url__": url, **members}


def read_members(path: str | Path, members: Members, exts: Sequence[str] | None = None) -> dict[str, bytes]:
    """The bytes of one sample's members (an entry of :func:`index_tar`), optionally only ``exts``."""
    raw = {}
    with open(path, "rb") as f:
        for ext, (offset, size) in members.items():
            if exts is None or ext in exts:
                f.seek(offset)
                raw[ext] = f.read(size)
    return raw


def iter_samples(path: str | Path, exts: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__": key, ext: bytes, ...}`` of one tar in file order.

    ``exts`` limits the members read (e.g. ``("json",)``: only metadata, read by seeking
    to each, no image bytes); without it every member is read, front to back and
    checked (:func:`read_shard`).
    """
    if exts is None:
        for key, members in read_shard(path):
            yield {"__key__": key, **members}
        return
    for key, members in index_tar(path):
        yield {"__key__": key, **read_members(path, members, exts)}


def fetch_samples(shard_dir: Path, split: str, keys: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(rgb, labels) of the samples of ``split`` whose key is in ``keys``; labels are zeros without a mask.

    One pass over the split's shards, stopping once every key is found.
    """
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for url in shard_urls(shard_dir, split):
        for key, members in index_tar(url):
            if key in keys and key not in found:
                decoded = decode_sample({"__key__": key, **read_members(url, members)})
                image, mask = decoded["image"], decoded["mask"]
                found[key] = (image, mask if mask is not None else np.zeros(image.shape[:2], np.uint8))
        if len(found) == len(keys):
            break
    return found


def eval_pipeline(urls: Sequence[str], map_fn: Callable[[dict], Any] = decode_sample,
                  info: DistInfo | None = None) -> wds.DataPipeline:
    """Every sample of ``urls`` in shard order, no shuffling; with ``info`` only this rank's share.

    Over all ranks each sample comes exactly once (:meth:`DistInfo.share`). Use with
    ``torch.utils.data.DataLoader(pipeline, batch_size=..., num_workers=n)``: shards
    are further split among the loader's workers.
    """
    if info is not None:
        if info.world_size > len(urls):
            raise ValueError(f"{info.world_size} ranks but only {len(urls)} shards: raise shard.min_shards")
        urls = info.share(urls)
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.split_by_worker,
        shard_samples,
        wds.map(map_fn),
    )


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _stream_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seeded_shuffle(src: Iterator, bufsize: int, seed: int) -> Iterator:
    """Buffer shuffle whose RNG is fixed by (seed, loader worker): reproducible, but each worker differs."""
    rng = random.Random(seed * 1000 + _worker_id())
    buf: list = []
    for sample in src:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


class TrainStream:
    """Endless resampled training samples, cut into exactly ``batches_per_epoch`` batches.

    Every rank and every loader worker draws shards with replacement from all ``urls``
    using its own seed derived from (seed, epoch, rank, worker): each rank sees the
    same number of batches whatever the shard sizes, which is what keeps DDP ranks in
    step. Call :meth:`epoch` for the iterator of one epoch; the same (seed, epoch,
    rank) always gives the same batches, which is what makes resuming exact.

    ``map_fn`` turns a raw sample into what ``collate_fn`` batches (default: decoded
    arrays, collated as a list). ``batch_fn`` may replace plain batching, e.g. the
    identity-balanced P x K sampler: it takes the sample iterator and yields batches.
    """

    def __init__(self, urls: Sequence[str], *, batch_size: int, batches_per_epoch: int,
                 seed: int, rank: int = 0, num_workers: int = 0, shuffle_buffer: int = 256,
                 map_fn: Callable[[dict], Any] = decode_sample,
                 batch_fn: Callable[[Iterator], Iterator] | None = None,
                 collate_fn: Callable[[list], Any] = list):
        if not urls:
            raise ValueError("TrainStream: no shard urls")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed, self.rank = seed, rank
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.map_fn, self.collate_fn = map_fn, collate_fn
        self.batch_fn = batch_fn or functools.partial(_plain_batches, batch_size=batch_size)

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        seed = _stream_seed(self.seed, epoch, self.rank)
        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=_worker_id, deterministic=True),
            shard_samples,
            functools.partial(_seeded_shuffle, bufsize=self.shuffle_buffer, seed=seed),
            wds.map(self.map_fn),
            self.batch_fn,
            wds.map(self.collate_fn),
        )

    def epoch(self, epoch: int) -> Iterator:
        """Exactly ``batches_per_epoch`` batches for ``epoch`` on this rank."""
        loader = torch.utils.data.DataLoader(self.pipeline(epoch), batch_size=None,
                                             num_workers=self.num_workers)
        count = 0
        for batch in loader:
            yield batch
            count += 1
            if count == self.batches_per_epoch:
                break


def _plain_batches(src: Iterator, batch_size: int) -> Iterator[list]:
    batch: list = []
    for sample in src:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
