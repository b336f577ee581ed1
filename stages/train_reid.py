"""train_reid stage: train PVEN on the masked shards, one process or many (torchrun).

    dvc repro train_reid
    torchrun --standalone --nproc_per_node 1 stages/train_reid.py       # by hand, CPU or 1 GPU
    torchrun --standalone --nproc_per_node 4 stages/train_reid.py       # 4 GPUs (nccl) / processes (gloo)
    torchrun --standalone --nproc_per_node 2 --max-restarts 3 stages/train_reid.py   # restarts resume
    python stages/train_reid.py                                          # one plain process

Reads params ``seed``, ``masks.out_dir`` (the data) and ``reid`` (``reid.backend``:
ddp | deepspeed with ``reid.deepspeed_config``). Writes ``reid.out_dir/model.pt`` (+
model.json), ``metrics/train.json``, ``plots/train_loss.csv``; resumable checkpoints
go to ``reid.checkpoint_dir`` (kept between runs, so a killed or requeued run
continues; a changed config starts over; each restart attempt joins the process group
under its own store prefix, see pipeline/dist/env.py). Multi-node: run the same torchrun on every
node with ``--nnodes N --rdzv_backend c10d --rdzv_endpoint HOST:PORT`` (or srun, see
cluster/); the checkpoint folder must be on shared storage.
"""
import csv
import io
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.config import load_params
from pipeline.dist.env import init_distributed, shutdown
from pipeline.reid.train import cpu_threads, train
from pipeline.tracking import stage_run

METRICS = Path("metrics/train.json")
LOSS_CSV = Path("plots/train_loss.csv")


def main() -> None:
    params = load_params("params.yaml")
    info = init_distributed()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(params.reid.num_workers))
    try:
        with stage_run("train_reid", params, ["seed", "masks", "reid"]) as run:
            result = train(params, info, run=run)
            if info.is_main:
                metrics = {**result.summary, "world_size": info.world_size, "backend": params.reid.backend,
                           "num_classes": result.num_classes, "resumed_from": result.resumed_from,
                           "history": result.history}
                atomic.write_json(METRICS, metrics)
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=["step", "epoch", "loss", "id", "gtri", "ltri", "lr"])
                writer.writeheader()
                writer.writerows(result.steps)
                atomic.write_text(LOSS_CSV, buf.getvalue())
                run.log_artifact(result.model_path, "model")
                run.log_artifact(result.model_path.with_name("model.json"), "model")
                run.log_artifact(LOSS_CSV)
                print(f"train_reid: {result.summary}")
    finally:
        shutdown(info)  # gloo processes may abort at exit without it


if __name__ == "__main__":
    main()
