"""Shared fixtures: the real params.yaml, shrunk, and a place to run stages."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep tools quiet and local whatever the caller's environment.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

# The real params file, shrunk: the real code paths run on CPU in seconds.
TINY = [
    "synth.train_ids=6", "synth.test_ids=4", "synth.cameras=4",
    "synth.cameras_per_id=[2, 3]", "synth.images_per_camera=[1, 2]",
    "synth.image_size=64", "synth.workers=1",
    "shard.samples_per_shard=8", "shard.min_shards=2", "shard.workers=1", "data.val_ids=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_params():
    from pipeline.config import load_params
    return load_params(ROOT / "params.yaml", TINY)


def write_project(dst: Path, overrides=TINY) -> Path:
    """A runnable copy of the project (params shrunk) for stage, DVC and tracking tests.

    The library itself is imported from the installed package; the copy holds what a
    user's checkout holds around it: params.yaml, dvc.yaml, stages/ and the code
    files dvc.yaml lists as deps.
    """
    import shutil

    import yaml

    from pipeline.config import apply_overrides

    dst.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dst / name)
    for folder in ("stages", "pipeline", "cluster"):
        if (ROOT / folder).exists():
            shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def stage_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    env.update(extra)
    return env
