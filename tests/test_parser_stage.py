"""The train_parser stage script for real (tiny): checkpoint, metrics, plot data, picture, MLflow run."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from pipeline.data.shards import ShardOptions, write_shards
from pipeline.parsing.model import load_checkpoint
from tests.conftest import TINY, stage_env, write_project
from tests.test_masks import TINY_ENCODER
from tests.test_shards import make_records

pytestmark = pytest.mark.slow

PARSER_TINY = [*TINY, f"parser.encoder={TINY_ENCODER}", "parser.image_size=32", "parser.epochs=2",
               "parser.batch_size=4", "parser.num_workers=0", "parser.val_fraction=0.3"]


def test_train_parser_stage_writes_checkpoint_metrics_plots_and_logs(tmp_path):
    project = write_project(tmp_path / "project", PARSER_TINY)
    write_shards(make_records(project / "raw", n_train=24, size=(40, 32)), project / "data/shards",
                 ShardOptions(samples_per_shard=8, min_shards=2), seed=0)
    done = subprocess.run([sys.executable, "stages/train_parser.py"], cwd=project, env=stage_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads((project / "reports/parser.json").read_text())
    assert set(metrics["val"]["iou"]) == {"background", "front", "back", "side", "top"}
    assert 0.0 <= metrics["val"]["miou"] <= 1.0 and metrics["train_images"] + metrics["val_images"] == 12
    weights = metrics["class_weights"]
    assert sum(weights.values()) == pytest.approx(5.0, rel=1e-5)  # every class present: weights average 1
    rows = list(csv.DictReader((project / "plots/parser/miou.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert max(float(r["val_miou"]) for r in rows) == pytest.approx(metrics["val"]["miou"], abs=1e-5)
    assert (project / "reports/parser_val_overlays.png").stat().st_size > 0

    raw = torch.load(project / "models/parser/parser.pt", weights_only=True)
    bias = raw["config"].pop("logit_bias")  # parser.prior_correction (default on): -log of the CE weights
    assert raw["config"] == {"encoder": TINY_ENCODER, "image_size": 32, "classes": 5}
    assert bias == pytest.approx([-math.log(weights[n]) for n in ("background", "front", "back", "side", "top")],
                                 rel=1e-4)
    assert raw["meta"]["epoch"] == metrics["best_epoch"]
    load_checkpoint(project / "models/parser/parser.pt")

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("pven").experiment_id])[0]
    assert run.info.run_name == "train_parser" and run.data.params["parser.image_size"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [1, 2]
    assert {"parser.json", "parser_val_overlays.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
