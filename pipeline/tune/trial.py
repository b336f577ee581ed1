"""One sweep trial: a Tune function that runs a Ray Train ``TorchTrainer`` of the real training loop.

Ray 2.60's "Train V2" pattern: :func:`run_trial` is the Tune function trainable (it holds
only :data:`~pipeline.tune.space.DRIVER_CPU`); it starts a ``TorchTrainer`` whose
``RunConfig`` is named after the trial id (stable across restarts, so a restarted trial
finds its own checkpoints) under the sweep's storage, with ``FailureConfig(max_failures)``;
``TuneReportCallback`` forwards rank 0's reports to Tune. :func:`train_worker` runs on every
Ray Train worker inside the process group Ray Train made: it builds the trial's
:class:`~pipeline.config.Params` from the shipped params.yaml contents plus the trial's
overrides, calls :func:`pipeline.reid.train.train` and, after every epoch, reports the
epoch's metrics (``ray.train.report``) with the epoch-end checkpoint.

Checkpoints: ``train`` writes its own atomic checkpoints into a node-local scratch folder of
each worker; each worker hands its part of the epoch-end checkpoint to ``ray.train.report``
(Ray merges the parts into one checkpoint folder of the trial in storage, keeping the last
two); a restarted worker downloads the latest with ``ray.train.get_checkpoint`` into its
scratch folder, where ``train`` resumes from it (same fingerprint: params, data, world size).
Nothing goes near ``reid.checkpoint_dir`` of the main pipeline.

MLflow: rank 0 logs into the trial's child run of the sweep's parent run (tracking URI,
experiment and parent id come in the trial config): the overrides as params, every epoch's
metrics with ``step=epoch``, the final summary. A restarted trial finds its child run by the
``trial_id`` tag and continues it. It re-runs the epochs after its last registered checkpoint,
which a killed worker may already have logged; resuming is exact (same weights, same
numbers), so those epochs are not logged a second time.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import params_from_dict
from pipeline.dist.env import DistInfo
from pipeline.reid.train import train
from pipeline.threads import training_threads

TRIAL_TAG, PARENT_TAG = "trial_id", "mlflow.parentRunId"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ChildRun:
    """The trial's MLflow child run, through ``MlflowClient`` (no process-global active run)."""

    def __init__(self, tracking: dict[str, str], trial_id: str, overrides: dict[str, Any], resumed_from: int | None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking["uri"])
        found = self.client.search_runs(
            [tracking["experiment_id"]],
            filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' and tags.`{PARENT_TAG}` = '{tracking['parent_run_id']}'")
        self.logged_epochs: set[int] = set()
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # "lr" is in every epoch's record
            self.logged_epochs = {m.step for m in self.client.get_metric_history(self.run_id, "lr")}
        else:
            run = self.client.create_run(tracking["experiment_id"], run_name=f"trial {trial_id}",
                                         tags={PARENT_TAG: tracking["parent_run_id"], TRIAL_TAG: trial_id,
                                               "stage": "tune_trial", **tracking.get("tags", {})})
            self.run_id = run.info.run_id
            for key, value in overrides.items():
                self.client.log_param(self.run_id, key, value)
        if resumed_from is not None:
            self.client.set_tag(self.run_id, "resumed_from_step", str(resumed_from))

    def log_epoch(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        if int(record["epoch"]) in self.logged_epochs:   # re-run after a restart (module docstring)
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(record["epoch"])) for k, v in record.items()
                   if _number(v) and k not in ("epoch",)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"final.{k}", float(v), now, 0)
                                                    for k, v in summary.items() if _number(v)])
        self.client.set_terminated(self.run_id, "FINISHED")


def _report_folder(scratch: Path, ckpt_dir: Path, folder: Path, rank: int) -> Path:
    """A folder holding this rank's part of checkpoint ``folder`` (a folder under ``ckpt_dir``),
    laid out like ``ckpt_dir``, so that Ray's merge of all ranks' parts is a complete checkpoint
    folder for :class:`~pipeline.dist.checkpoint.CheckpointManager`: the step folder (hard
    links) and, from rank 0, the small files beside it and above it (``latest.json``, ...)."""
    out = scratch / f"report-{folder.name}"
    shutil.rmtree(out, ignore_errors=True)
    rel = folder.relative_to(ckpt_dir)
    shutil.copytree(folder, out / rel, copy_function=os.link)
    if rank == 0:
        parent = folder.parent
        while True:
            for item in parent.iterdir():
                if item.is_file():
                    shutil.copy2(item, out / item.relative_to(ckpt_dir))
            if parent == ckpt_dir:
                break
            parent = parent.parent
    return out


def restored_step(ckpt_dir: Path) -> int | None:
    """The newest ``step-*`` folder's step under a downloaded checkpoint (None: nothing there)."""
    steps = [int(p.name.split("-")[1]) for p in ckpt_dir.rglob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return max(steps) if steps else None


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (every rank): the trial's training run, reported epoch by epoch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world > 1 and not dist.is_initialized():
        raise RuntimeError(f"Ray Train worker {rank}/{world}: no torch.distributed process group")
    info = DistInfo(rank=rank, world_size=world, local_rank=ctx.get_local_rank(),
                    device=ray.train.torch.get_device(), owns_group=False)
    trial_id = config["trial_id"]
    params = params_from_dict(config["base"], config["overrides"])
    scratch = Path(tempfile.mkdtemp(prefix=f"pven-trial-{trial_id}-rank{rank}-"))
    ckpt_dir = scratch / "checkpoints"
    restored = ray.train.get_checkpoint()
    resumed_from = None
    if restored is not None:
        restored.to_directory(str(ckpt_dir))
        resumed_from = restored_step(ckpt_dir)
    child = ChildRun(config["tracking"], trial_id, config["overrides"], resumed_from) if rank == 0 else None
    latest: dict[str, Any] = {}

    def on_checkpoint(step: int, folder: Path) -> None:
        latest.update(step=step, folder=Path(folder))

    def on_epoch(record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if _number(v)}
        metrics.update(trial_id=trial_id, world_size=world, resumed_from_step=-1 if resumed_from is None
                       else resumed_from)
        if child is not None:
            child.log_epoch({**record, "world_size": world})
        folder = _report_folder(scratch, ckpt_dir, latest["folder"], rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=f"checkpoint-{latest['folder'].name}")
        shutil.rmtree(folder, ignore_errors=True)
        if rank:  # rank 0's CheckpointManager prunes its folders; the others' parts pile up otherwise
            for old in latest["folder"].parent.glob("step-*"):
                if old != latest["folder"]:
                    shutil.rmtree(old, ignore_errors=True)

    try:
        with training_threads(params.reid.num_workers, info.device):
            result = train(params, info, data_dir=config["data_dir"], out_dir=scratch / "model",
                           checkpoint_dir=ckpt_dir, on_epoch=on_epoch, on_checkpoint=on_checkpoint,
                           show_progress=False)
        if child is not None:
            child.finish(result.summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one trial = one ``TorchTrainer`` run (see module docstring)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    resources = config["resources"]
    per_worker = {"CPU": resources["cpus_per_worker"], **({"GPU": 1} if resources["use_gpu"] else {})}
    overrides = {**config["sampled"], **config["fixed"]}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"trial_id": trial_id, "base": config["base"], "overrides": overrides,
                           "data_dir": config["data_dir"], "tracking": config["tracking"]},
        scaling_config=ScalingConfig(num_workers=resources["workers"], use_gpu=resources["use_gpu"],
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=trial_id, storage_path=config["train_storage"],
                             failure_config=FailureConfig(max_failures=config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[TuneReportCallback()]))
    trainer.fit()
