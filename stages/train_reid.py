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
node with ``--nnodes N --rdzv_backend c10d --rdzv_endpoint HOST:PORT``; the
checkpoint folder must be on shared storage. Takes ``--params FILE`` and dotted overrides
(``reid.epochs=2``) as arguments (cluster jobs; DVC passes none).

Stopping on request (preemption, cluster/slurm/): when the file named by ``PVEN_STOP_FILE``
appears, every rank finishes its step, a checkpoint is written, the MLflow run ends KILLED
and the stage exits 0 *without* writing its outputs; run it again to resume.
"""
import os
from pathlib import Path

from pipeline import atomic, cli
from pipeline.charts import line_chart
from pipeline.config import Params, ParamsView, stage_params
from pipeline.dist.env import init_distributed, shutdown
from pipeline.reid.train import STEP_COLUMNS, TrainingStopped, train
from pipeline.threads import training_threads
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "masks.out_dir", "reid")
METRICS, REPORT = Path("metrics/train.json"), Path("reports/train.json")
HEADLINE = {"final_loss": "final_loss", "val_mAP": "val_mAP", "best_val_mAP": "best_val_mAP",
            "images_per_s": "images_per_s", "train_s": "train_s"}
LOSS_CSV, LOSS_PNG = Path("plots/train_loss.csv"), Path("reports/train_loss.png")
STOP_ENV = "PVEN_STOP_FILE"


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict | None:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); rank 0 returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "train_reid", root / "params.yaml")
    cfg = params.reid
    info = init_distributed()
    try:
        with training_threads(cfg.num_workers, info.device), stage_run("train_reid", params) as run:
            result = train(params, info, data_dir=root / params.masks.out_dir, out_dir=root / cfg.out_dir,
                           checkpoint_dir=root / cfg.checkpoint_dir, run=run, stop_file=os.environ.get(STOP_ENV))
            if not info.is_main:
                return None
            metrics = {**result.summary, "world_size": info.world_size, "backend": cfg.backend,
                       "num_classes": result.num_classes, "history": result.history}
            run.set_tags({"resumed_from": result.resumed_from})  # how this run went, not what it made
            atomic.write_json(root / REPORT, without_timings(metrics))
            atomic.write_json(root / METRICS, headline(metrics, HEADLINE))
            atomic.write_csv(root / LOSS_CSV, result.steps, list(STEP_COLUMNS))
            for path in (result.model_path, result.model_path.with_name("model.json")):
                run.log_artifact(path, "model")
            atomic.write_png(root / LOSS_PNG, line_chart(result.steps, "step", ["loss", "id", "gtri", "ltri"],
                                                         title="PVEN training loss per step (total and parts)",
                                                         x_label="step", y_label="loss"))
            for path in (METRICS, REPORT, LOSS_CSV, LOSS_PNG):
                run.log_artifact(root / path)
            print(f"train_reid: {result.summary}")
            return metrics
    except TrainingStopped as stop:  # exit 0: torchrun must not restart a run that stopped on request
        if info.is_main:
            print(stop, flush=True)
            # Tells the batch shell (cluster/slurm/run_stage.sh) that a checkpoint was written: requeue.
            atomic.write_text(Path(f"{stop.stop_file}.stopped"), f"stopped after step {stop.step}, checkpoint "
                                                                 f"{stop.folder}\n")
        return None
    finally:
        shutdown(info)  # gloo processes may abort at exit without it


if __name__ == "__main__":
    cli.run_stage(main)
