"""The masks stage script, 1 process vs torchrun with 2 gloo ranks: byte-identical output, corrupt image listed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.shards import ShardOptions, read_manifest, write_shards
from pipeline.parsing.model import build_parser, save_checkpoint
from tests.conftest import TINY, free_port, stage_env, write_project
from tests.test_masks import TINY_ENCODER, corrupt_sample
from tests.test_shards import make_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run(cmd: list[str], cwd: Path, timeout: int = 240) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def set_out_dir(project: Path, out_dir: str) -> None:
    import yaml
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["masks"]["out_dir"] = out_dir
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_two_ranks_write_the_same_bytes_as_one(tmp_path):
    project = write_project(tmp_path / "project", [*TINY, "masks.batch_size=2", "masks.num_workers=1"])
    # 3 query, 3 gallery, 5 train shards: an odd count, so the ranks get unequal work.
    write_shards(make_records(project / "raw", n_train=14, n_query=7, n_gallery=8, size=(40, 32)),
                 project / "data/shards", ShardOptions(samples_per_shard=3, min_shards=2), seed=0)
    bad = corrupt_sample(project / "data/shards/train-000001.tar", 0)
    torch.manual_seed(0)
    save_checkpoint(project / "models/parser/parser.pt", build_parser(TINY_ENCODER),
                    {"encoder": TINY_ENCODER, "image_size": 32, "classes": 5})

    out = run([sys.executable, "stages/masks.py"], project)
    assert f"skipped train train-000001.tar {bad}" in out
    one = read_manifest(project / "data/masked")
    metrics_one = json.loads((project / "reports/masks.json").read_text())

    set_out_dir(project, "data/masked2")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "stages/masks.py"], project)
    two = read_manifest(project / "data/masked2")
    metrics_two = json.loads((project / "reports/masks.json").read_text())

    assert one["splits"] == two["splits"]  # names, counts and sha256 of every shard
    assert one["skipped"] == two["skipped"] and [s["key"] for s in one["skipped"]] == [bad]
    for name in (s["name"] for info in one["splits"].values() for s in info["shards"]):
        assert (project / "data/masked" / name).read_bytes() == (project / "data/masked2" / name).read_bytes()
    timing = {"seconds", "images_per_s", "ranks"}
    assert metrics_two["ranks"] == 2
    assert {k: v for k, v in metrics_one.items() if k not in timing} == \
           {k: v for k, v in metrics_two.items() if k not in timing}
    assert (project / "reports/masks_overlays.png").stat().st_size > 0
