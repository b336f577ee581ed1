"""Benchmark: the PVEN train step under torchrun on one device, without and with the DDP wrapper.

    torchrun --standalone --nproc_per_node 1 benchmarks/ddp_step.py --device cuda --preset paper --out FILE
    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/ddp_step.py \
        --device cpu --preset default --size 64 --steps 2 --out -      # gloo: gpu.sh's CPU smoke run

Two rows in the one torchrun process, in the same mode (``--mode``, default params.yaml's
channels_last + bf16) on the same fixed batch as ``benchmarks/train_step.py``:

* ``no process group``: what ``torchrun --nproc_per_node 1 stages/train_reid.py`` runs:
  ``init_distributed()`` sees WORLD_SIZE 1, creates no group, and the DDP backend trains
  the bare model.
* ``DistributedDataParallel``: a 1-rank process group joined from torchrun's environment
  (nccl on CUDA, gloo on CPU) and the backend's own DDP wrapper around the model: what
  each rank of a multi-GPU run pays (gradient buckets, one all-reduce per bucket; at world
  size 1 a copy), without the other ranks' traffic.

Compare both with the single-process row of the same mode in train_step.py. Rank 0 writes
the report (``--out``; ``-`` prints only). Exits non-zero with the error if either row fails.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from benchmarks.train_step import MODES, PRESETS, machine_line, mode_label, step_rate  # noqa: E402
from pipeline.dist.env import DistInfo, init_distributed  # noqa: E402


class OneRankGroup(DistInfo):
    """A rank of a process group of world size 1 that the backend still treats as distributed.

    The pipeline wraps the model in DDP only when ``world_size > 1`` (nothing to average
    otherwise); this benchmark wants that wrapper's cost on one device, so ``distributed``
    says whether a group exists instead.
    """

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def torchrun_env() -> tuple[int, int]:
    """(LOCAL_RANK, WORLD_SIZE) from torchrun's environment; a clear error outside torchrun or above 1 rank."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_RANK" not in os.environ:
        sys.exit("ddp_step.py: run it under torchrun "
                 "(python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/ddp_step.py ...)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        sys.exit(f"ddp_step.py: WORLD_SIZE is {world}; this benchmark measures one device (--nproc_per_node 1)")
    return int(os.environ["LOCAL_RANK"]), world


def pipeline_info(device: torch.device) -> DistInfo:
    """The DistInfo ``stages/train_reid.py`` would get here, on ``device`` (which --device may force to CPU)."""
    info = init_distributed(timeout_s=120)
    if info.distributed or dist.is_initialized():
        raise RuntimeError("init_distributed() created a process group at WORLD_SIZE 1; this benchmark assumes none")
    return replace(info, device=device)


def group_info(device: torch.device, local_rank: int) -> DistInfo:
    """Join a 1-rank group from torchrun's env:// variables: nccl on CUDA, gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=120))
    return OneRankGroup(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=True)


def report(rows: list[dict], device: torch.device, threads: int, args: argparse.Namespace) -> str:
    """Markdown: the machine line, then one table row per path (see the module docstring)."""
    base = rows[0]["img_s"]
    lines = ["# Train step under torchrun, one device (benchmarks/ddp_step.py)", "",
             f"{machine_line(device, threads)} `torchrun --standalone --nproc_per_node 1`; median of {args.steps} "
             f"timed steps after {args.warmup} warm-up steps.", "",
             "| path | process group | model wrapper | mode | batch | px | first step s | s/step | img/s | "
             "x no group | loss first -> last |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['group']} | {r['wrapper']} | {mode_label(r)} | {r['batch']} | {r['size']} | "
                     f"{r['first_s']:.2f} | {r['s_per_step']:.3f} | {r['img_s']:.1f} | {r['img_s'] / base:.2f} | "
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="paper", choices=list(PRESETS))
    ap.add_argument("--mode", default="channels_last+bf16", choices=[m for m in MODES if m != "compile"])
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: the preset's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="-", help="report file ('-': print only)")
    args = ap.parse_args(argv)
    local_rank, _ = torchrun_env()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)

    rows = []
    for path, make_info in (("no process group", lambda: pipeline_info(device)),
                            ("DistributedDataParallel", lambda: group_info(device, local_rank))):
        info = make_info()
        row = step_rate(args.preset, args.mode, args.steps, device, size=args.size, warmup=args.warmup, info=info)
        expected = "DistributedDataParallel" if info.distributed else "PVEN"
        if row["wrapper"] != expected:
            raise RuntimeError(f"{path}: the backend wrapped the model in {row['wrapper']}, expected {expected}")
        rows.append({**row, "path": path, "group": dist.get_backend() if dist.is_initialized() else "none"})
        print(f"{path:24s} {row['img_s']:8.1f} img/s  loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}",
              flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    publish(report(rows, device, args.threads, args), args.out)


if __name__ == "__main__":
    main()
