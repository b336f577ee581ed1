"""MLflow tracking: one run per stage execution, the same store for every way of running.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a server, e.g. ``http://127.0.0.1:5000``),
else ``sqlite:///<project root>/mlflow.db``. The project root is ``DVC_ROOT`` when DVC
runs the stage: DVC sets it to the repository's root for ``dvc repro`` and to the
*parent* repository for ``dvc exp run --queue/--temp``, which run in a temporary copy
where a relative path would be lost with the copy. Artifacts of the local store go to
``<project root>/mlartifacts`` for the same reason.

Each run is named after its stage and tagged with the git commit, the hash of the params
sections the stage reads, and the DVC experiment name when there is one. Only rank 0
logs: on other ranks :func:`stage_run` yields a handle whose methods do nothing.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "pven"


def project_root() -> Path:
    """The repository the stage belongs to (see module docstring)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the working copy, else the baseline DVC recorded for an experiment, else 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def current_rank() -> int:
    """Global rank from the torchrun/SLURM environment (0 for a plain process)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class StageRun:
    """What a stage logs through. Inactive (every method a no-op) off rank 0."""

    def __init__(self, active: bool, run_id: str | None = None):
        self.active = active
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow
            numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
            mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            import mlflow
            mlflow.log_artifact(str(path), artifact_path=folder)

    def log_dict(self, data: Any, name: str) -> None:
        if self.active:
            import mlflow
            mlflow.log_dict(data, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            import mlflow
            mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextlib.contextmanager
def stage_run(stage: str, params, keys: Sequence[str] | None = None, rank: int | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution and log the params it reads.

    ``params`` is the loaded :class:`pipeline.config.Params` or a stage's
    :class:`~pipeline.config.ParamsView`; ``keys`` the sections or dotted keys the stage
    reads (default: the view's own, i.e. the stage's ``PARAMS`` = its dvc.yaml params),
    which are logged as params and hashed into the ``params_hash`` tag. A failing
    stage ends its run as FAILED.
    """
    rank = current_rank() if rank is None else rank
    if rank != 0:
        yield StageRun(active=False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_id=_experiment_id(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)))
    keys = tuple(params.keys if keys is None else keys)
    tags = {"stage": stage, "git_commit": git_commit(), "params_hash": params.digest(*keys)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(flatten(params.select(keys)))
        yield StageRun(active=True, run_id=run.info.run_id)


def _experiment_id(name: str) -> str:
    """Get or create the experiment; a local store keeps artifacts beside its database."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process (a parallel Tune trial) created it between our lookup and create.
        return mlflow.get_experiment_by_name(name).experiment_id
