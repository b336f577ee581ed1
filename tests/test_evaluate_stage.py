"""The evaluate stage for real: embeddings from masked shards (1 and 2 ranks), metrics, CMC, pictures.

A randomly initialised PVEN stands in for a trained one (the stage's job is to score
whatever model it is given); the synthetic set's shards carry a mask for every
query/gallery image, so they serve as the masked shards here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, free_port, stage_env, write_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = write_project(tmp_path_factory.mktemp("eval") / "project",
                            overrides=[*TINY, "masks.out_dir=data/shards", "eval.grid_queries=3"])
    for stage in ("synth", "shard"):
        run([sys.executable, f"stages/{stage}.py"], project)
    from pipeline.reid.model import PVEN, model_payload
    torch.manual_seed(0)
    model = PVEN(6, backbone="resnet18")
    (project / "models/reid").mkdir(parents=True)
    distance = {"variant": "paper", "part_distance": "euclidean", "vis_offset": 0.0, "attention": "common_visible"}
    torch.save(model_payload(model, model.state_dict(), list(range(1, 7)), distance, (64, 64)),
               project / "models/reid/model.pt")
    return project


def run(cmd, cwd: Path, **env) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=stage_env(**env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_evaluate_writes_metrics_cmc_embeddings_and_pictures(project):
    run([sys.executable, "stages/evaluate.py"], project)
    metrics = json.loads((project / "reports/eval.json").read_text())
    assert set(metrics) >= {"global", "local", "pven", "protocol", "variant"}
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    n_query = manifest["splits"]["query"]["samples"]
    n_gallery = manifest["splits"]["gallery"]["samples"]
    for mode in ("global", "local", "pven"):
        m = metrics[mode]
        assert 0.0 < m["mAP"] <= 1.0 and m["num_queries"] + m["num_skipped"] == n_query
        assert m["rank1"] <= m["rank5"] <= m["rank10"]
    cmc = (project / "plots/cmc.csv").read_text().splitlines()
    assert cmc[0] == "rank,global,local,pven" and len(cmc) > 1
    q = {name: np.load(project / "embeddings/query" / f"{name}.npy")
         for name in ("global", "local", "visibility", "ids")}
    assert q["global"].shape == (n_query, 512) and q["local"].shape == (n_query, 4, 512)
    assert q["visibility"].shape == (n_query, 4) and (q["visibility"] >= 0).all()
    assert np.load(project / "embeddings/gallery/ids.npy").shape == (n_gallery,)
    keys = (project / "embeddings/query/keys.txt").read_text().split()
    assert len(keys) == n_query
    for name in ("first", "worst"):
        from PIL import Image
        assert Image.open(project / f"reports/ranked_{name}.png").size[0] > 500


def test_evaluate_writes_intervals_crossview_and_per_query_rows(project):
    import csv

    from PIL import Image

    from pipeline.data.shards import iter_samples, shard_urls
    run([sys.executable, "stages/evaluate.py"], project)
    report = json.loads((project / "reports/eval.json").read_text())
    for mode in ("global", "local", "pven"):
        for name in ("mAP", "rank1"):
            assert report[mode][f"{name}_lo"] <= report[mode][name] <= report[mode][f"{name}_hi"], (mode, name)
    for pair in ("pven_minus_global", "pven_minus_local"):
        d = report["differences"][pair]
        assert d["mAP_lo"] <= d["mAP"] <= d["mAP_hi"]
    assert report["bootstrap"]["resamples"] == 1000 and report["bootstrap"]["unit"] == "query identity"
    headline = json.loads((project / "metrics/eval.json").read_text())
    assert set(headline) == {"mAP", "mAP_lo", "mAP_hi", "rank1", "mINP", "mAP_global", "mAP_local", "lam"}
    assert headline["mAP_lo"] == report["pven"]["mAP_lo"]
    intervals = json.loads((project / "metrics/eval_intervals.json").read_text())
    assert intervals["mAP_pven_minus_global"] == report["differences"]["pven_minus_global"]["mAP"]
    assert {"rank1_lo", "rank1_hi", "mAP_global_lo", "mAP_local_hi", "mAP_pven_minus_global_lo",
            "rank1_pven_minus_global_hi"} <= set(intervals)
    assert all(isinstance(v, float) for v in intervals.values())

    # views: from every sample's json into embeddings/<split>/views.npy
    keys = (project / "embeddings/query/keys.txt").read_text().split()
    views = np.load(project / "embeddings/query/views.npy")
    truth = {s["__key__"]: json.loads(s["json"])["view"]["azimuth_deg"]
             for url in shard_urls(project / "data/shards", "query") for s in iter_samples(url, ("json",))}
    np.testing.assert_array_equal(views, [truth[k] for k in keys])
    assert np.all((views > -180) & (views <= 180))

    # the synthetic set knows its views: the cross-view table, CSV and chart
    assert set(report["crossview"]) == {"0-45", "45-90", "90-135", "135-180", "front_back"}
    for entry in report["crossview"].values():
        assert set(entry) == {"num_queries", "global", "local", "pven", "pven_minus_global"}
    with open(project / "plots/crossview.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["bin"] for r in rows] == ["0-45", "45-90", "90-135", "135-180"]
    assert [int(r["num_queries"]) for r in rows] == [report["crossview"][r["bin"]]["num_queries"] for r in rows]
    assert Image.open(project / "reports/crossview.png").size == (640, 400)

    # one row per query: key, vid, camera, azimuth, per mode AP and first rank
    with open(project / "reports/eval_queries.csv") as f:
        queries = list(csv.DictReader(f))
    assert list(queries[0]) == ["repeat", "key", "vid", "camera", "azimuth", "global_ap", "global_first_rank",
                                "local_ap", "local_first_rank", "pven_ap", "pven_first_rank"]
    assert [r["key"] for r in queries] == keys
    aps = [float(r["pven_ap"]) for r in queries if r["pven_ap"]]
    assert len(aps) == report["pven"]["num_queries"] and np.mean(aps) == report["pven"]["mAP"]

    # the same inputs again: every new output identical, byte for byte
    outputs = ("metrics/eval_intervals.json", "reports/eval.json", "reports/eval_queries.csv", "plots/crossview.csv",
               "reports/crossview.png")
    before = {path: (project / path).read_bytes() for path in outputs}
    run([sys.executable, "stages/evaluate.py"], project)
    assert [p for p in outputs if (project / p).read_bytes() != before[p]] == []


@pytest.mark.distributed
def test_two_ranks_embed_the_same_arrays_in_the_same_order(project):
    run([sys.executable, "stages/evaluate.py"], project)
    single = {n: np.load(project / "embeddings/gallery" / f"{n}.npy") for n in ("global", "local", "ids", "cams")}
    single_keys = (project / "embeddings/gallery/keys.txt").read_text()
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "stages/evaluate.py"], project)
    for name, array in single.items():
        np.testing.assert_allclose(np.load(project / "embeddings/gallery" / f"{name}.npy"), array, rtol=0, atol=1e-5)
    assert (project / "embeddings/gallery/keys.txt").read_text() == single_keys
    assert not list((project / "embeddings").glob(".*")), "no staging folders left"


def test_missing_model_is_a_clear_error(tmp_path):
    other = write_project(tmp_path / "other", overrides=["reid.out_dir=models/none"])
    done = subprocess.run([sys.executable, "stages/evaluate.py"], cwd=other, capture_output=True, text=True,
                          env=stage_env(), timeout=300)
    assert done.returncode != 0
    assert "models/none/model.pt: no ReID model file (run the train_reid stage first)" in done.stderr


def test_rerank_switch_rescores_and_still_draws(project):
    params = project / "params.yaml"
    plain = params.read_text()
    run([sys.executable, "stages/evaluate.py"], project)
    before = json.loads((project / "reports/eval.json").read_text())
    try:
        params.write_text(plain.replace("  rerank: false", "  rerank: true", 1))
        run([sys.executable, "stages/evaluate.py"], project)
    finally:
        params.write_text(plain)
    after = json.loads((project / "reports/eval.json").read_text())
    assert after["pven"]["num_queries"] == before["pven"]["num_queries"]
    assert after["pven"]["mAP"] != before["pven"]["mAP"], "k-reciprocal re-ranking changes the ranking"
    # The pictures show the PVEN distance's own ranking (picked and titled by its APs).
    from PIL import Image
    assert Image.open(project / "reports/ranked_worst.png").size[0] > 500
