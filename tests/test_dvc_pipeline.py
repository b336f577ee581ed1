"""The DVC pipeline for real, in a temporary git repo: repro, no-op re-repro, temp experiments, real layouts.

These run the same stage scripts `make repro` runs, on the real params shrunk to tiny sizes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import stage_env, write_project

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, timeout: int = 600, stdout_only: bool = False, **env) -> str:
    environ = stage_env(**env)
    environ["PATH"] = f"{VENV_BIN}:{environ['PATH']}"  # dvc runs `python stages/...` from PATH
    environ["DVC_SITE_CACHE_DIR"] = str(cwd / ".dvc-site")
    done = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def make_repo(tmp_path: Path, overrides=None) -> Path:
    project = write_project(tmp_path / "project", **({"overrides": overrides} if overrides else {}))
    (project / ".dvcignore").touch()
    run(["git", "init", "-q"], project)
    run(["git", "config", "user.email", "ci@example.invalid"], project)
    run(["git", "config", "user.name", "ci"], project)
    run([str(VENV_BIN / "dvc"), "init", "-q"], project)
    run([str(VENV_BIN / "dvc"), "config", "core.analytics", "false"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "project"], project)
    return project


def mlflow_runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("pven")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_repro_runs_synth_and_shard_then_does_nothing(tmp_path):
    project = make_repo(tmp_path)
    dvc = str(VENV_BIN / "dvc")
    run([dvc, "repro", "shard"], project)
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "query", "gallery"}
    assert manifest["splits"]["train"]["identities"] == 6
    assert (project / "reports/synth_contact_sheet.png").stat().st_size > 0
    shown = json.loads(run([dvc, "metrics", "show", "--json"], project, stdout_only=True))
    assert shown, "dvc metrics show lists the stages' metrics"

    again = run([dvc, "repro", "shard"], project)
    assert "didn't change" in again and "Running stage" not in again

    runs = mlflow_runs(project / "mlflow.db")
    assert sorted(r.info.run_name for r in runs) == ["shard", "synth"]  # check_params logs no run
    shard_run = next(r for r in runs if r.info.run_name == "shard")
    assert shard_run.data.metrics["train.samples"] == manifest["splits"]["train"]["samples"]
    assert "manifest.json" in {a.path for a in __import__("mlflow").tracking.MlflowClient(
        f"sqlite:///{project / 'mlflow.db'}").list_artifacts(shard_run.info.run_id)}

    # A params change reruns exactly the stages that read it.
    params = (project / "params.yaml").read_text().replace("samples_per_shard: 8", "samples_per_shard: 9")
    (project / "params.yaml").write_text(params)
    changed = run([dvc, "repro", "shard"], project)
    assert "Running stage 'shard'" in changed and "Running stage 'synth'" not in changed


def test_temp_experiment_logs_into_the_parent_projects_store(tmp_path):
    project = make_repo(tmp_path)
    dvc = str(VENV_BIN / "dvc")
    run([dvc, "exp", "run", "--temp", "-n", "tiny-five", "-S", "synth.train_ids=5", "shard"], project)
    runs = mlflow_runs(project / "mlflow.db")
    assert sorted(r.info.run_name for r in runs) == ["shard [tiny-five]", "synth [tiny-five]"]
    assert {r.data.tags.get("dvc_experiment") for r in runs} == {"tiny-five"}
    assert {r.data.params["synth.train_ids"] for r in runs if r.data.tags["stage"] == "synth"} == {"5"}
    assert not list((project / ".dvc" / "tmp").glob("**/mlflow.db")), "no store left inside the temp copy"


def test_real_dataset_layout_goes_through_the_same_stage(tmp_path):
    from tests.fixtures_datasets import make_veri776
    tree = make_veri776(tmp_path / "VeRi", train_ids=(1, 2, 3, 4), test_ids=(5, 6, 7), per_camera=2,
                        image_size=(48, 40))
    project = make_repo(tmp_path, overrides=["data.source=veri776", f"data.root={tree.root}",
                                             "shard.samples_per_shard=8", "shard.min_shards=2",
                                             "shard.workers=1", "synth.workers=1", "synth.train_ids=4",
                                             "synth.test_ids=2", "synth.image_size=48", "data.val_ids=0"])
    run([str(VENV_BIN / "dvc"), "repro", "shard"], project)
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert manifest["source"] == "veri776" and manifest["root"] == str(tree.root)
    assert manifest["splits"]["train"]["samples"] == len(tree.records["train"])
    assert manifest["splits"]["query"]["samples"] == len(tree.records["query"])


def commit_all(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project)


def test_experiments_compare_with_numbers_and_a_bad_param_costs_no_output(tmp_path):
    project = make_repo(tmp_path)
    dvc = str(VENV_BIN / "dvc")
    run([dvc, "repro", "shard"], project)
    commit_all(project, "baseline: dvc.lock, metrics and reports are tracked by git")
    for name, ids in (("four-ids", 4), ("five-ids", 5)):
        run([dvc, "exp", "run", "-n", name, "-S", f"synth.train_ids={ids}", "shard"], project)

    table = json.loads(run([dvc, "exp", "show", "--json"], project, stdout_only=True))
    samples = {}
    for entry in table:  # the baseline commit, then its experiments
        for exp in [entry, *(e for group in entry.get("experiments") or [] for e in group["revs"])]:
            metrics = exp["data"]["metrics"]["metrics/shard.json"]["data"]
            samples[exp.get("name") or exp["rev"]] = metrics["train_samples"]
    assert set(samples) >= {"four-ids", "five-ids"} and all(isinstance(v, int) for v in samples.values())
    assert samples["four-ids"] < samples["five-ids"] and len(set(samples.values())) == 3
    shown = run([dvc, "exp", "show", "--md", "--only-changed"], project, stdout_only=True)
    assert "train_samples" in shown and "!" not in shown
    diff = json.loads(run([dvc, "exp", "diff", "four-ids", "five-ids", "--json"], project, stdout_only=True))
    changed = diff["metrics"]["metrics/shard.json"]["train_samples"]
    assert (changed["old"], changed["new"]) == (samples["four-ids"], samples["five-ids"])

    manifest = project / "data/shards/manifest.json"
    before = manifest.read_bytes()
    for typo in ("+shard.samples_per_shardd=9", "+evaluate.lam=0.5"):  # a misspelt key, an unknown section
        environ = stage_env(DVC_SITE_CACHE_DIR=str(project / ".dvc-site"))
        environ["PATH"] = f"{VENV_BIN}:{environ['PATH']}"
        done = subprocess.run([dvc, "exp", "run", "-S", typo, "shard"], cwd=project, env=environ,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert "unknown key" in done.stderr + done.stdout and "Traceback" not in done.stderr + done.stdout
        assert manifest.read_bytes() == before, f"{typo}: the shard output was touched"
        run(["git", "checkout", "--", "params.yaml"], project)
