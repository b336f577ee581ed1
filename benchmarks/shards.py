"""Shard readers vs a folder of JPEGs: read cost, per-core decode rate and loader throughput, warm and cold.

    .venv/bin/python benchmarks/shards.py                  # 2000 images of 256 px -> benchmarks/RESULTS-shards.md
    .venv/bin/python benchmarks/shards.py --images 200 --size 128 --out -     # quick smoke run, printed only
    .venv/bin/python benchmarks/shards.py --decode cuda --out FILE            # JPEGs decoded in batches on the GPU

Renders ``--images`` synthetic vehicles at ``--size`` px (the real renderer, half with label
PNGs) and shards them with the shard stage's writer (tars + sidecar indexes); a copy of the
tars without sidecars stands for shards written before the index. Three measurements,
each repeated with the options interleaved (A, B, C, A, B, C), so that a shared machine's
load falls on every option alike:

1. read only (one process, no decode): microseconds a sample for each way of getting a
   sample's bytes: WebDataset's tar walk (the reader before the index); a tar header walk
   (a shard without sidecar); the index with one whole-shard read into memory, members
   sliced out, with and without a crc32 check; the index with one ``pread`` a member in
   file order, with and without the check (the reader, :func:`pipeline.data.shards.read_shard`);
   and a folder of loose files (open + read a file);
2. decode only, one thread: the per-core JPEG decode rate at the stored size, decoding
   then resizing to half size (what a loader does with shards of original images), and
   decoding JPEGs stored at half size (``shard.resize``: decode at the stored resolution);
   with ``--decode cuda`` also batched ``torchvision.io.decode_jpeg(device="cuda")``;
3. end to end: a ``torch.utils.data.DataLoader`` with ``--workers`` processes decoding every
   JPEG (and label PNG; with ``--decode cuda`` the JPEGs are decoded on the GPU in batches
   of ``--batch`` in the main process): WebDataset's walk, the indexed reader, the folder.

Warm: every file was read just before. Cold: before the pass each file it reads is
dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (works on clean
pages without root, so each file is flushed first; ``/proc/sys/vm/drop_caches`` needs root
and drops every user's cache, and is not used) and
``mincore`` reports how much of the files was still resident. On a VM whose disk is a
file on the host, "cold" is cold for this machine's page cache only: the host may still
serve the reads from its own memory.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import mmap
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.results import publish  # noqa: E402
from pipeline.config import SynthConfig  # noqa: E402
from pipeline.data.shards import (  # noqa: E402
    INDEX_SUFFIX,
    ShardOptions,
    decode_image,
    decode_mask,
    decode_sample,
    eval_pipeline,
    index_tar,
    read_shard,
    shard_urls,
    write_shards,
)
from pipeline.data.sources import read_synthetic  # noqa: E402
from pipeline.data.synthetic import render_dataset  # noqa: E402

OUT = Path(__file__).resolve().parent / "RESULTS-shards.md"


@dataclass
class Data:
    """The benchmark's inputs: training records (loose files), indexed shards, the same tars without sidecars."""
    records: list
    urls: list[str]  # indexed shards
    old_urls: list[str]  # the same tars, no sidecars
    tar_bytes: int = 0  # all shards together

    def files(self, reader: str) -> list[str]:
        """Every file ``reader`` reads (what a cold pass drops from the page cache)."""
        if reader == "folder":
            return [str(p) for r in self.records for p in (r.image, r.label) if p is not None]
        if reader == "old":
            return list(self.old_urls)
        return [*self.urls, *(u + INDEX_SUFFIX for u in self.urls)]


def make_data(root: Path, images: int, size: int, shards: int) -> Data:
    """Render about ``images`` training images of ``size`` px and shard them into ``shards`` tars."""
    ids = max(4, images // 10)  # about 10 images per identity with the settings below
    procs = max(1, min(8, os.cpu_count() or 1))  # the output does not depend on it
    cfg = SynthConfig(train_ids=ids, test_ids=2, cameras=8, cameras_per_id=(4, 4), images_per_camera=(2, 3),
                      image_size=size, label_fraction=0.5, workers=procs)
    render_dataset(cfg, root / "synthetic", seed=0)
    records = read_synthetic(root / "synthetic")["train"]
    per_shard = -(-len(records) // shards)
    write_shards({"train": records}, root / "shards", ShardOptions(samples_per_shard=per_shard, min_shards=shards),
                 seed=0, workers=procs)
    urls = shard_urls(root / "shards", "train")
    shutil.copytree(root / "shards", root / "old", ignore=shutil.ignore_patterns("*" + INDEX_SUFFIX))
    return Data(records, urls, [str(root / "old" / Path(u).name) for u in urls], sum(map(os.path.getsize, urls)))


# --------------------------------------------------------------------------- page cache

def drop_cache(paths: Iterable[str]) -> None:
    """Drop the files' pages from the page cache (no root needed): flushed first, as only clean pages can go."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # just-written files are still dirty, and DONTNEED skips dirty pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths: Iterable[str]) -> None:
    for path in paths:
        Path(path).read_bytes()


def resident_share(paths: Iterable[str]) -> float | None:
    """Share (0..1) of the files' pages in the page cache, by ``mincore``; None where that cannot be asked."""
    page, resident, total = mmap.PAGESIZE, 0, 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for path in paths:
            size = os.path.getsize(path)
            if size == 0:
                continue
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                view = np.frombuffer(mm, np.uint8)  # only for the mapping's address; mapping faults nothing in
                rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
                del view
            if rc != 0:
                return None
            resident += int((np.frombuffer(vec, np.uint8) & 1).sum())
            total += pages
    except (OSError, AttributeError, ValueError):
        return None
    return resident / max(total, 1)


def prepare_cache(data: Data, reader: str, cold: bool) -> float | None:
    """Put ``reader``'s files in the wanted cache state; returns their resident share after (cold only)."""
    files = data.files(reader)
    if not cold:
        warm_cache(files)
        return None
    drop_cache(files)
    return resident_share(files)


# --------------------------------------------------------------------------- 1. read only

def wds_walk(urls: list[str]) -> Iterator[dict]:
    """WebDataset's tar walk: the shard reader before the index."""
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def reader(urls: list[str], verify: bool = True) -> Iterator[dict]:
    """The indexed reader (:func:`read_shard`): one ``pread`` a member in file order, ``verify``: crc32 checked."""
    for url in urls:
        for key, members in read_shard(url, verify=verify):
            yield {"__key__": key, **members}


def whole_reads(urls: list[str], verify: bool = True) -> Iterator[dict]:
    """The other indexed option: one sequential read of the whole shard into memory, members sliced out."""
    for url in urls:
        data = Path(url).read_bytes()
        if verify:
            zlib.crc32(data)  # the same check as the reader's
        for key, members in index_tar(url):
            yield {"__key__": key, **{ext: data[offset:offset + size] for ext, (offset, size) in members.items()}}


def folder_reads(records: list) -> Iterator[dict]:
    """Loose files: one open + read per JPEG and label PNG."""
    for rec in records:
        yield {"jpg": rec.image.read_bytes(), **({"png": rec.label.read_bytes()} if rec.label else {})}


READERS: list[tuple[str, str, Callable[[Data], Iterator[dict]]]] = [  # (label, files it reads, samples)
    ("WebDataset tar walk (before the index)", "shards", lambda d: wds_walk(d.urls)),
    ("tar header walk + pread (a shard without sidecar)", "old", lambda d: reader(d.old_urls)),
    ("index + whole-shard read, no checksum", "shards", lambda d: whole_reads(d.urls, verify=False)),
    ("index + whole-shard read + crc32", "shards", lambda d: whole_reads(d.urls)),
    ("**index + pread a member + crc32 (the reader)**", "shards", lambda d: reader(d.urls)),
    ("index + pread a member, no checksum", "shards", lambda d: reader(d.urls, verify=False)),
    ("folder of files (open + read each)", "folder", lambda d: folder_reads(d.records)),
]


def time_reads(data: Data, repeats: int) -> tuple[dict, list]:
    """us a sample of every reader, warm and cold, interleaved: ``{(label, cold): [us, ...]}``, resident shares."""
    out: dict[tuple[str, bool], list[float]] = {}
    shares = []
    for _ in range(repeats):
        for cold in (False, True):
            for label, files, read in READERS:
                shares.append(prepare_cache(data, files, cold))
                start = time.perf_counter()
                count = sum(1 for _ in read(data))
                out.setdefault((label, cold), []).append((time.perf_counter() - start) / count * 1e6)
    return out, [s for s in shares if s is not None]


def checksum_rates(data: Data) -> dict[str, float]:
    """GB/s of sha256 and crc32 over every shard's bytes in memory, one thread (why the reader uses crc32)."""
    blobs = [Path(u).read_bytes() for u in data.urls]
    rates: dict[str, float] = {}
    for _ in range(3):
        for name, fn in (("sha256", lambda b: hashlib.sha256(b).digest()), ("crc32", zlib.crc32)):
            start = time.perf_counter()
            for blob in blobs:
                fn(blob)
            rates[name] = max(rates.get(name, 0.0), data.tar_bytes / (time.perf_counter() - start) / 1e9)
    return rates


# --------------------------------------------------------------------------- 2. decode only

def per_core_rates(data: Data, count: int, size: int, cuda_batch: int | None) -> list[tuple[str, float]]:
    """(what, images/s) for decoding ``count`` stored JPEGs in one thread (and batched on the GPU)."""
    jpgs = [members["jpg"] for _, members in zip(range(count), (m for u in data.urls for _, m in read_shard(u)))]
    half = (size // 2, size // 2)
    small = []
    for raw in jpgs:  # the same images as shard.resize would store them (bilinear, quality 95)
        buf = io.BytesIO()
        Image.fromarray(decode_image(raw)).resize(half, Image.BILINEAR).save(buf, "JPEG", quality=95)
        small.append(buf.getvalue())

    def decode_resize(raw: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB").resize(half, Image.BILINEAR))
    rows = [(f"PIL decode, stored {size} px", lambda: [decode_image(b) for b in jpgs]),
            (f"PIL decode {size} px + resize to {half[0]} px", lambda: [decode_resize(b) for b in jpgs]),
            (f"PIL decode, stored at {half[0]} px (shard.resize)", lambda: [decode_image(b) for b in small])]
    if cuda_batch:
        rows.append((f"torchvision decode_jpeg on CUDA, batches of {cuda_batch}, stored {size} px",
                     lambda: cuda_decode_all(jpgs, cuda_batch)))
    rates: dict[str, list[float]] = {}
    with torch_threads(1):
        for _ in range(3):
            for label, run in rows:
                start = time.perf_counter()
                run()
                rates.setdefault(label, []).append(len(jpgs) / (time.perf_counter() - start))
    return [(label, max(r)) for label, r in rates.items()]


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cuda_decode(jpgs: list[bytes]) -> list[torch.Tensor]:
    """JPEG bytes -> (3, H, W) uint8 tensors on the GPU, one batched nvJPEG call."""
    import torchvision.io as tio
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpgs]
    return tio.decode_jpeg(tensors, mode=tio.ImageReadMode.RGB, device="cuda")


def cuda_decode_all(jpgs: list[bytes], batch: int) -> None:
    for i in range(0, len(jpgs), batch):
        cuda_decode(jpgs[i:i + batch])
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- 3. end to end

def bytes_and_mask(sample: dict) -> dict:
    """Map stage for GPU decoding: the JPEG stays bytes (decoded in batches on the GPU), the label PNG is decoded."""
    return {"key": sample["__key__"], "jpg": sample["jpg"],
            "mask": decode_mask(sample["mask.png"]) if "mask.png" in sample else None}


class FolderDataset(torch.utils.data.Dataset):
    """The usual map-style loader: one file open + decode per image (and its label PNG)."""

    def __init__(self, records, gpu: bool = False):
        self.records, self.gpu = records, gpu

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        mask = decode_mask(rec.label.read_bytes()) if rec.label is not None else None
        if self.gpu:
            return {"key": rec.key, "jpg": rec.image.read_bytes(), "mask": mask}
        with Image.open(rec.image) as im:
            return {"key": rec.key, "image": np.array(im.convert("RGB")), "mask": mask}


def loaders(data: Data, gpu: bool) -> list[tuple[str, str, Callable[[], object]]]:
    """(label, files it reads, dataset factory) of the three end-to-end options."""
    fn = bytes_and_mask if gpu else decode_sample  # CPU: everything decoded in the loader workers
    return [
        ("WebDataset tar walk (before the index)", "shards",
         lambda: wds.DataPipeline(wds.SimpleShardList(data.urls), wds.split_by_worker, wds.tarfile_to_samples(),
                                  wds.map(fn))),
        ("**indexed reader (eval_pipeline)**", "shards", lambda: eval_pipeline(data.urls, map_fn=fn)),
        ("folder of JPEGs (map-style)", "folder", lambda: FolderDataset(data.records, gpu=gpu)),
    ]


def timed_pass(dataset, workers: int, cuda_batch: int | None) -> tuple[int, float]:
    """(samples, seconds) of one full pass through a DataLoader; with ``cuda_batch``, JPEGs decoded on the GPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda s: s)
    start = time.perf_counter()
    count, pending = 0, []
    for sample in loader:
        count += 1
        if cuda_batch:
            pending.append(sample["jpg"])
            if len(pending) == cuda_batch:
                cuda_decode(pending)
                pending = []
    if cuda_batch:
        if pending:
            cuda_decode(pending)
        torch.cuda.synchronize()
    return count, time.perf_counter() - start


def time_passes(data: Data, workers: int, repeats: int, cuda_batch: int | None) -> tuple[dict, list]:
    """images/s of every loader option, warm and cold, interleaved: ``{(label, cold): [rate, ...]}``, shares."""
    out: dict[tuple[str, bool], list[float]] = {}
    shares = []
    for _ in range(repeats):
        for cold in (False, True):
            for label, files, make in loaders(data, gpu=bool(cuda_batch)):
                dataset = make()
                shares.append(prepare_cache(data, files, cold))
                count, seconds = timed_pass(dataset, workers, cuda_batch)
                out.setdefault((label, cold), []).append(count / seconds)
    return out, [s for s in shares if s is not None]


# --------------------------------------------------------------------------- report

def cells(values: list[float], best: Callable = min, fmt: str = "{:.1f}") -> str:
    """'best (each run)' for a table cell."""
    return f"{fmt.format(best(values))} ({', '.join(fmt.format(v) for v in values)})"


def cold_sentence(shares: list[float]) -> str:
    """What the cold passes really were, from the resident shares measured right after each drop."""
    if not shares:
        return "Cold: could not ask mincore how much stayed cached; cold numbers are unverified."
    worst = max(shares)
    state = ("the drop worked" if worst < 0.05 else
             "the drop did NOT work (tmpfs, or pages dirty?): the cold numbers are warm numbers")
    return (f"Cold: `posix_fadvise(POSIX_FADV_DONTNEED)` on every file of the pass just before it; `mincore` "
            f"found {min(shares):.1%}-{worst:.1%} of those files' pages still resident ({state}). "
            "`/proc/sys/vm/drop_caches` is not used: it needs root and drops every user's cache.")


def report(args, data: Data, res: dict, run: dict) -> str:
    """The Markdown report: ``res`` holds the measurements (see :func:`main`), ``run`` when and under what load."""
    reads, rates, passes = res["reads"], res["rates"], res["passes"]
    samples, tar_mb = len(data.records), data.tar_bytes / 1e6
    heading = args.note or "Run"
    lines = [
        "# Shard readers vs folder of JPEGs: read cost, per-core decode rate, loader throughput", "",
        f"## {heading} ({run['started']:%Y-%m-%d %H:%M} UTC)", "",
        f"- Command: `.venv/bin/python benchmarks/shards.py {shlex.join(sys.argv[1:])}`",
        f"- Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, Pillow {PIL.__version__}, webdataset {wds.__version__}. "
        f"Load average (1/5/15 min) at start {run['load_start']}, at end {run['load_end']}; "
        f"the whole benchmark took {run['seconds']:.0f} s.",
        f"- Data: {samples} synthetic {args.size}-px training images (half with label PNGs), "
        f"{len(data.urls)} shards ({tar_mb:.1f} MB) with sidecar indexes, in {args.tmp or tempfile.gettempdir()}.",
        "- Options interleaved within this run (A, B, C, A, B, C); best and (every repeat) given.",
        f"- {cold_sentence(res['shares'])}", "",
        "### 1. Read only: one process, no decode, microseconds a sample (lower is better)", "",
        "| reader | warm us/sample | cold us/sample |", "| --- | ---: | ---: |",
    ]
    lines += [f"| {label} | {cells(reads[(label, False)])} | {cells(reads[(label, True)])} |"
              for label, _, _ in READERS]
    per_sample = data.tar_bytes / samples / 1e3  # us a sample at 1 GB/s
    sums_text = ", ".join(f"{name} {rate:.2f} GB/s ({per_sample / rate:.1f} us a sample)"
                          for name, rate in res["sums"].items())
    lines += ["", f"Checksums over the shards' bytes in memory, one thread: {sums_text}."]
    lines += ["", "### 2. Decode only: one thread, every stored JPEG of a sample set", "",
              "| decode | images/s | ms/image |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {rate:.0f} | {1e3 / rate:.2f} |" for label, rate in rates]
    lines += ["", "Loader cores a GPU needs = images/s the training step consumes / per-core rate above "
                  "(plus about one for the reader and collation).", "",
              f"### 3. Through a DataLoader: {args.workers} workers, every image decoded "
              f"({'JPEGs on CUDA in batches of ' + str(args.batch) if args.decode == 'cuda' else 'on the CPU'}), "
              f"images/s (higher is better)", "",
              "| reader | warm images/s | cold images/s |", "| --- | ---: | ---: |"]
    for label, _, _ in loaders(data, gpu=False):
        warm, cold = (cells(passes[(label, c)], max, "{:.0f}") for c in (False, True))
        lines.append(f"| {label} | {warm} | {cold} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def phase(name: str):
    """Say on stderr how long a part of the benchmark took (the report goes to stdout)."""
    start = time.perf_counter()
    yield
    print(f"shards benchmark: {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="approximate number of training images")
    ap.add_argument("--size", type=int, default=256, help="render size, px")
    ap.add_argument("--shards", type=int, default=8, help="number of shards")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (end-to-end passes)")
    ap.add_argument("--repeats", type=int, default=2, help="end-to-end passes per option and cache state")
    ap.add_argument("--decode", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: JPEGs decoded in batches by torchvision.io.decode_jpeg on the GPU")
    ap.add_argument("--batch", type=int, default=64, help="GPU decode batch size (--decode cuda)")
    ap.add_argument("--tmp", default=None, help="folder for the data (default: the system temp folder; not tmpfs, "
                                                "or the cold passes stay warm)")
    ap.add_argument("--note", default="", help="heading of the run's section, e.g. where it was measured")
    ap.add_argument("--out", default=str(OUT), help="results file ('-': print only)")
    args = ap.parse_args()
    if args.decode == "cuda" and not torch.cuda.is_available():
        ap.error(f"--decode cuda needs a CUDA GPU, and torch {torch.__version__} sees none "
                 "(torch.cuda.is_available() is False); use --decode cpu")
    cuda_batch = args.batch if args.decode == "cuda" else None
    run = {"started": datetime.now(timezone.utc), "load_start": load_average(), "clock": time.perf_counter()}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        with phase("render and shard"):
            data = make_data(Path(tmp), args.images, args.size, args.shards)
        if cuda_batch:
            cuda_decode_all([r.image.read_bytes() for r in data.records[:cuda_batch]], cuda_batch)  # nvJPEG start-up
        with phase("1. read only"):
            reads, read_shares = time_reads(data, repeats=3)
            sums = checksum_rates(data)
        with phase("2. decode only"):
            rates = per_core_rates(data, min(200, len(data.records)), args.size, cuda_batch)
        with phase("3. through a DataLoader"):
            passes, pass_shares = time_passes(data, max(0, args.workers), args.repeats, cuda_batch)
    run.update(load_end=load_average(), seconds=time.perf_counter() - run["clock"])
    res = {"reads": reads, "sums": sums, "rates": rates, "passes": passes, "shares": read_shares + pass_shares}
    publish(report(args, data, res, run), args.out)


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. '1.20/0.90/0.75' (a shared machine's numbers need it beside them)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
