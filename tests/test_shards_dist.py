"""Shard readers under torchrun with 2 gloo processes: ranks stay in step, evaluation covers everything once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.shards import ShardOptions, write_shards
from tests.conftest import free_port
from tests.test_shards import make_records

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.distributed
def test_two_ranks_same_batch_count_and_disjoint_complete_eval(tmp_path):
    # Uneven on purpose: 3 train shards (7/7/6 samples) for 2 ranks; 3 gallery shards.
    splits = make_records(tmp_path / "raw", n_train=20, n_gallery=11)
    write_shards(splits, tmp_path / "s", ShardOptions(samples_per_shard=7, min_shards=3), seed=0)
    out = tmp_path / "seen.json"
    torchrun(2, "tests/workers/shard_reader.py", str(tmp_path / "s"), str(out))
    seen = json.loads(out.read_text())
    assert [r["batches"] for r in seen] == [10, 10]
    assert seen[0]["train"] != seen[1]["train"], "ranks must draw different samples"
    eval_keys = seen[0]["eval"] + seen[1]["eval"]
    assert sorted(eval_keys) == sorted(r.key for r in splits["gallery"])
    assert len(set(eval_keys)) == len(eval_keys)
