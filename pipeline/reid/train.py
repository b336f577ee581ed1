"""PVEN training loop as a library function (the train_reid stage and Ray Tune trials call it).

:func:`train` runs on every rank of an existing setting: it takes the validated
:class:`~pipeline.config.Params`, a :class:`~pipeline.dist.env.DistInfo` (from
``init_distributed()``, or built by a Ray Train worker), and optional callbacks. It
does not create or destroy the process group, does not start an MLflow run (pass the
stage's ``run`` handle to log into it) and does not exit the process.

What one call does:

1. Reads the training identities of the masked shards (``masks.out_dir``) and maps
   their vids to classes 0..N-1 (sorted vids; saved with the model).
2. Builds PVEN and the backend (``reid.backend``: ddp | deepspeed), then resumes from
   the latest checkpoint in ``reid.checkpoint_dir`` if one of this configuration exists.
3. Streams identity-balanced P x K batches (``TrainStream`` + ``PKBatcher``), exactly
   ``reid.batches_per_epoch`` per rank and epoch (null: one pass over the training
   images, :func:`steps_per_epoch`); a mid-epoch resume skips the batches
   already trained on, which come again identically (every source of randomness is
   seeded from (seed, epoch, rank, worker)).
4. Each step: forward, the losses, a check that the loss is finite on every
   rank (else :class:`NonFiniteLossError`, keeping the last good checkpoint), backward,
   optimizer and lr steps, and the centre update when the centre loss is on
   (``official``). Checkpoints every ``reid.checkpoint_every`` steps and at
   each epoch end (then with ``epoch + 1``).
5. Every ``reid.val_every`` epochs: query vs gallery mAP of the masked shards (the held-out
   validation identities when there are any, :func:`validation_splits`) by
   :mod:`pipeline.evaluation` (the evaluate stage's metrics) with the variant's PVEN
   distance (and with D_g alone): features extracted by all ranks, gathered and ranked
   on rank 0, the metrics broadcast so that every rank returns the same numbers.
6. ``on_epoch(metrics)`` is called on every rank with the same dict after each epoch
   (Ray Train needs every worker to report).
7. Rank 0 writes the final model to ``reid.out_dir/model.pt`` (+ ``model.json``).

Units: losses are per-batch means; ``images_per_s`` counts training images of all
ranks per second of training-step wall time (data waits included, validation and
checkpoint writing excluded); times in seconds.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import atomic
from pipeline.config import Params
from pipeline.data.records import held_out_pair
from pipeline.data.shards import TrainStream, iter_samples, read_manifest, shard_urls
from pipeline.data.transforms import normalize_images
from pipeline.dist.backends import BackendOptions, make_backend
from pipeline.dist.checkpoint import CheckpointManager, torch_save_atomic
from pipeline.dist.env import DistInfo, barrier, broadcast_from_main
from pipeline.evaluation.streaming import evaluate
from pipeline.progress import progress
from pipeline.reid.data import TrainTransform, collate, read_vid
from pipeline.reid.distance import spec_for
from pipeline.reid.embed import gather_features
from pipeline.reid.losses import pven_loss, update_centers
from pipeline.reid.model import MODEL_FILE, build_model, model_payload
from pipeline.reid.sampling import PKBatcher

LOSS_NAMES = ("loss", "id", "gtri", "ltri", "center")
STEP_COLUMNS = ("step", "epoch", *LOSS_NAMES, "lr")   # the fields of TrainResult.steps rows
LOG_EVERY = 10  # steps between MLflow loss points (each one is a database write)
VAL_BATCH = 64


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf on some rank; training stopped."""


class TrainingStopped(Exception):
    """Training stopped on request (the stop file appeared) after writing checkpoint ``step`` to ``folder``.

    Raised on every rank at the same step: the request is all-reduced before the step's
    backward, so all ranks finish that step, checkpoint together and stop.
    """

    run_status = "KILLED"  # how pipeline.tracking.stage_run ends the MLflow run

    def __init__(self, step: int, folder: Path, stop_file: Path):
        super().__init__(f"train_reid: stopped on request ({stop_file} exists) after step {step}; "
                         f"checkpoint {folder}; run again (or requeue) to resume from it")
        self.step, self.folder, self.stop_file = step, folder, stop_file


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``model_path`` is set on rank 0 only)."""
    history: list[dict[str, Any]]   # one dict per epoch (see ``on_epoch``)
    steps: list[dict[str, Any]]     # one row per step: step, epoch, loss, id, gtri, ltri, lr
    global_step: int
    num_classes: int
    resumed_from: int | None        # the step the run resumed from, if it did
    model_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    model: Any = None               # this rank's trained nn.Module (bare, not wrapped)


class WarmupCosine:
    """lr multiplier per optimizer step: linear warm-up to 1, then cosine down to ``floor``."""

    def __init__(self, warmup_steps: int, total_steps: int, floor: float = 0.01):
        self.warmup, self.total, self.floor = warmup_steps, max(total_steps, 1), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


class WarmupMultiStep:
    """lr multiplier per optimizer step, constant within an epoch: the authors' ``WarmupMultiStepLR``.

    ``vehicle_reid_pytorch/utils/pytorch_tools.py`` (silverbulletmdc/PVEN 0b2e1a8) with
    ``warmup_factor`` 0, stepped once at the start of each epoch (``main.py``), so
    1-based epoch e trains at ``min(1, e / warmup_epochs) * gamma ** #{m in milestones: m <= e}``
    (``bisect_right``): epoch 1 at 0.1 of the lr with 10 warm-up epochs, x 0.1 from epoch 40.
    """

    def __init__(self, steps_per_epoch: int, warmup_epochs: int, milestones: tuple[int, ...], gamma: float):
        self.steps, self.warmup, self.milestones, self.gamma = max(1, steps_per_epoch), warmup_epochs, \
            tuple(sorted(milestones)), gamma

    def __call__(self, step: int) -> float:
        epoch = step // self.steps + 1
        warm = min(1.0, epoch / self.warmup) if self.warmup else 1.0
        return warm * self.gamma ** bisect.bisect_right(self.milestones, epoch)


def lr_schedule(cfg, steps_per_epoch: int):
    """The lr multiplier of ``reid.schedule`` for a run of ``cfg.epochs`` x ``steps_per_epoch`` steps."""
    if cfg.schedule == "multistep":
        return WarmupMultiStep(steps_per_epoch, cfg.warmup_epochs, cfg.milestones, cfg.gamma)
    return WarmupCosine(cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)


def steps_per_epoch(cfg, train_images: int, world_size: int) -> int:
    """``reid.batches_per_epoch``, or for null one pass over the training images (>= 1 per rank)."""
    if cfg.batches_per_epoch is not None:
        return cfg.batches_per_epoch
    return max(1, train_images // (cfg.P * cfg.K * world_size))


def training_identities(data_dir: Path, info: DistInfo) -> list[int]:
    """Sorted vids of the training split, read from the shards' json members (rank 0, then broadcast)."""
    vids = None
    if info.is_main:
        found = {int(json.loads(sample["json"])["vid"])
                 for url in shard_urls(data_dir, "train") for sample in iter_samples(url, exts=("json",))}
        expected = read_manifest(data_dir)["splits"]["train"]["identities"]
        if len(found) != expected:
            raise ValueError(f"{data_dir}: train shards hold {len(found)} identities, manifest says {expected}")
        vids = sorted(found)
    return broadcast_from_main(vids, info)


def fingerprint(params: Params, data_dir: Path, world_size: int) -> str:
    """What a checkpoint must match to be resumed: the reid params that change results, data, world size."""
    reid = params.section("reid")
    for key in ("out_dir", "checkpoint_dir", "checkpoint_every", "val_every", "nproc_per_node"):
        reid.pop(key)
    manifest = read_manifest(data_dir)
    shards = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    blob = json.dumps({"seed": params.seed, "reid": reid, "shards": shards, "world": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- validation

def validation_splits(splits: dict) -> tuple[str, str] | None:
    """The (query, gallery) splits in-loop validation ranks: the held-out training identities
    (``data.val_ids``) when the shards have them, else the test query/gallery, else None."""
    test_pair = ("query", "gallery") if "query" in splits and "gallery" in splits else None
    return held_out_pair(splits) or test_pair


def validate(backend, data_dir: Path, params: Params, info: DistInfo) -> dict[str, float]:
    """Query vs gallery metrics of the current model (every rank gets the same numbers)."""
    pair = validation_splits(read_manifest(data_dir)["splits"])
    if pair is None:
        return {}  # e.g. VehicleID without held-out identities: the evaluate stage draws its galleries
    cfg = params.reid
    backend.sync_buffers()
    backend.eval()

    def forward(images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return backend.infer(normalize_images(images.to(info.device), cfg.channels_last), masks.to(info.device))
    sets = [gather_features(forward, data_dir, split, info, size=tuple(cfg.image_size), batch_size=VAL_BATCH,
                            num_workers=cfg.num_workers) for split in pair]
    backend.train()
    metrics = None
    if info.is_main:  # one rank ranks; the others would repeat the same work on the same cores
        # The variant's own lambda: training does not read the eval section (dvc.yaml params).
        full = evaluate(*sets, spec_for(cfg, "pven")).summary((1, 5))
        glob = evaluate(*sets, spec_for(cfg, "global")).summary((1, 5))
        metrics = {"val_mAP": full["mAP"], "val_rank1": full["rank1"], "val_rank5": full["rank5"],
                   "val_mAP_global": glob["mAP"], "val_rank1_global": glob["rank1"]}
    return broadcast_from_main(metrics, info)


# --------------------------------------------------------------------------- training

def train(params: Params, info: DistInfo, *, data_dir: str | Path | None = None,
          out_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          on_checkpoint: Callable[[int, Path], None] | None = None,
          run=None, show_progress: bool = True, stop_file: str | Path | None = None) -> TrainResult:
    """Train PVEN; see the module docstring. Collective: every rank calls it.

    data_dir / out_dir / checkpoint_dir default to ``masks.out_dir``, ``reid.out_dir``
    and ``reid.checkpoint_dir``. ``on_checkpoint(step, folder)`` runs on every rank
    after each complete checkpoint. ``run`` is a :class:`pipeline.tracking.StageRun`
    (rank 0 logs through it) or None. ``stop_file``: when this path exists (rank 0 looks before
    every step), all ranks finish the step, checkpoint and raise :class:`TrainingStopped` (the
    preemption path of cluster/slurm/; a file on shared storage reaches every node, and no
    signal has to get through torchrun and NCCL).
    """
    cfg = params.reid
    data_dir = Path(data_dir or params.masks.out_dir)
    out_dir = Path(out_dir or cfg.out_dir)
    manifest = read_manifest(data_dir)
    if cfg.pk_buffer < cfg.P * cfg.K:
        raise ValueError(f"reid.pk_buffer={cfg.pk_buffer} must hold one batch: >= P*K = {cfg.P * cfg.K}")
    n_ids = manifest["splits"]["train"]["identities"]
    if n_ids < cfg.P:
        raise ValueError(f"reid.P={cfg.P} identities per batch, but {data_dir} has only {n_ids} training identities")

    class_vids = training_identities(data_dir, info)
    _seed_everything(params.seed)  # the same initial weights on every rank
    model = build_model(cfg, len(class_vids))
    per_epoch = steps_per_epoch(cfg, manifest["splits"]["train"]["samples"], info.world_size)
    backend = make_backend(cfg.backend, model, info, BackendOptions(
        lr=cfg.lr, weight_decay=cfg.weight_decay, lr_lambda=lr_schedule(cfg, per_epoch),
        micro_batch=cfg.P * cfg.K, precision=cfg.precision, channels_last=cfg.channels_last,
        sync_bn=cfg.sync_bn, deepspeed_config=cfg.deepspeed_config))
    try:
        return _train_loop(params, info, backend, data_dir, out_dir,
                           Path(checkpoint_dir or cfg.checkpoint_dir), class_vids, per_epoch,
                           on_epoch, on_checkpoint, run, show_progress, stop_file)
    finally:
        backend.close()


def _train_loop(params, info, backend, data_dir, out_dir, checkpoint_dir, class_vids, per_epoch,
                on_epoch, on_checkpoint, run, show_progress, stop_file) -> TrainResult:
    cfg = params.reid
    local_spec = spec_for(cfg, "local", normalize=cfg.loss.normalize_local)
    ckpt = CheckpointManager(checkpoint_dir, info, fingerprint(params, data_dir, info.world_size),
                             about={"seed": params.seed, "world_size": info.world_size, "reid": params.section("reid")})
    # Storage problems end the run here, not after hours of training: one checkpoint holds
    # the weights and Adam's two moments (~3x the parameter bytes), the model the weights.
    weight_bytes = sum(p.numel() * p.element_size() for p in backend.module.parameters())
    ckpt.check_writable(3 * weight_bytes)
    if info.is_main:
        atomic.check_writable(out_dir, weight_bytes, "reid.out_dir")
    stop_path = Path(stop_file) if stop_file else None
    state = ckpt.load(backend) or {"epoch": 0, "batch": 0, "history": [], "steps": []}
    epoch, skip = state["epoch"], state["batch"]
    history, step_rows = state["history"], state["steps"]
    global_step = epoch * per_epoch + skip
    resumed_from = global_step if state.get("step") is not None else None
    if resumed_from is not None and info.is_main:
        print(f"train_reid: resuming from {ckpt.latest_dir} (epoch {epoch}, batch {skip}, step {global_step})")

    stream = TrainStream(shard_urls(data_dir, "train"), batch_size=cfg.P * cfg.K,
                         batches_per_epoch=per_epoch, seed=params.seed, rank=info.rank,
                         num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, map_fn=read_vid,
                         batch_fn=PKBatcher(cfg.P, cfg.K, params.seed,
                                            TrainTransform(tuple(cfg.image_size), cfg.pad, cfg.erase_prob),
                                            max_buffered=cfg.pk_buffer),
                         collate_fn=collate)
    lookup = torch.full((max(class_vids) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor(class_vids)] = torch.arange(len(class_vids))

    def save(epoch_now: int, batch_now: int) -> None:
        folder = ckpt.save(global_step, backend, {"epoch": epoch_now, "batch": batch_now,
                                                  "history": history, "steps": step_rows})
        if on_checkpoint is not None:
            on_checkpoint(global_step, folder)

    backend.train()
    stop_at_epoch_end = False
    while epoch < cfg.epochs:
        bar = progress(total=per_epoch, desc=f"train_reid epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", enabled=show_progress and info.is_main, leave=False)
        bar.update(skip)
        counted, data_wait, started = 0, 0.0, time.perf_counter()
        waited_from = time.perf_counter()
        for b, batch in enumerate(stream.epoch(epoch)):
            if b < skip:  # already trained on before the restart; the stream repeats it exactly
                waited_from = time.perf_counter()
                started = waited_from
                continue
            data_wait += time.perf_counter() - waited_from
            vids = batch["vids"]
            if int(vids.max()) >= len(lookup) or bool((lookup[vids] < 0).any()):
                raise ValueError(f"batch holds vids {sorted(set(vids.tolist()) - set(class_vids))} "
                                 f"that are not training identities of {data_dir}")
            labels = lookup[vids].to(info.device)
            images = normalize_images(batch["images"].to(info.device, non_blocking=True), cfg.channels_last)
            out = backend.forward(images, batch["masks"].to(info.device))
            centers = getattr(backend.module, "centers", None)
            losses = pven_loss(out, labels, cfg.loss, local_spec, centers)
            row, stop = _finite_or_stop(losses, info, ckpt, epoch, global_step, stop_path)
            backend.step(losses["loss"])
            if centers is not None:
                update_centers(centers, out["global"], labels, cfg.loss.center_lr, info.distributed)
            global_step += 1
            counted += 1
            step_rows.append({"step": global_step, "epoch": epoch + 1, **{k: round(v, 6) for k, v in row.items()},
                              "lr": backend.lr})
            bar.update(1)
            bar.set_postfix(loss=row["loss"], lr=backend.lr)
            if run is not None and global_step % LOG_EVERY == 0:
                run.log_metrics({f"train_{k}": v for k, v in row.items()} | {"lr": backend.lr}, step=global_step)
            if (stop or global_step % cfg.checkpoint_every == 0) and b + 1 < per_epoch:
                t0 = time.perf_counter()
                save(epoch, b + 1)
                started += time.perf_counter() - t0  # checkpoint time is not training time
                if stop:
                    raise TrainingStopped(global_step, ckpt.latest_dir, stop_path)
            stop_at_epoch_end = stop  # the last batch: the epoch end below checkpoints, then we stop
            waited_from = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - started
        epoch += 1
        skip = 0
        # Means over the epoch's step rows: after a mid-epoch resume they include the steps
        # trained before the restart (kept in the checkpoint).
        rows = [r for r in step_rows if r["epoch"] == epoch]
        record = {"epoch": epoch, "step": global_step,
                  **{k: float(np.mean([r[k] for r in rows])) for k in LOSS_NAMES},
                  "lr": backend.lr, "epoch_s": round(seconds, 3), "data_wait_s": round(data_wait, 3),
                  "images_per_s": round(counted * cfg.P * cfg.K * info.world_size / max(seconds, 1e-9), 2)}
        if cfg.val_every and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            t0 = time.perf_counter()
            record.update(validate(backend, data_dir, params, info))
            record["val_s"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        save(epoch, 0)
        if run is not None:
            run.log_metrics({k: v for k, v in record.items() if k not in ("epoch", "step")}, step=global_step)
        if info.is_main and show_progress:
            print("train_reid: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in record.items()), flush=True)
        if on_epoch is not None:
            on_epoch(dict(record))
        if stop_at_epoch_end and epoch < cfg.epochs:
            raise TrainingStopped(global_step, ckpt.latest_dir, stop_path)

    result = TrainResult(history=history, steps=step_rows, global_step=global_step,
                         num_classes=len(class_vids), resumed_from=resumed_from, model=backend.module)
    weights = backend.export_state_dict()
    if info.is_main:
        result.model_path = save_model(out_dir, backend.module, weights, class_vids, cfg)
    barrier(info)
    result.summary = summarize(history, step_rows)
    if "val_mAP" in result.summary:   # which identities the in-loop numbers come from
        result.summary["validated_on"] = "/".join(validation_splits(read_manifest(data_dir)["splits"]))
    return result


def _finite_or_stop(losses: dict, info: DistInfo, ckpt: CheckpointManager, epoch: int, step: int,
                    stop_file: Path | None = None) -> tuple[dict, bool]:
    """(the step's loss values as floats, whether a stop was requested); :class:`NonFiniteLossError`
    on every rank if any rank has NaN/inf.

    One all-reduce (MAX) of [non-finite on this rank, stop file seen by rank 0] per step gives
    every rank both answers at the same step: none is left waiting in the backward.
    """
    values = torch.stack([losses[k].detach().float() for k in LOSS_NAMES])
    flags = torch.stack([(~torch.isfinite(values)).any().float(),
                         torch.tensor(float(info.is_main and stop_file is not None and stop_file.exists()),
                                      device=values.device)])
    if info.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    row = dict(zip(LOSS_NAMES, values.tolist()))
    if bad:
        where = ckpt.latest_dir
        raise NonFiniteLossError(
            f"train_reid: non-finite loss at epoch {epoch + 1}, step {step + 1} (this rank: {row}); stopped. "
            f"Last good checkpoint: {where if where else 'none (no checkpoint written yet)'}. "
            f"Try a lower reid.lr or reid.precision=fp32.")
    return row, bool(stop)


def save_model(out_dir: Path, module, weights: dict, class_vids: list[int], cfg) -> Path:
    """Write ``model.pt`` (see model.model_payload) and a readable ``model.json`` beside it."""
    distance = {"variant": cfg.variant, "part_distance": cfg.part_distance, "vis_offset": cfg.vis_offset,
                "attention": cfg.attention}
    payload = model_payload(module, weights, class_vids, distance, cfg.image_size)
    path = torch_save_atomic(payload, Path(out_dir) / MODEL_FILE)
    atomic.write_json(Path(out_dir) / "model.json", {k: v for k, v in payload.items() if k != "state_dict"})
    return path


def summarize(history: list[dict], steps: list[dict]) -> dict[str, Any]:
    """The numbers of metrics/train.json: first and last losses, last validation, best mAP, speed."""
    if not history:
        return {}
    last = history[-1]
    first_steps = steps[:min(10, len(steps))]
    summary = {"epochs": last["epoch"], "steps": last["step"],
               "loss_first10": float(np.mean([s["loss"] for s in first_steps])) if first_steps else None,
               **{f"final_{k}": last[k] for k in ("loss", "id", "gtri", "ltri")},
               "images_per_s": float(np.median([h["images_per_s"] for h in history])),
               "train_s": round(sum(h["epoch_s"] for h in history), 2)}
    vals = [h for h in history if "val_mAP" in h]
    if vals:
        summary.update({k: vals[-1][k] for k in vals[-1] if k.startswith("val_") and k != "val_s"})
        summary["best_val_mAP"] = max(h["val_mAP"] for h in vals)
    return summary
