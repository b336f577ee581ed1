"""The export stage for real: ONNX graphs of the PVEN and the parser, onnxruntime parity against
torch eager, rankings of the exported model equal to the evaluate stage's, MLflow logged models
loaded back through their URIs.

Randomly initialised networks stand in for trained ones (what is checked is that the graphs
compute what the models compute, whatever their weights); the synthetic shards carry a mask
for every image, so they serve as the masked shards.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.export.graphs import ReidGraph, export_onnx, max_relative_difference
from pipeline.export.runtime import OnnxReid
from pipeline.reid.model import PVEN
from tests.conftest import TINY, stage_env, write_project


@pytest.fixture(scope="module")
def exported(exported_project):
    return exported_project


def run(cmd, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=stage_env(**env), capture_output=True, text=True, timeout=900)

@pytest.mark.slow
def test_the_graphs_compute_what_the_torch_models_compute(exported):
    report = json.loads((exported / "reports/export.json").read_text())
    parity = report["parity"]
    assert parity["images"] == 6 and parity["split"] == "query"
    assert parity["reid"]["max"] <= 1e-4 and parity["parser"]["logits"] <= 1e-4, parity
    assert parity["parser"]["label_agreement"] > 0.999
    metrics = json.loads((exported / "metrics/export.json").read_text())
    assert metrics["reid_max_rel_diff"] == parity["reid"]["max"]
    record = json.loads((exported / "models/export/preprocessing.json").read_text())
    assert record["reid"]["image_size"] == [64, 64] and record["parser"]["image_size"] == 64
    assert record["reid"]["variant"] == "paper" and record["parser"]["logit_bias_in_graph"] is True
    assert record["reid"]["lam"] == json.loads((exported / "reports/eval.json").read_text())["lam"]["chosen"]


@pytest.mark.slow
def test_the_exported_model_ranks_as_the_evaluate_stage_does(exported):
    rankings = json.loads((exported / "reports/export.json").read_text())["rankings"]
    evaluated = json.loads((exported / "reports/eval.json").read_text())
    for mode in ("global", "local", "pven"):
        assert rankings[mode]["mAP_torch"] == evaluated[mode]["mAP"]
        assert abs(rankings[mode]["mAP_onnx"] - evaluated[mode]["mAP"]) <= 1e-6, (mode, rankings[mode])
    assert rankings["max_abs_mAP_diff"] <= 1e-6


@pytest.mark.slow
@pytest.mark.server
def test_both_graphs_are_mlflow_logged_models_that_load_from_their_uri(exported):
    import mlflow

    report = json.loads((exported / "reports/export.json").read_text())
    assert report["logged_models"] == ["parser", "pven"]
    mlflow.set_tracking_uri(f"sqlite:///{exported}/mlflow.db")
    client = mlflow.MlflowClient()
    [run] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
             if r.data.tags.get("stage") == "export"]
    assert run.info.status == "FINISHED"
    uris = {name: run.data.tags[f"model_uri.{name}"] for name in ("pven", "parser")}
    for name, uri in uris.items():
        assert uri.startswith("models:/m-")
        logged = mlflow.get_logged_model(uri.removeprefix("models:/"))
        assert logged.name == name and logged.source_run_id == run.info.run_id
    pyfunc = mlflow.pyfunc.load_model(uris["pven"])
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    masks = np.random.default_rng(1).integers(0, 5, (3, 64, 64), dtype=np.uint8)
    out = pyfunc.predict({"images": images, "masks": masks})
    direct = OnnxReid(exported / "models/export/pven.onnx")(torch.from_numpy(images), torch.from_numpy(masks))
    np.testing.assert_array_equal(out["global"], direct["neck"].numpy())
    assert out["local"].shape == (3, 4, 512) and out["visibility"].shape == (3, 4)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_parity_holds_for_both_variants_at_any_batch_size(variant, tmp_path):
    # official: nearest mask pooling, visibility offset 1 and the local BN neck (the authors' model)
    torch.manual_seed(3)
    options = {"mask_pool": "nearest", "vis_offset": 1.0, "local_neck": True} if variant == "official" else {}
    model = PVEN(5, backbone="resnet18", **options).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):   # non-trivial neck statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    example = (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.zeros(2, 64, 64, dtype=torch.uint8))
    path = export_onnx(ReidGraph(model), example, tmp_path / "pven.onnx", ["images", "masks"],
                       ["global", "local", "visibility"])
    runtime = OnnxReid(path)
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        images = torch.from_numpy(rng.integers(0, 256, (batch, 3, 64, 64), dtype=np.uint8))
        masks = torch.from_numpy(rng.integers(0, 5, (batch, 64, 64), dtype=np.uint8))
        masks[0][masks[0] == 2] = 0          # image 0 without a back view
        with torch.no_grad():
            want = ReidGraph(model)(images, masks)
        got = runtime(images, masks)
        for name, w in zip(("neck", "local", "visibility"), want):
            assert got[name].shape == w.shape
            assert max_relative_difference(got[name].numpy(), w.numpy()) <= 1e-4, (variant, batch, name)
        assert float(got["visibility"][0, 1]) == 0.0


def test_max_relative_difference_is_relative_to_the_largest_magnitude():
    want = np.array([[0.0, 2.0], [-4.0, 1.0]])
    assert max_relative_difference(want + np.array([[1e-3, 0], [0, 0]]), want) == pytest.approx(1e-3 / 4)
    assert max_relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        max_relative_difference(np.zeros(3), np.zeros(4))


def test_a_missing_model_is_a_clear_error(tmp_path):
    project = write_project(tmp_path / "project", overrides=TINY)
    done = run([sys.executable, "stages/export.py"], project)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "models/reid/model.pt" in done.stderr and "Traceback" not in done.stderr
