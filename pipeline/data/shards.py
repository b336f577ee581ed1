"""WebDataset shards: writing every split of a dataset, and the readers later stages use.

On disk (``<out_dir>/``)::

    train-000000.tar ...   samples: <key>.jpg, <key>.json [, <key>.mask.png] [, <key>.orig.jpg]
    query-000000.tar ...
    manifest.json          per split: counts and every shard with its sample count and sha256;
                           every skipped input with its reason

``json`` holds ``vid``, ``camera``, ``split``, ``source_key``, ``width``/``height`` of the
stored image in pixels and, where known, ``view`` (the renderer's azimuth/elevation in
degrees). ``mask.png`` is a uint8 label map (0 background, 1 front, 2 back, 3 side, 4 top)
with the stored image's size.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline import atomic
from pipeline.cli import InputError
from pipeline.constants import NUM_LABELS
from pipeline.data.records import SPLITS, Record
from pipeline.dist.env import DistInfo
from pipeline.progress import progress

MANIFEST = "manifest.json"


class ShardError(InputError):
    """An input that cannot be sharded (raised for corrupt images in strict mode)."""


class ShardReadError(InputError):
    """A shard that is not a readable tar (single bad images are skipped; a broken shard is fatal)."""


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
    """Write WebDataset samples (``{"__key__": str, "<ext>": bytes, ...}``) to the tar at ``path``.

    The tar is written under a temporary name and renamed when complete, so a reader
    never sees a partial shard. Fixed mtime and owner make the file (and its sha256) a
    pure function of the samples. Returns ``{"name", "samples", "sha256"}``.
    """
    path = Path(path)
    count = 0
    with atomic.replacing(path) as tmp, open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=0.0, user="pven", group="pven", encoder=False)
        try:
            for sample in samples:
                writer.write(sample)
                count += 1
        finally:
            writer.close()  # also on error, before the file closes (else tarfile writes to it later)
    return {"name": path.name, "samples": count, "sha256": _sha256(path)}


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def index_tar(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a WebDataset tar in file order: ``[(key, {ext: (byte offset, size)})]``.

    Only headers are read. A sample's files share the name before the first dot
    (WebDataset's rule), e.g. ``k.jpg``, ``k.json``, ``k.mask.png``. Raises
    :class:`ShardReadError` naming the file when it is not a readable tar.
    """
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as exc:
        raise ShardReadError(f"{path}: not a readable shard ({type(exc).__name__}: {exc}); "
                             "rerun the shard stage") from None
    return out


def read_members(path: str | Path, members: dict[str, tuple[int, int]],
                 exts: Sequence[str] | None = None) -> dict[str, bytes]:
    """The bytes of one sample's members (an entry of :func:`index_tar`), optionally only ``exts``."""
    raw = {}
    with open(path, "rb") as f:
        for ext, (offset, size) in members.items():
            if exts is None or ext in exts:
                f.seek(offset)
                raw[ext] = f.read(size)
    return raw


def iter_samples(path: str | Path, exts: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__": key, ext: bytes, ...}`` of one tar in file order, read lazily.

    ``exts`` limits the members read (e.g. ``("json",)``: only metadata, no image bytes).
    """
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
        wds.tarfile_to_samples(),
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
            wds.tarfile_to_samples(),
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
