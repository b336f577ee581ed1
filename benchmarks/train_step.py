"""Benchmark: PVEN training-step throughput per precision mode, and the data loader beside it.

    python benchmarks/train_step.py                          # CPU, writes benchmarks/RESULTS-train_step.md
    python benchmarks/train_step.py --device cuda --out benchmarks/RESULTS-train_step-cuda.md
    python benchmarks/train_step.py --presets default --steps 5 --out -     # quick look, print only

Training step = uint8 batch -> normalise -> forward -> the three PVEN losses ->
backward -> Adam step (the real ``DDPBackend`` of one process). Modes: fp32 eager,
channels_last, bf16 autocast, channels_last + bf16. Presets: ``default`` (params.yaml:
ResNet-18 at 128 px, P x K = 8 x 4) and ``paper`` (ResNet-50 at 256 px; batch 16
instead of 64 on CPU to keep the run short: the rate is per image). Inputs are random
pixels with random label maps (the cost does not depend on content). ``loss`` columns
are the first and last loss of the timed steps on one fixed batch: the model
memorises it, so the loss must fall in every mode.

Loader = ``TrainStream`` + ``PKBatcher`` + decode/resize/augment + collate on shards of
the default synthetic data set (rendered here with every training image labelled,
as the masked shards are), in images per second, for 0, 1 and 2 loader workers,
with the main process only consuming batches.

Numbers are noisy on a shared machine: ratios come from one run, modes interleaved.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from pipeline.config import LossConfig, load_params  # noqa: E402
from pipeline.data.transforms import normalize_images  # noqa: E402
from pipeline.dist.backends import BackendOptions, DDPBackend  # noqa: E402
from pipeline.dist.env import DistInfo, bf16_supported  # noqa: E402
from pipeline.reid.losses import pven_loss  # noqa: E402
from pipeline.reid.model import PVEN  # noqa: E402

PRESETS = {  # backbone, image px, P, K (paper: 16 x 4 = 64, here 4 x 4 = 16 on CPU)
    "default": ("resnet18", 128, 8, 4),
    "paper": ("resnet50", 256, 4, 4),
}
MODES = {"fp32": (False, "fp32"), "channels_last": (True, "fp32"),
         "bf16": (False, "bf16"), "channels_last+bf16": (True, "bf16")}


def step_rate(preset: str, mode: str, steps: int, device: torch.device) -> dict:
    backbone, size, P, K = PRESETS[preset]
    channels_last, precision = MODES[mode]
    torch.manual_seed(0)
    model = PVEN(60, backbone)
    info = DistInfo(0, 1, 0, device, False)
    backend = DDPBackend(model, info, BackendOptions(lr=3.5e-4, weight_decay=5e-4, lr_lambda=lambda s: 1.0,
                                                     micro_batch=P * K, precision=precision,
                                                     channels_last=channels_last))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (P * K, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    masks = torch.randint(0, 5, (P * K, size, size), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.arange(P, device=device).repeat_interleave(K)
    backend.train()
    losses, times = [], []
    for i in range(steps + 2):  # 2 warm-up steps (allocator, oneDNN kernel selection)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = backend.forward(normalize_images(images, channels_last), masks)
        loss = pven_loss(out, labels, LossConfig())["loss"]
        backend.step(loss)
        value = loss.item()  # also waits for the device
        if i >= 2:
            times.append(time.perf_counter() - t0)
            losses.append(value)
    sec = statistics.median(times)
    return {"preset": preset, "mode": mode, "batch": P * K, "s_per_step": sec, "img_s": P * K / sec,
            "loss_first": losses[0], "loss_last": losses[-1]}


def make_shards(tmp: Path) -> Path:
    """The default synthetic data set, every training image labelled, sharded."""
    from pipeline.data.shards import ShardOptions, write_shards
    from pipeline.data.sources import read_dataset
    from pipeline.data.synthetic import render_dataset
    params = load_params(ROOT / "params.yaml")
    render_dataset(replace(params.synth, label_fraction=1.0), tmp / "synthetic", seed=0)
    splits = read_dataset("synthetic", tmp / "synthetic")
    write_shards(splits, tmp / "shards", ShardOptions(min_shards=4), seed=0)
    return tmp / "shards"


def loader_rate(shards: Path, workers: int, batches: int) -> dict:
    from pipeline.data.shards import TrainStream, shard_urls
    from pipeline.reid.data import TrainTransform, collate, read_vid
    from pipeline.reid.sampling import PKBatcher
    cfg = load_params(ROOT / "params.yaml").reid
    stream = TrainStream(shard_urls(shards, "train"), batch_size=cfg.P * cfg.K, batches_per_epoch=batches,
                         seed=0, num_workers=workers, shuffle_buffer=cfg.shuffle_buffer, map_fn=read_vid,
                         batch_fn=PKBatcher(cfg.P, cfg.K, 0, TrainTransform(tuple(cfg.image_size), cfg.pad,
                                                                            cfg.erase_prob)),
                         collate_fn=collate)
    it = iter(stream.epoch(0))
    next(it)  # worker start-up and the first fill of the shuffle/identity buffers
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    sec = time.perf_counter() - t0
    return {"workers": workers, "img_s": n * cfg.P * cfg.K / sec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (paper preset: half)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--shards", type=Path, default=None, help="masked shards to read (default: render them)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/RESULTS-train_step.md"), help="'-' prints only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for preset in args.presets:
        steps = args.steps if preset == "default" else max(2, args.steps // 2)
        for mode in MODES:
            rows.append(step_rate(preset, mode, steps, device))
            r = rows[-1]
            print(f"{preset:8s} {mode:20s} {r['img_s']:8.1f} img/s  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                  flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp))
        loads = [loader_rate(shards, w, args.loader_batches) for w in (0, 1, 2)]
    for r in loads:
        print(f"loader workers={r['workers']}: {r['img_s']:.0f} img/s", flush=True)

    lines = [
        "# Training-step and loader throughput (benchmarks/train_step.py)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, device {device}, {args.threads} threads, native bf16: {bf16_supported(device)}. "
        f"Median of {args.steps} timed steps (paper preset: {max(2, args.steps // 2)}) after 2 warm-up steps.", "",
        "| preset | mode | batch | s/step | img/s | x fp32 | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = next(x for x in rows if x["preset"] == r["preset"] and x["mode"] == "fp32")
        lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['s_per_step']:.3f} | {r['img_s']:.1f} | "
                     f"{r['img_s'] / base['img_s']:.2f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    default = {r["mode"]: r["img_s"] for r in rows if r["preset"] == "default"}
    lines += ["", "| loader workers | img/s | x default step (channels_last+bf16) |", "| --- | --- | --- |"]
    for r in loads:
        ratio = r["img_s"] / default["channels_last+bf16"] if "channels_last+bf16" in default else float("nan")
        lines.append(f"| {r['workers']} | {r['img_s']:.0f} | {ratio:.1f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
