"""Benchmark: search query latency and memory against index size (10k, 100k, 1M images).

    python benchmarks/search.py                                  # writes benchmarks/RESULTS-search.md
    python benchmarks/search.py --sizes 10000 100000 --out -     # quick look, print only

Indexes are synthetic features written straight to disk in the search index format
(:mod:`pipeline.search.index`: ResNet-18 sizes, global 512-d, parts 4 x 512, random
visibilities), never rendered. A query = the exact PVEN top-10 of ``--queries`` query
features over the whole index, streamed in blocks of ``--block-rows`` rows read from the
files (:func:`pipeline.evaluation.topk.nearest` over
:func:`pipeline.search.index.index_blocks`): the search command's ranking, without the
image decoding and the two networks (a constant per query image, see RESULTS-export.md).
Each size runs in its own process, which reports the median of 3 queries on a warm page
cache and its peak resident memory (VmHWM).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402

C = 512
CHUNK = 50_000


def write_index(folder: Path, n: int, seed: int = 0) -> None:
    """n random images in the index format, written chunk by chunk (memory: one chunk)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    shapes = {"global": ((n, C), np.float32), "local": ((n, 4, C), np.float32), "visibility": ((n, 4), np.float32),
              "ids": ((n,), np.int64), "cams": ((n,), np.int64)}
    out = {k: np.lib.format.open_memmap(folder / f"{k}.npy", "w+", dtype, shape)
           for k, (shape, dtype) in shapes.items()}
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        out["global"][s:e] = rng.standard_normal((e - s, C), np.float32)
        out["local"][s:e] = rng.standard_normal((e - s, 4, C), np.float32)
        out["visibility"][s:e] = rng.integers(0, 64, (e - s, 4))
        out["ids"][s:e] = np.arange(s, e)
        out["cams"][s:e] = -1
    for a in out.values():
        a.flush()
    with open(folder / "keys.txt", "w") as f:
        f.writelines(f"img{i:07d}\n" for i in range(n))


def query_child(folder: str, queries: int, block_rows: int) -> None:
    """In a fresh process: time the top-10 of ``queries`` queries, print JSON with the peak memory."""
    from pipeline.evaluation.features import FeatureSet
    from pipeline.evaluation.spec import DistanceSpec
    from pipeline.evaluation.topk import QUERY_TILE, nearest
    from pipeline.search.index import index_blocks
    rng = np.random.default_rng(1)
    vis = rng.integers(0, 64, (queries, 4)).astype(np.float32)
    q = FeatureSet(np.full(queries, -1), None, rng.standard_normal((queries, C), np.float32),
                   rng.standard_normal((queries, 4, C), np.float32), vis)
    times = []
    for _ in range(4):   # the first warms the page cache
        t = time.perf_counter()
        nearest(q, index_blocks(Path(folder), block_rows), DistanceSpec(mode="pven"), 10, QUERY_TILE)
        times.append(time.perf_counter() - t)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"first_s": times[0], "median_s": float(np.median(times[1:])), "peak_mib": hwm / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--block-rows", type=int, default=65536)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/RESULTS-search.md"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return query_child(args.child[0], int(args.child[1]), int(args.child[2]))
    rows = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"index{n}"
            t = time.perf_counter()
            write_index(folder, n)
            written = time.perf_counter() - t
            for queries in args.queries:
                done = subprocess.run([sys.executable, __file__, "--child", str(folder), str(queries),
                                       str(args.block_rows)], capture_output=True, text=True, check=True)
                rows.append({"n": n, "queries": queries, "written_s": written,
                             "gib": sum(f.stat().st_size for f in folder.iterdir()) / 2**30,
                             **json.loads(done.stdout.strip().splitlines()[-1])})
                print(rows[-1], flush=True)
            for f in folder.iterdir():
                f.unlink()
    lines = [f"# Search query latency against index size (benchmarks/search.py, {time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. Exact PVEN top-10 (paper variant), "
             f"index streamed in blocks of {args.block_rows} rows read from its files; median of 3 queries on a "
             "warm page cache (first: the query that read the files). Peak = the query process's VmHWM.", "",
             "| index images | index GiB | queries | first s | median s | s per query image | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['gib']:.2f} | {r['queries']} | {r['first_s']:.2f} | {r['median_s']:.3f} | "
                     f"{r['median_s'] / r['queries']:.3f} | {r['peak_mib']:.0f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
