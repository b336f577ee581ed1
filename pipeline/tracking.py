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
import sys
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


OFFLINE_ENV = "PVEN_MLFLOW_OFFLINE_DIR"  # where runs go while the tracking server is unreachable
RECORDS = "records.jsonl"


def offline_root() -> Path:
    return Path(os.environ.get(OFFLINE_ENV) or project_root() / "mlflow-offline")


class Spool:
    """A run's records kept on local disk while MLflow cannot be reached (logged later by :func:`replay`).

    ``<folder>/records.jsonl``: one JSON object per line, appended and flushed as they come
    (a line torn by a crash is skipped at replay); artifacts are copied to
    ``<folder>/artifacts/`` at once, since the stage may overwrite its outputs later.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / "artifacts").mkdir(parents=True, exist_ok=True)

    def add(self, kind: str, **data: Any) -> None:
        import json
        with open(self.folder / RECORDS, "a") as f:
            f.write(json.dumps({"kind": kind, **data}, default=str) + "\n")
            f.flush()

    def add_artifact(self, path: str | Path, folder: str | None) -> None:
        import secrets
        import shutil
        stored = self.folder / "artifacts" / secrets.token_hex(4) / Path(path).name
        stored.parent.mkdir(parents=True)
        shutil.copy2(path, stored)
        self.add("artifact", file=str(stored.relative_to(self.folder)), folder=folder)


class StageRun:
    """What a stage logs through. Inactive (every method a no-op) off rank 0.

    When a call to MLflow fails (server unreachable at the start or mid-run), the failure
    is printed once, and this and every later record go to a :class:`Spool` instead; the
    stage carries on. ``python -m pipeline.tracking replay <folder>`` logs them later.
    """

    def __init__(self, active: bool, run_id: str | None = None, stage: str = "", meta: dict | None = None):
        self.active = active
        self.run_id = run_id
        self.stage, self.meta = stage, dict(meta or {})
        self.spool: Spool | None = None

    def go_offline(self, error: BaseException) -> None:
        """Switch to the local spool (once); report why, and how to log the records later."""
        if self.spool is not None:
            return
        import time
        folder = offline_root() / f"{self.stage or 'run'}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.spool = Spool(folder)
        self.spool.add("start", run_id=self.run_id, tracking_uri=tracking_uri(), **self.meta)
        print(f"WARNING: MLflow at {tracking_uri()} failed ({type(error).__name__}: {str(error)[:300]}); the stage "
              f"goes on and keeps its MLflow records in {folder}. Log them when the server is back with: "
              f"python -m pipeline.tracking replay {folder}", file=sys.stderr, flush=True)

    def _send(self, call, kind: str, **record: Any) -> None:
        if not self.active:
            return
        if self.spool is None:
            try:
                call()
                return
            except Exception as exc:  # any MLflow/HTTP/DB failure: tracking must not stop training
                self.go_offline(exc)
        if kind == "artifact":
            self.spool.add_artifact(record["path"], record["folder"])
        else:
            self.spool.add(kind, **record)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow
        numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
        self._send(lambda: mlflow.log_metrics(numeric, step=step), "metrics", metrics=numeric, step=step,
                   timestamp=_now_ms())

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow
        self._send(lambda: mlflow.log_artifact(str(path), artifact_path=folder), "artifact", path=path, folder=folder)

    def log_dict(self, data: Any, name: str) -> None:
        import mlflow
        self._send(lambda: mlflow.log_dict(data, name), "dict", data=data, name=name)

    def log_onnx_model(self, path: str | Path, name: str, signature: Any, input_example: Any) -> str | None:
        """Log an ONNX file as an MLflow 3 logged model of this run (``mlflow.onnx.log_model(name=...)``).

        Returns its model URI (``models:/<model id>``), or None when offline: the spool then
        keeps the file as a plain artifact (replay logs it as one).
        """
        uri: list[str] = []

        def call() -> None:
            import mlflow.onnx
            import onnx
            info = mlflow.onnx.log_model(onnx.load(str(path)), name=name, signature=signature,
                                         input_example=input_example, save_as_external_data=False)
            uri.append(info.model_uri)
        self._send(call, "artifact", path=path, folder=f"onnx/{name}")
        return uri[0] if uri else None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow
        tags = {k: str(v) for k, v in tags.items()}
        self._send(lambda: mlflow.set_tags(tags), "tags", tags=tags)


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Terminated(BaseException):
    """SIGTERM arrived while a stage's run was open (raised from the signal handler)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"killed by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def stage_run(stage: str, params, keys: Sequence[str] | None = None, rank: int | None = None,
              resume_run_id: str | None = None) -> Iterator[StageRun]:
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
    ``resume_run_id`` reopens that run instead of starting one (a resumed Tune sweep keeps its
    parent run): its tags are updated, its params (logged when it started) are left as they are.
    """
    rank = current_rank() if rank is None else rank
    if rank != 0:
        yield StageRun(active=False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    keys = tuple(params.keys if keys is None else keys)
    commit, dirty = git_state()
    tags = {"stage": stage, "git_commit": commit, "git_dirty": str(dirty).lower(), "params_hash": params.digest(*keys)}
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc_experiment"] = experiment
    if os.environ.get("PVEN_ABLATION"):   # set by pipeline.ablations for each ablation's experiment
        tags["ablation"] = os.environ["PVEN_ABLATION"]
    run_name = f"{stage} [{experiment}]" if experiment else stage
    flat_params = flatten(params.select(keys))
    handle = StageRun(active=True, run_id=resume_run_id, stage=stage, meta={
        "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT), "run_name": run_name,
        "tags": tags, "params": {k: str(v) for k, v in flat_params.items()}, "start_time": _now_ms()})
    try:  # an unreachable server must not stop the stage: it then runs offline (see StageRun)
        mlflow.set_experiment(experiment_id=_experiment_id(handle.meta["experiment"]))
        if resume_run_id is not None:
            mlflow.start_run(run_id=resume_run_id)
            mlflow.set_tags(tags)
        else:
            handle.run_id = mlflow.start_run(run_name=run_name, tags=tags).info.run_id
            mlflow.log_params(flat_params)
    except Exception as exc:
        handle.go_offline(exc)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield handle
    except (Terminated, KeyboardInterrupt) as exc:
        _end(handle, "KILLED", str(exc) or type(exc).__name__)
        if isinstance(exc, Terminated):
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    except BaseException as exc:
        # An exception may carry the status it ends the run with (a stop on request: KILLED).
        _end(handle, getattr(exc, "run_status", "FAILED"), f"{type(exc).__name__}: {exc}"[:4000])
        raise
    else:
        _end(handle, "FINISHED")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _end(handle: StageRun, status: str, error: str | None = None) -> None:
    """End the run on the server, or record the end in the spool when offline (or failing now)."""
    import mlflow
    if error is not None:
        handle.set_tags({"error": error})
    if handle.spool is None:
        try:
            mlflow.end_run(status=status)
            return
        except Exception as exc:
            handle.go_offline(exc)
    handle.spool.add("end", status=status, end_time=_now_ms())
    try:
        mlflow.end_run(status=status)  # pops the local active run; the server call may fail again
    except Exception:
        pass


def replay(folder: str | Path, uri: str | None = None) -> str:
    """Log a spooled run (see :class:`Spool`) to MLflow at ``uri`` (default: :func:`tracking_uri`).

    Continues the run the stage had opened before the server went away, else creates it
    with the spooled name, tags and params. Writes ``replayed.json`` (the run id) into
    ``folder``; a folder already replayed is refused. Returns the run id.
    """
    import json

    from pipeline import atomic

    folder = Path(folder)
    done = folder / "replayed.json"
    if done.exists():
        raise ValueError(f"{folder}: already replayed into run {json.loads(done.read_text())['run_id']}")
    records = []
    for line in (folder / RECORDS).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # torn by a crash mid-write
    start = next(r for r in records if r["kind"] == "start")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri or tracking_uri())
    client = MlflowClient()
    run_id = start.get("run_id")
    if run_id is None:
        experiment = _experiment_id(start["experiment"])
        run_id = client.create_run(experiment, start_time=start["start_time"], tags=start["tags"],
                                   run_name=start["run_name"]).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in start["params"].items()])
    status, end_time = "FINISHED", None
    for r in records:
        if r["kind"] == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, r["timestamp"], r["step"] or 0)
                                              for k, v in r["metrics"].items()])
        elif r["kind"] == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in r["tags"].items()])
        elif r["kind"] == "dict":
            client.log_dict(run_id, r["data"], r["name"])
        elif r["kind"] == "artifact":
            client.log_artifact(run_id, str(folder / r["file"]), r["folder"])
        elif r["kind"] == "end":
            status, end_time = r["status"], r["end_time"]
    client.set_tag(run_id, "replayed_from", str(folder))
    client.set_terminated(run_id, status=status, end_time=end_time)
    atomic.write_json(done, {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()})
    return run_id


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


if __name__ == "__main__":
    from pipeline import cli

    def _main() -> None:
        if len(sys.argv) < 3 or sys.argv[1] != "replay":
            raise cli.InputError("usage: python -m pipeline.tracking replay FOLDER [FOLDER ...] "
                                 "(MLFLOW_TRACKING_URI names the server)")
        for folder in sys.argv[2:]:
            try:
                print(f"{folder}: logged as run {replay(folder)} at {tracking_uri()}")
            except (ValueError, FileNotFoundError, StopIteration) as exc:
                raise cli.InputError(f"{folder}: cannot replay ({exc})") from None
    cli.run(_main)
