"""Throughput of the synthetic renderer (images/s, JPEG + label PNG encoding and writing included).

    python benchmarks/synthetic.py                       # 128 and 256 px, 4000 images, 2 workers
    python benchmarks/synthetic.py --sizes 128 --images 2000 --workers 1 2

Renders a dataset of about ``--images`` images with the default SynthConfig shape
(cameras per id, images per camera, label fraction) into a temporary folder through
the public ``render_dataset``, so process start-up, planning, views.csv and the
atomic folder swap are all in the measured time. Prints a markdown table.

Besides wall-clock images/s it reports images per CPU-second (user + system time
of this process and its workers): other jobs on a shared machine slow the wall
clock, while CPU time per image barely changes, so ``workers x img/CPU-s`` is what
the same run would reach on idle cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import tempfile
from pathlib import Path

from pipeline.config import SynthConfig
from pipeline.data.synthetic import render_dataset


def config_for(images: int, size: int, workers: int) -> SynthConfig:
    """A default-shaped config with about ``images`` rendered images (2/3 train ids, 1/3 test)."""
    base = SynthConfig()
    per_id = (sum(base.cameras_per_id) / 2) * (sum(base.images_per_camera) / 2)
    ids = max(4, round(images / per_id))
    return dataclasses.replace(base, train_ids=max(2, 2 * ids // 3), test_ids=max(2, ids - 2 * ids // 3),
                               image_size=size, workers=workers)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="square image sizes (px)")
    parser.add_argument("--images", type=int, default=4000, help="about this many images per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker process counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print()
    print("| size (px) | workers | images | files | seconds | images/s | images/CPU-s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        for size in args.sizes:
            for workers in args.workers:
                cfg = config_for(args.images, size, workers)
                cpu = _cpu_seconds()
                summary = render_dataset(cfg, Path(tmp) / f"s{size}w{workers}", seed=args.seed)
                cpu = _cpu_seconds() - cpu
                print(f"| {size} | {workers} | {summary['images_rendered']} | {summary['files_written']} "
                      f"| {summary['seconds']:.2f} | {summary['images_per_s']:.0f} "
                      f"| {summary['images_rendered'] / cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
