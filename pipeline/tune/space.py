"""The sweep's search space, what a trial needs from the cluster, and the sweep's identity.

Pure functions of the validated config (no Ray cluster needed) plus :func:`trial_resources`,
which reads what a connected cluster holds.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, Params, SearchDim

DRIVER_CPU = 0.01   # the Tune function only starts and watches its TorchTrainer (0 is rejected by Ray)
# Trials checkpoint at epoch ends only: those are what Ray stores and a restarted trial resumes from.
NO_STEP_CHECKPOINTS = 1_000_000_000


def domain(dim: SearchDim, integer: bool):
    """The ``ray.tune`` sampler of one dimension (``integer``: the key takes ints, choice only)."""
    from ray import tune
    if dim.dist == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.dist == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.choice([int(v) if integer else float(v) for v in dim.values])


def search_space(params: Params) -> dict[str, Any]:
    """``{dotted reid key: ray.tune domain}`` for ``tune.space``."""
    reid = params.select([d.key for d in params.tune.space])
    return {d.key: domain(d, isinstance(reid[d.key], int)) for d in params.tune.space}


def describe_space(params: Params) -> list[dict[str, Any]]:
    """The space as plain data (MLflow tag, results), one dict per dimension."""
    return [{k: v for k, v in dict(key=d.key, dist=d.dist, low=d.low, high=d.high,
                                   values=list(d.values) if d.values else None).items() if v is not None}
            for d in params.tune.space]


def trial_overrides(params: Params, sampled: dict[str, Any]) -> dict[str, Any]:
    """What a trial trains: the sampled values plus the keys the sweep fixes for every trial."""
    return {**sampled, "reid.epochs": max_epochs(params), "reid.val_every": 1,
            "reid.checkpoint_every": NO_STEP_CHECKPOINTS}


def max_epochs(params: Params) -> int:
    """Epochs a trial trains at most (ASHA's ``max_t``): ``tune.max_t`` or ``reid.epochs``."""
    return params.tune.max_t or params.reid.epochs


def sweep_name(params: Params, data_digest: str) -> str:
    """``tune.name``, or ``sweep-<hash>`` of everything that decides what the trials are.

    Two runs of the stage with the same name share a Ray experiment folder, so the second
    resumes the first: the hash covers the seed, reid, the space, the search and scheduler
    settings, the workers per trial (a checkpoint is tied to its world size) and the data,
    but not how many trials run at once or where results go.
    """
    if params.tune.name:
        return params.tune.name
    t = params.section("tune")
    for key in ("max_concurrent_trials", "storage", "name", "resource_wait_s", "out_dir"):
        t.pop(key)
    blob = json.dumps({"seed": params.seed, "reid": params.section("reid"), "tune": t, "data": data_digest},
                      sort_keys=True)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class TrialResources:
    """What one trial takes: ``workers`` Ray Train workers of ``cpus_per_worker`` CPUs (and one
    GPU each with ``use_gpu``), plus :data:`DRIVER_CPU` for its Tune function."""
    workers: int
    cpus_per_worker: float
    use_gpu: bool
    max_concurrent: int

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + DRIVER_CPU


def trial_resources(params: Params, nodes: list[dict[str, float]]) -> TrialResources:
    """Resolve ``tune.workers`` / ``use_gpu`` / ``max_concurrent_trials`` against the cluster's
    alive nodes (``[{"CPU": n, "GPU": m}, ...]``, totals per node), or raise :class:`ConfigError`
    when one trial cannot fit, naming the keys to change."""
    t = params.tune
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = [n.get("GPU", 0.0) for n in nodes]
    use_gpu = sum(gpus) > 0 if t.use_gpu == "auto" else t.use_gpu
    if use_gpu and not sum(gpus):
        raise ConfigError("tune.use_gpu: true, but the cluster has no GPU")
    workers = t.workers or (int(max(gpus)) if use_gpu else 1)
    per_trial = workers * t.cpus_per_worker + DRIVER_CPU
    where = f"the cluster has {total_cpu:g} CPUs on {len(nodes)} node(s)"
    if per_trial > total_cpu + 1e-9:
        raise ConfigError(f"tune.workers: a trial needs {workers} workers x {t.cpus_per_worker:g} CPUs "
                          f"(tune.cpus_per_worker) + {DRIVER_CPU} for its driver = {per_trial:g} CPUs, but {where}; "
                          f"expected fewer workers or CPUs per worker, or a bigger cluster")
    if t.cpus_per_worker > max(n.get("CPU", 0.0) for n in nodes):
        raise ConfigError(f"tune.cpus_per_worker: {t.cpus_per_worker:g} CPUs per worker, but no node has that many "
                          f"({where})")
    if use_gpu and workers > sum(gpus):
        raise ConfigError(f"tune.workers: {workers} workers with one GPU each, but the cluster has {sum(gpus):g} GPUs")
    fits = math.floor((total_cpu + 1e-9) / per_trial)
    if use_gpu:
        fits = min(fits, int(sum(gpus) // workers))
    return TrialResources(workers, t.cpus_per_worker, bool(use_gpu), t.max_concurrent_trials or max(1, fits))
