"""The stages' ``main()`` called in-process, in order, on the real params shrunk.

This is how a test (or a notebook) runs a stage without a subprocess: ``main(params,
root)``. It also pins what dvc.yaml relies on: each stage reads exactly the params it
declares in ``PARAMS`` (reading an undeclared key raises, and every declared key is
read), so `dvc repro` reruns a stage exactly when something it reads has changed; and a
rerun on the same inputs rewrites every DVC output byte for byte, so nothing downstream
reruns for nothing.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.tracking import without_timings
from tests.conftest import TINY, write_project
from tests.test_masks import TINY_ENCODER
from tests.test_reid_train import REID_TINY

pytestmark = pytest.mark.slow

STAGES = ("check_params", "synth", "shard", "train_parser", "masks", "train_reid", "evaluate", "export")
SHRUNK = [*TINY, f"parser.encoder={TINY_ENCODER}", "parser.image_size=32", "parser.epochs=1", "parser.batch_size=4",
          "parser.num_workers=0", "parser.val_fraction=0.3", "masks.num_workers=0", *REID_TINY,
          "reid.val_every=1", "reid.num_workers=0", "eval.num_workers=0", "eval.grid_queries=2",
          "synth.train_ids=9", "data.val_ids=3"]   # 6 training identities, 3 held out for validation


@pytest.fixture
def project(tmp_path, monkeypatch):
    project = write_project(tmp_path / "project", SHRUNK)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(project))  # MLflow artifacts go under the project, not the checkout
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return project


def run_all(project) -> dict:
    params = load_params(project / "params.yaml")
    returned = {}
    for name in STAGES:
        stage = importlib.import_module(f"stages.{name}")
        view = params.only(stage.PARAMS, name)
        returned[name] = stage.main(view, root=project)
        assert view.reads == set(stage.PARAMS), f"{name} declares {sorted(stage.PARAMS)}, reads {sorted(view.reads)}"
    return returned


def output_hashes(project) -> dict[str, str]:
    """sha256 of every file of every `outs` and `plots` entry of dvc.yaml (metrics excluded: timings)."""
    params = load_params(project / "params.yaml")
    hashes = {}
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("plots", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            path = re.sub(r"\$\{([^}]+)\}", lambda m: str(params.select([m.group(1)])[m.group(1)]), path)
            target = project / path
            files = sorted(f for f in target.rglob("*") if f.is_file()) if target.is_dir() else [target]
            assert files and all(f.is_file() for f in files), f"dvc.yaml output {path} was not written"
            for f in files:
                hashes[f.relative_to(project).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def test_every_stage_runs_in_process_and_reads_exactly_its_params(project):
    returned = run_all(project)
    files = {"synth": "synth", "shard": "shard", "train_parser": "parser", "masks": "masks", "train_reid": "train",
             "evaluate": "eval", "export": "export"}
    for name, file in files.items():
        report = json.loads((project / f"reports/{file}.json").read_text())
        assert report == json.loads(json.dumps(without_timings(returned[name])))
        headline = json.loads((project / f"metrics/{file}.json").read_text())  # what dvc exp show tabulates
        assert 2 <= len(headline) <= 8 and all(isinstance(v, (int, float)) for v in headline.values()), headline
    assert returned["train_reid"]["epochs"] == 2 and "val_mAP" in returned["train_reid"]
    assert {"global", "local", "pven"} <= set(returned["evaluate"])
    export = returned["export"]
    assert export["rankings"]["max_abs_mAP_diff"] <= 1e-6 and export["parity"]["reid"]["max"] < 1e-4
    # Validation identities: held out of training, ranked in the loop and for the choice of λ.
    shards = returned["shard"]
    assert shards["train"]["identities"] == 6 and shards["val_gallery"]["identities"] == 3
    assert returned["train_reid"]["validated_on"] == "val_query/val_gallery"
    lam = returned["evaluate"]["lam"]
    assert lam["rule"] == "validation" and lam["chosen"] == max(lam["scan"], key=lambda r: (r["mAP"], -r["lam"]))["lam"]
    assert (project / "plots/lam_scan.csv").read_text().count("\n") == len(lam["scan"]) + 1
    assert (project / "reports/ranked_worst.png").stat().st_size > 0

    # The same inputs again (training from scratch, not resumed): every output identical.
    first = output_hashes(project)
    shutil.rmtree(project / load_params(project / "params.yaml").reid.checkpoint_dir)
    run_all(project)
    second = output_hashes(project)
    assert [f for f in first if first[f] != second.get(f)] == [] and first.keys() == second.keys()


def test_a_stage_that_reads_an_undeclared_key_fails_naming_it(project):
    view = load_params(project / "params.yaml").only(("seed", "synth"), "synth")
    with pytest.raises(ConfigError, match=r"synth reads params 'reid'.*add it to the stage's PARAMS and dvc.yaml"):
        _ = view.reid
    view = load_params(project / "params.yaml").only(("seed", "masks.out_dir"), "train_reid")
    assert view.masks.out_dir == "data/masked" and view.reads == {"masks.out_dir"}
    with pytest.raises(ConfigError, match=r"train_reid reads params 'masks.batch_size'"):
        _ = view.masks.batch_size
    with pytest.raises(ConfigError, match=r"reid.nope: not a params key"):
        load_params(project / "params.yaml").only(("reid.nope",))
