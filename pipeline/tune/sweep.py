"""The sweep's driver: checks, Ray Tune (new or resumed), results, outputs, the parent MLflow run.

:func:`run_sweep` is what ``stages/tune.py`` calls, in this order:

1. Checks that need no cluster (:func:`preflight`): the data exist, the metric can be
   reported (a ``val_*`` metric needs validation splits in the shards), ``reid.P`` fits the
   training identities, ``ray[default]`` is installed (the state API through which Ray Train
   frees a stopped trial's workers), Optuna when ``tune.search`` is optuna. Bad params were
   already rejected when params.yaml was loaded (:func:`pipeline.config._check_tune`).
2. Connects to Ray (``address``: ``RAY_ADDRESS``, or the cluster running on this machine,
   or a new local instance) and resolves the trial's resources against the alive nodes
   (:func:`pipeline.tune.space.trial_resources`): a trial that can never fit is a
   :class:`~pipeline.config.ConfigError` before any trial starts.
3. Opens the parent MLflow run (the stage run: tags and params like every stage, plus the
   search space) and runs ``Tuner(...).fit()``, or, when ``<storage>/<name>`` already holds
   this sweep, ``Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)``
   under the same parent run (its id is kept in ``<storage>/<name>/pven_sweep.json``):
   finished trials are not rerun, unfinished ones restart from their last checkpoint.
4. One row per trial (:func:`collect`), the best trial by its final ``tune.metric``, and the
   outputs under ``tune.out_dir``: ``best.yaml`` (the overrides, a YAML list of
   ``key=value`` that ``load_params(overrides=...)`` and ``dvc exp run -S`` take),
   ``results.csv``, ``parallel.png``; ``metrics/tune.json``. All are logged to the parent
   run; each child run gets ``stopped_early`` / ``trial_status`` tags and a final status.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.charts import parallel_chart
from pipeline.cli import InputError
from pipeline.config import ConfigError, Params, ParamsView, apply_overrides
from pipeline.data.shards import read_manifest
from pipeline.reid.train import validation_splits
from pipeline.tracking import stage_run, tracking_uri
from pipeline.tune.space import (
    DRIVER_CPU,
    describe_space,
    max_epochs,
    search_space,
    sweep_name,
    trial_overrides,
    trial_resources,
)
from pipeline.tune.trial import PARENT_TAG, TRIAL_TAG, run_trial

STATE_FILE = "pven_sweep.json"   # in the sweep's folder: the parent run to resume
METRICS = Path("metrics/tune.json")
RESULTS, BEST, PICTURE = "results.csv", "best.yaml", "parallel.png"
TRIAL_KEYS = ("seed", "masks.out_dir", "reid")   # the params train() reads: shipped to every trial


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: ``rows`` one per trial (see :func:`collect`), the best row,
    the sweep's folder (``path``), its Ray experiment ``name``, the parent run and the headline."""
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    path: str
    name: str
    parent_run_id: str
    restored: bool
    metrics: dict[str, Any]
    overrides: list[str]


def preflight(params: Params, data_dir: Path) -> dict:
    """Checks that need no cluster (module docstring, step 1); returns the shard manifest."""
    t = params.tune
    try:
        manifest = read_manifest(data_dir)
    except FileNotFoundError as exc:
        raise InputError(f"masks.out_dir: {exc}") from None
    if t.metric.startswith("val_") and validation_splits(manifest["splits"]) is None:
        raise ConfigError(f"tune.metric: {t.metric!r} is a validation metric, but the shards in {data_dir} have no "
                          f"validation splits (val_query/val_gallery or query/gallery), so no trial would report it; "
                          f"expected data.val_ids > 0 or a training metric (loss)")
    ids = manifest["splits"]["train"]["identities"]
    if params.reid.P > ids:
        raise ConfigError(f"reid.P: {params.reid.P} identities per batch, but {data_dir} has {ids} training identities")
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as exc:
        # Without the dashboard there is no state API: Ray Train then never frees the workers'
        # resources of a trial that Tune stopped (ASHA, max_t), and the next trials wait forever.
        raise InputError(f"tune: Ray's dashboard dependencies are missing ({exc}); "
                         f"expected pip install 'ray[default]' (pyproject.toml declares it)") from None
    if t.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search: optuna, but the optuna package is not installed "
                              "(pip install 'pven-pipeline[tune]' or pip install optuna)") from None
    return manifest


def data_digest(manifest: dict) -> str:
    """Short hash of every shard of the manifest (what the trials read)."""
    shards = {split: [s["sha256"] for s in entry["shards"]] for split, entry in sorted(manifest["splits"].items())}
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:12]


def storage_path(params: Params, root: Path) -> str:
    """``tune.storage`` as Ray takes it: a URI as it is, a path made absolute against ``root``."""
    storage = params.tune.storage
    return storage if "://" in storage else str((root / storage).resolve())


def _fs(path: str):
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(path)


def _read_state(exp_path: str) -> dict | None:
    fs, where = _fs(exp_path)
    try:
        with fs.open_input_stream(f"{where}/{STATE_FILE}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


def _write_state(exp_path: str, state: dict) -> None:
    fs, where = _fs(exp_path)
    fs.create_dir(where, recursive=True)
    tmp = f"{where}/.{STATE_FILE}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(state, indent=2, sort_keys=True).encode())
    fs.move(tmp, f"{where}/{STATE_FILE}")


def _alive_nodes() -> list[dict[str, float]]:
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def resolve_resources(params: Params):
    """:func:`trial_resources` on the connected cluster, waiting up to ``tune.resource_wait_s``
    for an autoscaling cluster to grow (a cluster that never fits raises its ConfigError)."""
    deadline = time.monotonic() + params.tune.resource_wait_s
    while True:
        try:
            return trial_resources(params, _alive_nodes())
        except ConfigError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(5)


def connect(address: str | None) -> None:
    """``ray.init`` (see module docstring, step 2); workers get telemetry off."""
    import ray
    if ray.is_initialized():
        return
    env = {"MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, runtime_env={"env_vars": env},
             log_to_driver=True)


def run_sweep(params: Params | ParamsView, root: str | Path = ".", address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep of ``params.tune`` on the data of ``masks.out_dir``; see the module docstring."""
    root = Path(root).resolve()
    t = params.tune
    data_dir = (root / params.masks.out_dir).resolve()
    manifest = preflight(params, data_dir)
    name = sweep_name(params, data_digest(manifest))
    storage = storage_path(params, root)
    exp_path = f"{storage.rstrip('/')}/{name}"

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    connect(address)
    try:
        resources = resolve_resources(params)
        restoring = tune.Tuner.can_restore(exp_path)
        state = _read_state(exp_path) if restoring else None
        with stage_run("tune", params, resume_run_id=state and state["parent_run_id"]) as run:
            import mlflow
            if run.run_id is None:   # the stage run went offline: children would have no parent to log under
                raise InputError(f"tune: the MLflow tracking store {tracking_uri()} is unreachable; a sweep needs it "
                                 f"(each trial logs a child run under the sweep's run)")
            experiment_id = mlflow.get_run(run.run_id).info.experiment_id
            if state is None:
                _write_state(exp_path, {"parent_run_id": run.run_id, "experiment_id": experiment_id,
                                        "tracking_uri": tracking_uri()})
            run.set_tags({"sweep": name, "sweep_path": exp_path, "search_space": json.dumps(describe_space(params)),
                          "trial_workers": resources.workers, "trial_use_gpu": resources.use_gpu,
                          "resumed_sweep": restoring})
            # What a trial trains with, as resolved here (a preset must not apply twice); every
            # other section takes its defaults in the trial, none of which train() reads.
            base = apply_overrides({}, params.select(TRIAL_KEYS))
            static = {"base": base, "fixed": trial_overrides(params, {}), "data_dir": str(data_dir),
                      "train_storage": f"{exp_path}/train",
                      "max_failures": t.max_failures,
                      "resources": {"workers": resources.workers, "cpus_per_worker": resources.cpus_per_worker,
                                    "use_gpu": resources.use_gpu},
                      "tracking": {"uri": tracking_uri(), "experiment_id": experiment_id,
                                   "parent_run_id": run.run_id, "tags": {"sweep": name}}}
            trainable = tune.with_resources(tune.with_parameters(_trial, static=static), {"cpu": DRIVER_CPU})
            if restoring:
                print(f"tune: resuming sweep {exp_path}")
                tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
            else:
                epochs = max_epochs(params)
                scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(t.grace_period, epochs),
                                           reduction_factor=t.reduction_factor)
                             if t.scheduler == "asha" else FIFOScheduler())
                searcher, limit = _searcher(params, resources.max_concurrent)
                tuner = tune.Tuner(
                    trainable, param_space=search_space(params),
                    tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                                scheduler=scheduler, search_alg=searcher,
                                                max_concurrent_trials=limit),
                    run_config=tune.RunConfig(name=name, storage_path=storage,
                                              failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                              verbose=1))
            grid = tuner.fit()
            rows = collect(grid, params)
            result = write_outputs(params, root, rows, name, exp_path, run, restoring)
            tag_children(params, rows, experiment_id, run.run_id)
            return result
    finally:
        ray.shutdown()


def _trial(config: dict[str, Any], static: dict[str, Any]) -> None:
    """Tune's trainable: the sampled config plus the static part shipped by ``with_parameters``."""
    run_trial({**static, "sampled": dict(config)})


def _searcher(params: Params, max_concurrent: int):
    """(search algorithm, max_concurrent_trials for TuneConfig), seeded by ``seed``.

    Random search limits concurrency itself (Tune ignores ``max_concurrent_trials`` next to a
    ``BasicVariantGenerator`` instance); Optuna is a ``Searcher``, which Tune wraps in a
    ``ConcurrencyLimiter`` of ``max_concurrent_trials``.
    """
    if params.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        return OptunaSearch(seed=params.seed), max_concurrent
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=params.seed, max_concurrent=max_concurrent), None


def collect(grid, params: Params) -> list[dict[str, Any]]:
    """One row per trial, sorted by trial id: ``trial_id``, each searched key's value, ``epochs``
    run, ``final_<metric>`` (last report) and ``best_<metric>`` (over its epochs), ``status``
    (completed | stopped_early | error), ``stopped_early`` and ``resumed`` (restarted from a
    checkpoint at some point)."""
    t = params.tune
    keys = [d.key for d in t.space]
    better = max if t.mode == "max" else min
    rows = []
    for result in grid:
        last = dict(result.metrics or {})
        frame = result.metrics_dataframe
        values = [float(v) for v in frame[t.metric].tolist()] if frame is not None and t.metric in frame else []
        values = [v for v in values if math.isfinite(v)]
        epochs = int(last.get("epoch", 0))
        error = result.error is not None
        stopped = not error and epochs < max_epochs(params)
        resumed = bool(frame is not None and "resumed_from_step" in frame and (frame["resumed_from_step"] >= 0).any())
        rows.append({"trial_id": last.get("trial_id") or Path(result.path).name,
                     **{k: result.config.get(k) for k in keys}, "epochs": epochs,
                     f"final_{t.metric}": float(last[t.metric]) if t.metric in last else math.nan,
                     f"best_{t.metric}": better(values) if values else math.nan,
                     "status": "error" if error else "stopped_early" if stopped else "completed",
                     "stopped_early": stopped, "resumed": resumed,
                     "error": f"{type(result.error).__name__}: {result.error}"[:300] if error else ""})
    return sorted(rows, key=lambda r: r["trial_id"])


def best_row(rows: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """The trial with the best final metric (first by trial id on a tie); raises if none reported it."""
    t = params.tune
    scored = [r for r in rows if math.isfinite(r[f"final_{t.metric}"])]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:2000]
        raise RuntimeError(f"tune: no trial reported {t.metric} ({len(rows)} trials; {errors or 'no errors'})")
    sign = 1 if t.mode == "max" else -1
    return max(scored, key=lambda r: (sign * r[f"final_{t.metric}"], [-ord(c) for c in r["trial_id"]]))


def best_overrides(best: dict[str, Any], params: Params) -> list[str]:
    """``["reid.loss.w_id=0.83...", ...]``: the best trial's searched values as overrides."""
    return [f"{d.key}={best[d.key]!r}" for d in params.tune.space]


def write_outputs(params: Params, root: Path, rows: list[dict], name: str, exp_path: str, run,
                  restored: bool) -> SweepResult:
    """best.yaml, results.csv, parallel.png under ``tune.out_dir``, metrics/tune.json; logged to the parent."""
    t = params.tune
    out = root / t.out_dir
    best = best_row(rows, params)
    overrides = best_overrides(best, params)
    final = f"final_{t.metric}"
    header = (f"# Best trial {best['trial_id']} of Ray Tune sweep {name} ({exp_path}):\n"
              f"# {t.metric} {best[final]:.6g} after {best['epochs']} epochs (mode {t.mode}), of {len(rows)} trials.\n"
              f"# load_params('params.yaml', overrides=yaml.safe_load(open('tune/best.yaml')))\n"
              f"# dvc exp run $(sed -n 's/^- /-S /p' tune/best.yaml)\n")
    atomic.write_text(out / BEST, header + "".join(f"- {o}\n" for o in overrides))
    columns = ["trial_id", *[d.key for d in t.space], "epochs", final, f"best_{t.metric}", "status",
               "stopped_early", "resumed", "error"]
    atomic.write_csv(out / RESULTS, [{**r, "error": r["error"].replace(",", ";").replace("\n", " ")} for r in rows],
                     columns, ".6g")
    picture = parallel_chart(rows, [d.key for d in t.space] + [final], final,
                             title=f"Sweep {name}: {len(rows)} trials, colour = {final} (red best)",
                             higher_is_better=t.mode == "max")
    atomic.write_png(out / PICTURE, picture)
    count = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "error")}
    metrics = {f"best_{t.metric}": best[final], "trials": len(rows), "completed": count["completed"],
               "stopped_early": count["stopped_early"], "errored": count["error"],
               "epochs_trained": sum(r["epochs"] for r in rows)}
    atomic.write_json(root / METRICS, metrics)
    run.log_metrics(metrics)
    run.log_metrics({f"best.{d.key}": best[d.key] for d in t.space})
    run.set_tags({"best_trial": best["trial_id"]})
    for path in (out / BEST, out / RESULTS, out / PICTURE, root / METRICS):
        run.log_artifact(path)
    print(f"tune: best trial {best['trial_id']}: {t.metric} {best[final]:.4g}; " + " ".join(overrides))
    return SweepResult(rows=rows, best=best, path=exp_path, name=name, parent_run_id=run.run_id, restored=restored,
                       metrics=metrics, overrides=overrides)


def tag_children(params: Params, rows: list[dict], experiment_id: str, parent_run_id: str) -> None:
    """Each trial's child run gets its results row: ``stopped_early`` / ``trial_status`` tags and the
    metrics ``epochs``, ``final_<metric>``, ``best_<metric>`` (what the compare view lines up).

    A trial that ASHA stopped, or that reached ``max_t`` (Tune then stops it too), ends with its
    processes killed, possibly before its worker closed the run, or after: Tune's stop reaches the
    workers a moment after its decision, so a stopped trial may still finish the epoch it was in
    and close its run as FINISHED. Each run's status is set here from Tune's record: KILLED when
    stopped early, FINISHED when completed, FAILED on error.
    """
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri())
    t = params.tune
    children = {r.data.tags.get(TRIAL_TAG): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000)}
    status = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED"}
    for row in rows:
        child = children.get(row["trial_id"])
        if child is None:
            continue
        run_id = child.info.run_id
        client.set_tag(run_id, "stopped_early", str(row["stopped_early"]).lower())
        client.set_tag(run_id, "trial_status", row["status"])
        for key in ("epochs", f"final_{t.metric}", f"best_{t.metric}"):
            if math.isfinite(float(row[key])):
                client.log_metric(run_id, key, float(row[key]))
        if client.get_run(run_id).info.status != status[row["status"]]:
            client.set_terminated(run_id, status[row["status"]])
