"""The shard stage on a dataset with faults: every fault reported in one message, or skipped and listed."""
from __future__ import annotations

import json
import subprocess
import sys

from pipeline.config import load_params
from tests.conftest import TINY, stage_env, write_project
from tests.fixtures_datasets import empty_file, make_veri776


def test_faults_come_out_in_one_report_or_are_skipped_and_listed(tmp_path):
    tree = make_veri776(tmp_path / "VeRi", train_ids=(1, 2, 3, 4), test_ids=(5, 6, 7), per_camera=2,
                        image_size=(48, 40))
    missing = [tree.records["train"][0], tree.records["gallery"][1]]
    for rec in missing:
        rec.image.unlink()
    empty = tree.records["train"][2]
    empty_file(empty.image)
    project = write_project(tmp_path / "project", [*TINY, "data.source=veri776", f"data.root={tree.root}"])

    done = subprocess.run([sys.executable, "stages/shard.py"], cwd=project, env=stage_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("error: ") == 1
    report = done.stderr[done.stderr.index("error: "):]  # (MLflow's own INFO lines may come first)
    first = report.splitlines()[0]
    assert "3 problems" in first and "2 missing_image" in first and "1 empty_image" in first
    for rec in (*missing, empty):
        assert rec.image.name in report
    assert not (project / "data/shards").exists(), "nothing is written when the dataset is refused"

    from stages import shard
    shard.main(load_params(project / "params.yaml", ["shard.bad_entries=skip"]), root=project)
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    listed = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(listed) == {rec.key for rec in (*missing, empty)}
    assert listed[empty.key].startswith("empty_image: ") and listed[missing[0].key].startswith("missing_image: ")
    assert manifest["splits"]["train"]["samples"] == len(tree.records["train"]) - 2
