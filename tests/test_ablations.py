"""`python -m pipeline.experiments.ablations` for real: two DVC experiments in a temporary git repo, one table.

The whole pipeline runs on the real params shrunk (tests/test_stages_inprocess.py's sizes);
the second ablation reuses the first's synth..masks outputs from DVC's run cache.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.evaluation.bootstrap import paired_difference
from pipeline.experiments.ablations import BY_NAME, compare
from tests.test_dvc_pipeline import VENV_BIN, make_repo, mlflow_runs
from tests.test_stages_inprocess import SHRUNK

pytestmark = pytest.mark.slow


def test_two_ablations_run_as_experiments_and_compare_paired(tmp_path):
    project = make_repo(tmp_path, overrides=[*SHRUNK, "eval.bootstrap=200"])
    env_path = f"{VENV_BIN}:{__import__('os').environ['PATH']}"
    done = subprocess.run([sys.executable, "-m", "pipeline.experiments.ablations", "--only", "pven,global_only",
                           "--root", str(project)], cwd=project, capture_output=True, text=True, timeout=900,
                          env={**__import__("tests.conftest", fromlist=["stage_env"]).stage_env(),
                               "PATH": env_path, "DVC_SITE_CACHE_DIR": str(project / ".dvc-site")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((project / "reports/ablations.json").read_text())
    rows = {r["ablation"]: r for r in table["rows"]}
    assert list(rows) == ["pven", "global_only"] and rows["global_only"]["mode"] == "global"
    base = rows["pven"]
    # The baseline against itself: exactly 0, a zero-width interval.
    assert base["mAP_minus_pven"] == base["mAP_minus_pven_lo"] == base["mAP_minus_pven_hi"] == 0.0
    other = rows["global_only"]
    assert other["mAP_lo"] <= other["mAP"] <= other["mAP_hi"]
    assert other["mAP_minus_pven"] == pytest.approx(other["mAP"] - base["mAP"], abs=1e-12)
    assert "| global_only |" in (project / "reports/ablations.md").read_text() and "| global_only |" in done.stdout
    # Two experiments, the workspace untouched, the stages' runs and one summary run per ablation tagged.
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True).stdout.split()
    assert sorted(r.rsplit("/", 1)[-1] for r in refs) == ["abl-global_only", "abl-pven"]
    assert not (project / "models").exists(), "--temp: the workspace gets no outputs"
    runs = mlflow_runs(project / "mlflow.db")
    summary = {r.data.tags["ablation"]: r for r in runs if r.data.tags.get("stage") == "ablations"}
    assert set(summary) == {"pven", "global_only"}
    assert summary["global_only"].data.metrics["mAP"] == pytest.approx(other["mAP"])
    trained = {r.data.tags.get("ablation") for r in runs if r.data.tags.get("stage") == "train_reid"}
    assert trained == {"pven", "global_only"}


def test_compare_pairs_by_query_key_and_refuses_different_queries():
    rng = np.random.default_rng(0)

    def rows(aps, order):
        return [{"repeat": "0", "key": f"q{i}", "vid": str(i // 3), "camera": "1", "azimuth": "",
                 "pven_ap": f"{aps[i]}", "pven_first_rank": "1" if aps[i] > 0.5 else "3",
                 "global_ap": f"{aps[i] / 2}", "global_first_rank": "2", "local_ap": "", "local_first_rank": "0"}
                for i in order]

    a, b = rng.random(12), rng.random(12)
    runs = {"pven": rows(a, range(12)), "official": rows(b, reversed(range(12)))}   # another row order
    out = compare(runs, resamples=300, seed=1)
    groups = np.arange(12) // 3
    expected = paired_difference(b, a, groups.astype(str), resamples=300, seed=1)
    assert out[1]["mAP_minus_pven"] == pytest.approx(expected.value)
    assert (out[1]["mAP_minus_pven_lo"], out[1]["mAP_minus_pven_hi"]) == pytest.approx((expected.lo, expected.hi))
    assert BY_NAME["official"].mode == "pven"
    with pytest.raises(ValueError, match="test queries differ"):
        compare({"pven": rows(a, range(12)), "official": rows(b, range(11))}, resamples=10, seed=0)
