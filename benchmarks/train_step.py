"""Benchmark: PVEN training-step throughput per precision mode, and the data loader beside it.

    python benchmarks/train_step.py                          # CPU, writes benchmarks/RESULTS-train_step.md
    python benchmarks/train_step.py --presets default --steps 5 --out -     # quick look, print only
    python benchmarks/train_step.py --device cuda --presets paper --modes fp32 channels_last+bf16 compile \
        --loader-preset paper --loader-workers 2 4 8 --out FILE            # what benchmarks/gpu.sh runs

Training step = uint8 batch -> normalise -> forward -> the three PVEN losses ->
backward -> Adam step (the real ``DDPBackend`` of one process). Modes (``--modes``): fp32
eager, channels_last, bf16 autocast, channels_last + bf16, and ``compile``: channels_last +
bf16 with the model under ``torch.compile`` (``nn.Module.compile``, in place, so the
backend's optimizer and hooks see the same parameters; backend ``--compile-backend``,
default inductor). Presets: ``default`` (params.yaml: ResNet-18 at 128 px, P x K = 8 x 4)
and ``paper`` (ResNet-50 at 256 px; P x K = 16 x 4 = 64 on CUDA as the authors trained,
4 x 4 = 16 on CPU to keep the run short: the rate is per image). ``--size`` overrides the
image side of every preset (the CPU smoke run of benchmarks/gpu.sh uses 64 px).

Inputs are random pixels with random label maps (the cost does not depend on content).
Each mode runs one first step (timed alone: for ``compile`` it holds the compilation of
the forward and backward graphs, so it is reported apart from the steady state), then
``--warmup - 1`` untimed steps, then ``--steps`` timed steps (median). ``loss`` columns
are the first and last loss of the timed steps on one fixed batch: the model memorises
it, so the loss must fall in every mode. ``TFLOP/s`` = img/s x the forward + backward
FLOPs of one image, counted by ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs).

A failing mode ends the run with its error (a ``compile`` without a C++ compiler on CPU,
or without triton on CUDA, included): benchmarks/gpu.sh must not record a table that
silently lacks a row.

Loader = ``TrainStream`` + ``PKBatcher`` + decode/resize/augment + collate on shards of
the default synthetic data set (rendered here at the loader preset's image size with every
training image labelled, as the masked shards are; ``--loader-ids`` shrinks it), in images
per second, for each ``--loader-workers`` count (none: no loader rows), with the main
process only consuming batches. The last line says how many workers keep up with the
fastest measured step of the loader preset.

Numbers are noisy on a shared machine: ratios come from one run, modes interleaved.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Preset:
    backbone: str
    size: int                  # image side, px
    cpu_pk: tuple[int, int]    # P identities x K images per batch on CPU
    cuda_pk: tuple[int, int]   # ... on CUDA

    def pk(self, device: torch.device) -> tuple[int, int]:
        return self.cuda_pk if device.type == "cuda" else self.cpu_pk


@dataclass(frozen=True)
class Mode:
    channels_last: bool
    precision: str   # 'fp32' or 'bf16' (autocast), as reid.precision
    compiled: bool = False


PRESETS = {
    "default": Preset("resnet18", 128, (8, 4), (8, 4)),
    "paper": Preset("resnet50", 256, (4, 4), (16, 4)),  # the authors' batch 64 on GPU
}
MODES = {"fp32": Mode(False, "fp32"), "channels_last": Mode(True, "fp32"), "bf16": Mode(False, "bf16"),
         "channels_last+bf16": Mode(True, "bf16"), "compile": Mode(True, "bf16", compiled=True)}
EAGER_MODES = ["fp32", "channels_last", "bf16", "channels_last+bf16"]
NUM_CLASSES = 60


def bench_backend(preset: str, mode: str, device: torch.device, info: DistInfo | None = None,
                  compile_backend: str = "inductor") -> DDPBackend:
    """A fresh seeded PVEN of ``preset`` inside the real DDP backend (one process unless ``info`` says otherwise)."""
    spec, m = PRESETS[preset], MODES[mode]
    P, K = spec.pk(device)
    torch.manual_seed(0)
    info = info or DistInfo(0, 1, 0, device, False)
    backend = DDPBackend(PVEN(NUM_CLASSES, spec.backbone), info,
                         BackendOptions(lr=3.5e-4, weight_decay=5e-4, lr_lambda=lambda s: 1.0, micro_batch=P * K,
                                        precision=m.precision, channels_last=m.channels_last))
    if m.compiled:
        # In place: backend.wrapped (the module itself, or DDP around it) now calls the compiled forward.
        backend.module.compile(backend=compile_backend)
    return backend


def fixed_batch(P: int, K: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded random batch: images uint8 (P*K, 3, size, size), label maps uint8 (P*K, size, size) in 0..4,
    labels int64 (P*K,) = K images of each of P identities."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (P * K, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    masks = torch.randint(0, 5, (P * K, size, size), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.arange(P, device=device).repeat_interleave(K)
    return images, masks, labels


def train_step(backend: DDPBackend, batch: tuple[torch.Tensor, ...], channels_last: bool) -> float:
    """One training step on ``batch`` (see :func:`fixed_batch`) -> the loss; returns once the device is done."""
    images, masks, labels = batch
    out = backend.forward(normalize_images(images, channels_last), masks)
    loss = pven_loss(out, labels, LossConfig())["loss"]
    backend.step(loss)
    return loss.item()  # also waits for the device, as the training loop's per-step loss check does


def step_rate(preset: str, mode: str, steps: int, device: torch.device, *, size: int | None = None,
              warmup: int = 2, info: DistInfo | None = None, compile_backend: str = "inductor") -> dict:
    """Time ``steps`` training steps after ``warmup`` (>= 1) untimed ones -> a result row.

    Row: ``first_s`` (the first step alone, s; compilation included for ``compile``),
    ``s_per_step`` (median of the timed steps, s), ``img_s`` (images/s), ``loss_first`` /
    ``loss_last`` (timed steps), ``losses`` (every step's, warm-up included), ``peak_gib``
    (CUDA: peak allocated memory, GiB; else None), ``bf16`` (whether autocast ran bf16),
    ``wrapper`` (the class the backend trains through: the model, or DistributedDataParallel).
    """
    if warmup < 1 or steps < 1:
        raise ValueError(f"--warmup {warmup} / --steps {steps}: need at least one of each")
    P, K = PRESETS[preset].pk(device)
    size = size or PRESETS[preset].size
    backend = bench_backend(preset, mode, device, info, compile_backend)
    batch = fixed_batch(P, K, size, device)
    backend.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        value = train_step(backend, batch, MODES[mode].channels_last)
        times.append(time.perf_counter() - t0)
        losses.append(value)
    sec = statistics.median(times[warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"preset": preset, "mode": mode, "batch": P * K, "size": size, "first_s": times[0],
           "s_per_step": sec, "img_s": P * K / sec, "loss_first": losses[warmup], "loss_last": losses[-1],
           "losses": losses, "peak_gib": peak, "bf16": backend.autocast_dtype is not None,
           "wrapper": type(backend.wrapped).__name__}
    del backend, batch
    release()
    return row


def release() -> None:
    """Free what the last mode held before the next one is measured (CUDA memory, compiled graphs)."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gflop_per_image(preset: str, size: int, device: torch.device) -> float:
    """Forward + backward (+ losses) FLOPs of one image, in GFLOP, counted on a batch of 2 x 2 in fp32."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = PVEN(NUM_CLASSES, PRESETS[preset].backbone).to(device).train()
    images, masks, labels = fixed_batch(2, 2, size, device)
    with FlopCounterMode(display=False) as counter:
        out = model(normalize_images(images), masks)
        pven_loss(out, labels, LossConfig())["loss"].backward()
    return counter.get_total_flops() / len(labels) / 1e9


def make_shards(tmp: Path, size: int, ids: int | None = None) -> Path:
    """The default synthetic data set at ``size`` px (``ids`` training and test identities if given),
    every training image labelled, sharded into ``tmp/shards``."""
    from pipeline.data.shards import ShardOptions, write_shards
    from pipeline.data.sources import read_dataset
    from pipeline.data.synthetic import render_dataset
    synth = replace(load_params(ROOT / "params.yaml").synth, label_fraction=1.0, image_size=size)
    if ids is not None:
        synth = replace(synth, train_ids=ids, test_ids=ids)
    # Render workers are spawned and each re-imports torch (seconds): one per ~15 identities.
    synth = replace(synth, workers=max(1, min(os.cpu_count() or 1, 16, (synth.train_ids + synth.test_ids) // 15)))
    render_dataset(synth, tmp / "synthetic", seed=0)
    splits = read_dataset("synthetic", tmp / "synthetic")
    write_shards(splits, tmp / "shards", ShardOptions(min_shards=4), seed=0)
    return tmp / "shards"


def loader_rate(shards: Path, workers: int, batches: int, size: int, P: int, K: int) -> dict:
    """Images/s of the training loader (P x K batches of ``size`` px) with ``workers`` worker processes."""
    from pipeline.data.shards import TrainStream, shard_urls
    from pipeline.reid.data import TrainTransform, collate, read_vid
    from pipeline.reid.sampling import PKBatcher
    cfg = load_params(ROOT / "params.yaml").reid
    stream = TrainStream(shard_urls(shards, "train"), batch_size=P * K, batches_per_epoch=batches + 1,
                         seed=0, num_workers=workers, shuffle_buffer=cfg.shuffle_buffer, map_fn=read_vid,
                         batch_fn=PKBatcher(P, K, 0, TrainTransform((size, size), cfg.pad, cfg.erase_prob)),
                         collate_fn=collate)
    it = iter(stream.epoch(0))
    next(it)  # worker start-up and the first fill of the shuffle/identity buffers
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    sec = time.perf_counter() - t0
    return {"workers": workers, "img_s": n * P * K / sec}


def machine_line(device: torch.device, threads: int) -> str:
    """One line naming the machine, the software and the device."""
    gpu = ""
    if device.type == "cuda":  # fp32 rows: convolutions may use TF32 (cuDNN's default), matmuls as set here
        gpu = (f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}; fp32 convolutions allow TF32: "
               f"{torch.backends.cudnn.allow_tf32}, fp32 matmul precision: {torch.get_float32_matmul_precision()})")
    return (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, device {device}{gpu}, {threads} threads, native bf16: {bf16_supported(device)}.")


def mode_label(row: dict) -> str:
    """A row's mode, marked when bf16 was asked for but the device has none (the backend then runs fp32)."""
    asked_bf16 = MODES[row["mode"]].precision == "bf16"
    return f"{row['mode']} (ran fp32)" if asked_bf16 and not row["bf16"] else row["mode"]


def step_table(rows: list[dict], gflop: dict[str, float]) -> list[str]:
    """Markdown table of :func:`step_rate` rows; ``gflop`` maps preset -> GFLOP per image."""
    lines = ["| preset | mode | batch | px | first step s | s/step | img/s | x fp32 | TFLOP/s | peak GiB | "
             "loss first -> last |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = next((x for x in rows if x["preset"] == r["preset"] and x["mode"] == "fp32"), None)
        ratio = f"{r['img_s'] / base['img_s']:.2f}" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mode = mode_label(r)
        tflops = r["img_s"] * gflop[r["preset"]] / 1e3
        lines.append(f"| {r['preset']} | {mode} | {r['batch']} | {r['size']} | {r['first_s']:.2f} | "
                     f"{r['s_per_step']:.3f} | {r['img_s']:.1f} | {ratio} | {tflops:.2f} | {peak} | "
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return lines


def loader_table(loads: list[dict], rows: list[dict], preset: str, size: int, batch: int) -> list[str]:
    """Markdown table of loader rates, each against the fastest measured step of ``preset``."""
    best = max((r for r in rows if r["preset"] == preset), key=lambda r: r["img_s"], default=None)
    against = f"x {preset} {best['mode']} step" if best else "x step"
    lines = [f"Loader: {preset} preset input ({size} px, batch {batch}).", "",
             f"| loader workers | img/s | {against} |", "| --- | --- | --- |"]
    for r in loads:
        ratio = f"{r['img_s'] / best['img_s']:.2f}" if best else "-"
        lines.append(f"| {r['workers']} | {r['img_s']:.0f} | {ratio} |")
    if best:
        enough = [r["workers"] for r in loads if r["img_s"] >= best["img_s"]]
        if not enough:
            verdict = "none of the measured worker counts keeps up"
        elif min(enough) == 0:
            verdict = "decoding in the main process (0 workers) keeps up"
        else:
            verdict = f"{min(enough)} worker processes keep up (as many cores, plus the main process driving the step)"
        lines += ["", f"Keeping up with {best['img_s']:.0f} img/s ({preset}, {best['mode']}): {verdict}."]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--modes", nargs="*", default=EAGER_MODES, choices=list(MODES),
                    help="training-step modes, in this order (none: loader only)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (paper preset on CPU: half)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them, the first one included")
    ap.add_argument("--size", type=int, default=None, help="image side in px for every preset (default: the preset's)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile mode")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loader-workers", nargs="*", type=int, default=[0, 1, 2], help="none: no loader rows")
    ap.add_argument("--loader-preset", default="default", choices=list(PRESETS))
    ap.add_argument("--loader-batches", type=int, default=30)
    ap.add_argument("--loader-ids", type=int, default=None, help="identities per split of the loader's data set")
    ap.add_argument("--shards", type=Path, default=None, help="masked shards to read (default: render them)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/RESULTS-train_step.md"), help="'-' prints only")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    rows, gflop = [], {}
    for preset in args.presets if args.modes else []:
        steps = max(2, args.steps // 2) if preset == "paper" and device.type == "cpu" else args.steps
        gflop[preset] = gflop_per_image(preset, args.size or PRESETS[preset].size, device)
        for mode in args.modes:
            rows.append(step_rate(preset, mode, steps, device, size=args.size, warmup=args.warmup,
                                  compile_backend=args.compile_backend))
            r = rows[-1]
            print(f"{preset:8s} {mode:20s} {r['img_s']:8.1f} img/s  first step {r['first_s']:.2f} s  "
                  f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)

    lp = PRESETS[args.loader_preset]
    loader_size = args.size or lp.size
    P, K = lp.pk(device)
    loads = []
    if args.loader_workers:
        with tempfile.TemporaryDirectory() as tmp:
            shards = args.shards or make_shards(Path(tmp), loader_size, args.loader_ids)
            for w in args.loader_workers:
                loads.append(loader_rate(shards, w, args.loader_batches, loader_size, P, K))
                print(f"loader workers={w}: {loads[-1]['img_s']:.0f} img/s", flush=True)

    lines = ["# Training-step and loader throughput (benchmarks/train_step.py)", "",
             f"{machine_line(device, args.threads)} Median of {args.steps} timed steps (paper preset on CPU: "
             f"{max(2, args.steps // 2)}) after {args.warmup} warm-up steps; the first step is timed alone.", ""]
    if rows:
        lines += [*step_table(rows, gflop), ""]
        lines += ["Forward + backward per image: " + ", ".join(f"{p} {g:.1f} GFLOP" for p, g in gflop.items()) + ".",
                  ""]
    if loads:
        lines += loader_table(loads, rows, args.loader_preset, loader_size, P * K)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
