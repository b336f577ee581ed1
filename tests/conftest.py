"""Shared fixtures: the real params.yaml, shrunk, and a place to run stages."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
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


class LoopbackNetwork:
    """A network namespace that holds only ``lo`` (up), for servers that would otherwise bind
    the machine's outward interface: commands run in it through :meth:`wrap` (``nsenter``).

    Ray 2.60 resolves ``--node-ip-address 127.0.0.1`` on a worker node to the address it
    would use to reach the internet, and then binds every port on all interfaces. In here
    that lookup fails, Ray falls back to the hostname's address (loopback) and nothing can
    listen beyond the namespace's own ``lo``. A holder process (``sleep``) keeps the
    namespace alive; processes are still plain PIDs of this machine (same PID namespace), so
    tests stop them by PID. Root enters it directly; other users through a user namespace
    they own (``unshare --map-root-user``).
    """

    def __init__(self):
        self.root = os.geteuid() == 0
        user = [] if self.root else ["--map-root-user"]
        self.holder = subprocess.Popen(["unshare", "--net", *user, "--", "sh", "-c",
                                        "ip link set lo up && exec sleep infinity"])
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            try:
                theirs = os.readlink(f"/proc/{self.holder.pid}/ns/net")
                comm = Path(f"/proc/{self.holder.pid}/comm").read_text().strip()
            except OSError:
                theirs, comm = mine, ""
            if theirs != mine and comm == "sleep":
                self.ns = theirs   # e.g. "net:[4026532251]": what /proc/<pid>/ns/net of its processes reads
                return
            if self.holder.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"could not make a loopback-only network namespace (unshare --net {user}): "
                                   f"exit {self.holder.returncode}")
            time.sleep(0.05)

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        enter = ["nsenter", f"--target={self.holder.pid}", "--net"]
        if not self.root:
            enter += ["--user", "--preserve-credentials"]
        return [*enter, "--", *cmd]

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.send_signal(signal.SIGKILL)
        self.holder.wait()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are skipped, with the reason, where torch sees no CUDA device (torch is imported
    only when such a test was collected)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"gpu: needs a CUDA device; torch {torch.__version__} sees none "
                                   f"(torch.cuda.is_available() is False)")
    for item in gpu:
        item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (``CI=true``) a skipped ``slurm`` test fails: CI installs Slurm, so a skip means it broke."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("slurm") and os.environ.get("CI", "").lower() == "true":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"CI=true: the slurm test was skipped ({reason}); .ci/run must install slurm-wlm munge"


PAPER_DISTANCE = {"variant": "paper", "part_distance": "euclidean", "vis_offset": 0.0, "attention": "common_visible"}


def save_random_models(project: Path, seed: int = 0) -> None:
    """A random PVEN (64 px, 6 classes, paper variant) and a random parser (resnet18 Unet, 64 px,
    with a prior bias) where the stages look for them: stand-ins for trained ones."""
    import torch

    from pipeline.parsing.model import build_parser, save_checkpoint
    from pipeline.reid.model import PVEN, model_payload
    torch.manual_seed(seed)
    model = PVEN(6, backbone="resnet18")
    (project / "models/reid").mkdir(parents=True, exist_ok=True)
    torch.save(model_payload(model, model.state_dict(), list(range(1, 7)), PAPER_DISTANCE, (64, 64)),
               project / "models/reid/model.pt")
    config = {"encoder": "resnet18", "image_size": 64, "classes": 5, "logit_bias": [0.5, -0.1, 0.2, 0.0, -0.3]}
    save_checkpoint(project / "models/parser/parser.pt", build_parser("resnet18"), config)


@pytest.fixture(scope="session")
def exported_project(tmp_path_factory):
    """A tiny project through synth, shard, evaluate and export with random models (the synthetic
    shards carry a mask for every image, so they serve as the masked shards); MLflow in
    ``<project>/mlflow.db``."""
    import sys
    project = write_project(tmp_path_factory.mktemp("export") / "project",
                            overrides=[*TINY, "masks.out_dir=data/shards", "eval.grid_queries=0", "eval.bootstrap=0",
                                       "export.parity_images=6", "export.batch_size=5"])
    save_random_models(project)
    env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db")
    for stage in ("synth", "shard", "evaluate", "export"):
        done = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"{stage}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return project
