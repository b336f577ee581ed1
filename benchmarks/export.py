"""Benchmark: the exported PVEN in onnxruntime against torch eager, images per second.

    python benchmarks/export.py                                # CPU, writes benchmarks/RESULTS-export.md
    python benchmarks/export.py --device cuda --out benchmarks/RESULTS-export-cuda.md
    python benchmarks/export.py --presets default --repeats 3 --out -      # quick look, print only

Inference = uint8 images (B, 3, H, W) + uint8 label maps (B, H, W) -> global, part features
and visibilities: :class:`pipeline.export.graphs.ReidGraph` in torch (fp32; bf16 autocast;
on CUDA also bf16 + channels_last; bf16 only where the device has it natively) against the
same graph exported to ONNX
(:func:`pipeline.export.graphs.export_onnx`) and run by onnxruntime (CPU execution provider;
on CUDA also the CUDA provider when onnxruntime has it). Batches of 1 and 32; presets
``default`` (ResNet-18 at 128 px) and ``paper`` (ResNet-50 at 256 px). Random weights and
pixels (the cost does not depend on them). Median of ``--repeats`` timed calls after 2
warm-up calls; modes interleaved per batch size.
"""
from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from pipeline.dist.env import bf16_supported  # noqa: E402
from pipeline.export.graphs import ReidGraph, export_onnx  # noqa: E402
from pipeline.export.runtime import OnnxReid  # noqa: E402
from pipeline.reid.model import PVEN  # noqa: E402

PRESETS = {"default": ("resnet18", 128), "paper": ("resnet50", 256)}


def timed(call, repeats: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(preset: str, batches: list[int], repeats: int, device: str, folder: Path) -> list[dict]:
    backbone, size = PRESETS[preset]
    torch.manual_seed(0)
    graph = ReidGraph(PVEN(100, backbone).eval())
    example = (torch.zeros(2, 3, size, size, dtype=torch.uint8), torch.zeros(2, size, size, dtype=torch.uint8))
    path = export_onnx(graph, example, folder / f"{preset}.onnx", ["images", "masks"],
                       ["global", "local", "visibility"])
    runners = {"onnxruntime cpu": OnnxReid(path)}
    if device == "cuda":
        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers():
            runners["onnxruntime cuda"] = OnnxReid(path, ["CUDAExecutionProvider"])
    return [row for batch in batches for row in measure(preset, graph, runners, batch, size, repeats,
                                                        torch.device(device))]


def measure(preset: str, graph: ReidGraph, runners: dict, batch: int, size: int, repeats: int,
            device: torch.device) -> list[dict]:
    """One batch size: every torch mode and every onnxruntime provider, interleaved."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    masks = torch.from_numpy(rng.integers(0, 5, (batch, size, size), dtype=np.uint8))
    on_device = graph.to(device)
    last = copy.deepcopy(on_device).to(memory_format=torch.channels_last)
    x, m = images.to(device), masks.to(device)

    def eager(net, bf16: bool, channels_last: bool = False):
        def call():
            inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(inputs, m)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return call
    modes = {"torch eager fp32": eager(on_device, False)}
    if bf16_supported(device):  # emulated bf16 (a CPU without AVX512-BF16/AMX) is ~10x slower than fp32
        modes["torch eager bf16"] = eager(on_device, True)
    if device.type == "cuda":
        modes["torch bf16 + channels_last"] = eager(last, True, True)
    for name, runner in runners.items():
        modes[name] = functools.partial(runner, images, masks)
    rows = []
    for name, call in modes.items():
        seconds = timed(call, repeats)
        rows.append({"preset": preset, "batch": batch, "mode": name, "s": seconds, "img_s": batch / seconds})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/RESULTS-export.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for preset in args.presets for r in run(preset, args.batches, args.repeats, args.device, Path(tmp))]
    lines = [f"# Exported PVEN: onnxruntime against torch eager (benchmarks/export.py, {time.strftime('%Y-%m-%d')})",
             "", f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"device {args.device}, native bf16: {bf16_supported(torch.device(args.device))}. "
             f"Median of {args.repeats} calls after 2 warm-up calls.", "",
             "| preset | batch | mode | s/call | img/s | x torch fp32 |", "| --- | --- | --- | --- | --- | --- |"]
    base = {(r["preset"], r["batch"]): r["s"] for r in rows if r["mode"] == "torch eager fp32"}
    for r in rows:
        lines.append(f"| {r['preset']} | {r['batch']} | {r['mode']} | {r['s']:.4f} | {r['img_s']:.1f} | "
                     f"{base[(r['preset'], r['batch'])] / r['s']:.2f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
