"""MLflow tracking: one run per stage with tags and params, rank 0 only, one store for every way of running."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking
from tests.conftest import free_port, stage_env, write_project


def test_stage_run_logs_params_tags_metrics_and_rank_gating(tmp_path, monkeypatch, tiny_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    (tmp_path / "note.txt").write_text("hello")
    with tracking.stage_run("synth", tiny_params, ["seed", "synth"], rank=0) as run:
        run.log_metrics({"train": {"images": 12}, "seconds": 1.5, "flag": True})
        run.log_artifact(tmp_path / "note.txt")
    with tracking.stage_run("synth", tiny_params, ["synth"], rank=1) as other:
        assert not other.active
        other.log_metrics({"x": 1})  # a no-op, not an error

    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    [exp] = [e for e in client.search_experiments() if e.name == "pven"]
    [logged] = client.search_runs([exp.experiment_id])
    assert logged.info.run_name == "synth [exp-abc]" and logged.info.status == "FINISHED"
    assert logged.data.tags["stage"] == "synth"
    assert logged.data.tags["params_hash"] == tiny_params.digest("seed", "synth")
    assert logged.data.tags["dvc_experiment"] == "exp-abc"
    assert logged.data.params["synth.train_ids"] == "6" and logged.data.params["seed"] == "0"
    assert logged.data.metrics == {"train.images": 12.0, "seconds": 1.5}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_failed_stage_ends_its_run_failed(tmp_path, monkeypatch, tiny_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError):
        with tracking.stage_run("shard", tiny_params, ["shard"], rank=0):
            raise RuntimeError("boom")
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [logged] = client.search_runs([client.get_experiment_by_name("pven").experiment_id])
    assert logged.info.status == "FAILED" and logged.data.tags["error"] == "RuntimeError: boom"


KILLABLE = """
import sys, time
from pipeline import tracking
from pipeline.config import load_params
params = load_params(sys.argv[1])
with tracking.stage_run("train_reid", params, ["reid"], rank=0):
    print("running", flush=True)
    time.sleep(120)
"""


def test_stage_killed_by_sigterm_ends_its_run_killed(tmp_path):
    import signal

    from tests.conftest import ROOT
    script = tmp_path / "stage.py"
    script.write_text(KILLABLE)
    env = stage_env(DVC_ROOT=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT / "params.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [logged] = client.search_runs([client.get_experiment_by_name("pven").experiment_id])
    assert logged.info.status == "KILLED" and logged.data.tags["error"] == "killed by signal SIGTERM"


def test_run_names_and_tags_tell_experiments_and_dirty_trees_apart(tmp_path, monkeypatch, tiny_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for cmd in (["init", "-q"], ["config", "user.email", "ci@example.invalid"], ["config", "user.name", "ci"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    with tracking.stage_run("synth", tiny_params, ["seed"], rank=0):
        pass
    (tmp_path / "params.yaml").write_text("seed: 1\n")   # an uncommitted change, as `dvc exp run -S` makes
    monkeypatch.setenv("DVC_EXP_NAME", "seed-one")
    with tracking.stage_run("synth", tiny_params, ["seed"], rank=0):
        pass
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pven")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs in MLflow 3
    runs = {r.info.run_name: r.data.tags for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"synth", "synth [seed-one]"}
    assert runs["synth"]["git_dirty"] == "false" and runs["synth [seed-one]"]["git_dirty"] == "true"
    assert runs["synth"]["git_commit"] == runs["synth [seed-one]"]["git_commit"] != "unknown"


def test_project_root_prefers_dvc_root_then_walks_up_to_dvc_yaml(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.project_root() == tmp_path.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", "/somewhere/else")
    assert tracking.project_root() == Path("/somewhere/else")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.tracking_uri() == "http://127.0.0.1:9"


@contextlib.contextmanager
def running_mlflow_server(folder: Path, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 (store and artifacts in ``folder``); yields (url, process);
    stopped by PID even if the caller fails (or stopped it already, to test a server going away)."""
    port = port or free_port()
    log = open(folder / "mlflow-server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=stage_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log = (folder / "mlflow-server.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server did not start:\n{log}")
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_mlflow_server(proc)
        log.close()


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, 15)  # the server's own workers are in its session
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a free port; stopped by PID even if the test fails."""
    with running_mlflow_server(tmp_path) as (url, _):
        yield url


@pytest.mark.server
@pytest.mark.slow
def test_stage_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    project = write_project(tmp_path / "project")
    done = subprocess.run([sys.executable, "stages/synth.py"], cwd=project, capture_output=True, text=True,
                          env=stage_env(MLFLOW_TRACKING_URI=mlflow_server), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("pven").experiment_id])
    assert run.info.run_name == "synth" and run.data.tags["stage"] == "synth"
    assert run.data.params["synth.train_ids"] == "6"
    assert run.data.metrics, "the stage's summary metrics are logged"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"synth_contact_sheet.png", "synth.json"} <= artifacts
    assert not (project / "mlflow.db").exists(), "with a server URI nothing goes to the local store"
