"""Run the real ReID training loop under torchrun (or as one plain process) and report what happened.

    torchrun --nproc_per_node 2 tests/workers/reid_train.py DATA_DIR WORK_DIR RESULT_JSON \
        [--kill-at STEP] [OVERRIDE ...]

OVERRIDEs are params.yaml dotted overrides (``reid.P=3``). Rank 0 writes RESULT_JSON:
per-step losses, the per-rank sha256 of the trained parameters (and of the buffers),
the step the run resumed from, and the summary. ``--kill-at STEP`` SIGKILLs rank 0
right after checkpoint STEP is complete, on the first attempt only
(TORCHELASTIC_RESTART_COUNT 0), so ``torchrun --max-restarts 1`` restarts the job and
it must resume from that checkpoint.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.dist.env import init_distributed, shutdown  # noqa: E402
from pipeline.reid.train import train  # noqa: E402


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("work")
    parser.add_argument("result")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    params = load_params(ROOT / "params.yaml", args.overrides)
    info = init_distributed(timeout_s=120)
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0

    def on_checkpoint(step: int, folder: Path) -> None:
        if args.kill_at == step and first_attempt and info.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a preempted node

    work = Path(args.work)
    try:
        result = train(params, info, data_dir=args.data, out_dir=work / "model", checkpoint_dir=work / "ckpt",
                       on_checkpoint=on_checkpoint, show_progress=False)
        mine = {"rank": info.rank, "params": digest(p for p in result.model.parameters()),
                "buffers": digest(b for b in result.model.buffers() if b.is_floating_point()),
                "centers": digest([result.model.centers]) if hasattr(result.model, "centers") else None,
                "val": {k: v for k, v in result.summary.items() if k.startswith("val_")}}
        ranks = [mine]
        if info.distributed:
            ranks = [None] * info.world_size
            dist.all_gather_object(ranks, mine)
        if info.is_main:
            Path(args.result).write_text(json.dumps({
                "steps": result.steps, "ranks": ranks, "resumed_from": result.resumed_from,
                "summary": result.summary, "model_path": str(result.model_path)}))
    finally:
        shutdown(info)


if __name__ == "__main__":
    main()
    # Everything is written and the group destroyed: leave without interpreter teardown. Native
    # threads (gloo, DeepSpeed's CPU shm comm) occasionally abort it with "terminate called without
    # an active exception" (SIGABRT, seen ~1 in 10 runs of the ZeRO-1 kill-and-resume case here),
    # which would fail the job after its result exists.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
