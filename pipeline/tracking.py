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
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "pven"
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


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


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the working copy, else the baseline DVC recorded for an experiment, else 'unknown'."""
    head = _git("rev-parse", "HEAD", cwd=cwd)
    return head.strip() if head else os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def git_state(cwd: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty): dirty when tracked files differ from the commit (untracked files do not count)."""
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return git_commit(cwd), bool(status and status.strip())


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


class Terminated(BaseException):
    """SIGTERM arrived while a stage's run was open (raised from the signal handler)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"killed by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def stage_run(stage: str, params, keys: Sequence[str] | None = None, rank: int | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution and log the params it reads.

    ``params`` is the loaded :class:`pipeline.config.Params` or a stage's
    :class:`~pipeline.config.ParamsView`; ``keys`` the sections or dotted keys the stage
    reads (default: the view's own, i.e. the stage's ``PARAMS`` = its dvc.yaml params),
    which are logged as params and hashed into the ``params_hash`` tag.

    How the run ends: FINISHED; FAILED with the exception's type and message in the
    ``error`` tag; KILLED on Ctrl-C or SIGTERM (while the run is open, SIGTERM raises
    :class:`Terminated` in the main thread, so ``finally`` blocks run; the process then
    exits with status 143 as a plain SIGTERM would). The run name is the stage's, plus the
    DVC experiment's name when there is one; ``git_dirty`` says whether the work tree had
    uncommitted changes (then ``git_commit`` alone does not identify the code).
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
    commit, dirty = git_state()
    tags = {"stage": stage, "git_commit": commit, "git_dirty": str(dirty).lower(), "params_hash": params.digest(*keys)}
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc_experiment"] = experiment
    if os.environ.get("PVEN_ABLATION"):   # set by pipeline.ablations for each ablation's experiment
        tags["ablation"] = os.environ["PVEN_ABLATION"]
    run = mlflow.start_run(run_name=f"{stage} [{experiment}]" if experiment else stage, tags=tags)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        mlflow.log_params(flatten(params.select(keys)))
        yield StageRun(active=True, run_id=run.info.run_id)
    except (Terminated, KeyboardInterrupt) as exc:
        mlflow.set_tag("error", str(exc) or type(exc).__name__)
        mlflow.end_run(status="KILLED")
        if isinstance(exc, Terminated):
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    except BaseException as exc:
        mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:4000])
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _experiment_id(name: str) -> str:
    """Get or create the experiment; a local store keeps artifacts beside its database."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:  # made before this tag existed, or by hand
            mlflow.tracking.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (project_root() / "mlartifacts").as_uri()
    try:
        # A model-training experiment: MLflow 3 then opens it on its runs, not the GenAI overview.
        return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: TRAINING_KIND})
    except mlflow.exceptions.MlflowException:
        # Another process (a parallel Tune trial) created it between our lookup and create.
        return mlflow.get_experiment_by_name(name).experiment_id


def headline(full: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """The few numbers a stage is compared by: ``{name: full[dotted.path]}`` for each ``keys`` entry.

    Stages write these to ``metrics/<stage>.json`` (what ``dvc exp show`` and ``dvc metrics
    diff`` tabulate) and the whole record to ``reports/<stage>.json``. A path missing from
    ``full`` (e.g. no ground truth to score against) is left out, not an error.
    """
    flat = flatten(full)
    return {name: flat[path] for name, path in keys.items() if path in flat}


# Wall-clock figures: they belong in metrics/<stage>.json and MLflow, never in a file whose
# hash DVC tracks as an output (a rerun on the same inputs must not change any output).
TIMING_KEYS = frozenset({"seconds", "images_per_s", "epoch_s", "data_wait_s", "val_s", "train_s"})


def without_timings(record: Any) -> Any:
    """``record`` (nested dicts and lists) with every :data:`TIMING_KEYS` entry removed."""
    if isinstance(record, Mapping):
        return {k: without_timings(v) for k, v in record.items() if k not in TIMING_KEYS}
    if isinstance(record, list):
        return [without_timings(v) for v in record]
    return record
