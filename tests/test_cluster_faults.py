"""The fault table of the cluster README section, one test per row that is not tested elsewhere.

Rows tested in other files: a rank killed under ``torchrun --max-restarts 1``
(tests/test_reid_train.py::test_killed_mid_epoch_resumes_to_the_same_weights), NaN loss
(::test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint), a run with
other params on the same checkpoint folder
(::test_in_process_training_validates_checkpoints_and_resumes_finished_run), the whole job
killed and requeued and the preemption signal (tests/test_slurm.py).

Each test prints what it injected, how long recovery took and what was lost (``-s``).
Training is the real loop in-process on one CPU thread, tiny sizes (tests/test_reid_train.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.dist.checkpoint import COMPLETE, CheckpointError, DamagedCheckpointWarning, _files
from pipeline.reid.train import train
from tests.conftest import ROOT, free_port, stage_env
from tests.test_reid_train import ONE, REID_TINY, one_thread, shards  # noqa: F401  (fixtures)
from tests.test_tracking import running_mlflow_server, stop_mlflow_server

PARAMS = load_params(ROOT / "params.yaml", REID_TINY)   # 2 epochs x 5 steps, checkpoints every 3 steps


class Interrupt(Exception):
    """Raised from on_checkpoint: the run dies right after a checkpoint (as a killed job would)."""


def run(data, tmp_path, name, kill_at=None, ckpt=None, **kw):
    def on_checkpoint(step, folder):
        if step == kill_at:
            raise Interrupt(step)
    return train(PARAMS, ONE, data_dir=data, out_dir=tmp_path / name, checkpoint_dir=ckpt or tmp_path / "ckpt",
                 on_checkpoint=on_checkpoint, show_progress=False, **kw)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):  # noqa: F811
    torch.set_num_threads(1)
    return run(shards, tmp_path_factory.mktemp("straight"), "model")


# ---------------------------------------------------------------- newest checkpoint damaged

@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(shards, tmp_path, straight,  # noqa: F811
                                                                             damage):
    with pytest.raises(Interrupt):
        run(shards, tmp_path, "m1", kill_at=6)      # checkpoints 5 (epoch end) and 6 kept
    (config,) = (tmp_path / "ckpt").iterdir()
    engine = config / "step-00000006/engine/ddp.pt"
    data = engine.read_bytes()
    engine.write_bytes(data[:len(data) // 2] if damage == "truncate" else
                       data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    t0 = time.monotonic()
    with pytest.warns(DamagedCheckpointWarning, match=r"step-00000006/engine/ddp.pt .*(truncated|corrupt).*"
                                                      r"moved to .*damaged-step-00000006.*previous one.*step-00000005"):
        resumed = run(shards, tmp_path, "m2")
    seconds = time.monotonic() - t0
    assert resumed.resumed_from == 5
    assert same_weights(resumed, straight), "bitwise the weights of the uninterrupted run"
    kept = sorted(p.name.split("-2")[0] for p in config.glob("damaged-*"))
    assert kept == ["damaged-step-00000006"], "the damaged checkpoint is kept for inspection, not deleted"
    print(f"\nfault damaged checkpoint ({damage}): fell back to step 5, 1 step redone, "
          f"resumed run {seconds:.1f} s (5 steps)")


# ---------------------------------------------------------------- checkpoint crafted to run code

class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PVEN_PWNED']}",))


def test_a_checkpoint_crafted_to_run_code_is_refused(shards, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(Interrupt):
        run(shards, tmp_path, "m1", kill_at=3)
    (config,) = (tmp_path / "ckpt").iterdir()
    folder = config / "step-00000003"
    # Our own train_state / RNG files hold tensors and plain types only: weights_only=True reads them.
    for name in ("train_state.pt", "rng-rank0.pt"):
        torch.load(folder / name, weights_only=True)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PVEN_PWNED", str(marker))
    torch.save({"epoch": 0, "batch": 3, "payload": RunsCode()}, folder / "train_state.pt")
    # The attacker rewrites the manifest too, so the checksums pass: weights_only is what stops it.
    record = json.loads((folder / COMPLETE).read_text())
    (folder / COMPLETE).write_text(json.dumps({**record, "files": _files(folder)}))
    with pytest.raises(CheckpointError, match=r"train_state.pt: refused to load.*weights_only=True"):
        run(shards, tmp_path, "m2")
    assert not marker.exists(), "the crafted pickle ran code"
    print("\nfault crafted checkpoint: refused before anything ran; nothing resumed (the run stops with the error)")


def test_every_torch_load_in_the_library_is_weights_only():
    calls = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"', "``")) and "``" not in line:
                calls.append((f"{path.relative_to(ROOT)}:{no}", "weights_only=True" in line))
    assert calls and all(ok for _, ok in calls), [c for c, ok in calls if not ok]


# ---------------------------------------------------------------- storage

def test_checkpoint_or_output_path_not_writable_fails_before_training(shards, tmp_path):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"reid.checkpoint_dir .*a-file/ckpt.* is not writable.*before training"):
        run(shards, tmp_path, "model", ckpt=blocker / "ckpt")
    with pytest.raises(OSError, match=r"reid.out_dir .*a-file/model.* is not writable"):
        train(PARAMS, ONE, data_dir=shards, out_dir=blocker / "model", checkpoint_dir=tmp_path / "ckpt",
              show_progress=False)
    assert not any((tmp_path / "ckpt").rglob("step-*")), "no training step ran"
    print(f"\nfault path not writable: refused in {time.monotonic() - t0:.1f} s, before step 1; nothing lost")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs mount rights, e.g. root in CI); unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}): needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_fails_before_training_and_a_failed_write_names_its_file(shards, tmp_path, small_disk):  # noqa: F811
    # Before training: the free space a checkpoint of this model needs (~3x its weights) is checked.
    with pytest.raises(OSError, match=r"reid.checkpoint_dir .*disk.*MB free, at least .* MB needed"):
        run(shards, tmp_path, "model", ckpt=small_disk / "ckpt")
    # At a write that fills the disk: the error names the file, the old file stays whole, no temp file is left.
    from pipeline import atomic
    from pipeline.dist.checkpoint import torch_save_atomic
    target = small_disk / "state.pt"
    torch_save_atomic({"w": torch.zeros(10)}, target)
    before = target.read_bytes()
    with pytest.raises(OSError, match=r"could not write .*state.pt .*No space left.*unchanged"):
        torch_save_atomic({"w": torch.zeros(1_000_000)}, target)   # 4 MB > 2 MB
    with pytest.raises(OSError, match=r"could not write .*big.bin .*No space left"):
        atomic.write_bytes(small_disk / "big.bin", b"0" * 3_000_000)
    assert target.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["state.pt"], "no half-written or temporary file"
    print("\nfault disk full: refused before step 1 (free-space check); a full write names the file, old file kept")


# ---------------------------------------------------------------- rendezvous

def node(tmp_path, nnodes: int, is_host: int, port: int, timeout: int):
    """cluster/slurm/node.sh outside Slurm (the SLURM_* variables it reads set by hand): one torchrun node."""
    env = stage_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                    SLURM_NODEID=str(1 - is_host), SLURM_JOB_NUM_NODES=str(nnodes), SLURM_JOB_ID="7",
                    SLURMD_NODENAME="nonode", PVEN_LOCAL_ADDR="127.0.0.1", PVEN_PROJECT=str(ROOT),
                    PVEN_NPROC_PER_NODE="1", PVEN_RDZV_HOST="127.0.0.1", PVEN_RDZV_PORT=str(port),
                    PVEN_RDZV_TIMEOUT=str(timeout), PVEN_MAX_RESTARTS="0", PVEN_LOG_DIR=str(tmp_path / "logs"))
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "cluster/slurm/node.sh"), "train_reid"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout + 60)
    return done, time.monotonic() - t0


@pytest.mark.distributed
def test_a_rendezvous_peer_that_never_comes_fails_within_the_timeout(tmp_path):
    done, seconds = node(tmp_path, nnodes=2, is_host=1, port=free_port(), timeout=8)
    assert done.returncode != 0 and "RendezvousTimeoutError" in done.stderr, done.stderr[-2000:]
    assert "pven: node 0 (127.0.0.1): torchrun exited 1" in done.stderr and "timeout 8s" in done.stderr
    assert seconds < 8 + 30, f"{seconds:.1f} s"
    print(f"\nfault rendezvous peer never comes: RendezvousTimeoutError after {seconds:.1f} s (timeout 8 s)")


@pytest.mark.distributed
def test_a_rendezvous_endpoint_nobody_serves_fails_within_the_timeout(tmp_path):
    done, seconds = node(tmp_path, nnodes=2, is_host=0, port=free_port(), timeout=8)
    assert done.returncode != 0 and "RendezvousConnectionError" in done.stderr, done.stderr[-2000:]
    assert "is_host=0" in done.stderr
    assert seconds < 8 + 30, f"{seconds:.1f} s"
    print(f"\nfault rendezvous endpoint nobody serves: RendezvousConnectionError after {seconds:.1f} s (timeout 8 s)")


# ---------------------------------------------------------------- MLflow unreachable

@pytest.mark.server
@pytest.mark.slow
def test_mlflow_unreachable_at_start_or_mid_run_training_goes_on_and_replays(shards, tmp_path, straight,  # noqa: F811
                                                                            monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import stage_run
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # what cluster/slurm/run_stage.sh bounds too
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("PVEN_MLFLOW_OFFLINE_DIR", str(tmp_path / "offline"))
    view = PARAMS.only(("seed", "masks.out_dir", "reid"), "train_reid")
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")

    # 1. Nobody serves the tracking URI when the stage starts.
    t0 = time.monotonic()
    with stage_run("train_reid", view) as tracked:
        offline = run(shards, tmp_path, "m1", ckpt=tmp_path / "ck1", run=tracked)
        tracked.log_artifact(offline.model_path, "model")
    start_s = time.monotonic() - t0
    assert same_weights(offline, straight)
    assert capfd.readouterr().err.count("WARNING: MLflow at") == 1, "reported once"
    (first,) = (tmp_path / "offline").iterdir()

    # 2. The server goes away mid-run (after the step-3 checkpoint, before the epoch-1 metrics).
    with running_mlflow_server(tmp_path, port) as (url, proc):
        def kill_server(step, folder):
            if step == 3:
                stop_mlflow_server(proc)
        with stage_run("train_reid", view) as tracked:
            lost = train(PARAMS, ONE, data_dir=shards, out_dir=tmp_path / "m2", checkpoint_dir=tmp_path / "ck2",
                         on_checkpoint=kill_server, run=tracked, show_progress=False)
            run_id = tracked.run_id
    assert same_weights(lost, straight)
    assert capfd.readouterr().err.count("WARNING: MLflow at") == 1, "reported once"
    second = next(p for p in (tmp_path / "offline").iterdir() if p != first)

    # 3. The server is back: the documented command logs both runs.
    with running_mlflow_server(tmp_path, port) as (url, _):
        done = subprocess.run([sys.executable, "-m", "pipeline.tracking", "replay", str(first), str(second)],
                              env=stage_env(MLFLOW_TRACKING_URI=url, PYTHONPATH=str(ROOT)), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("pven").experiment_id])
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        by_id = {r.info.run_id: r for r in runs}
        assert run_id in by_id, "the mid-run failure continues the run the stage had opened"
        for r in runs:
            assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [5, 10]
            assert r.data.params["reid.P"] == "4"
        replayed_first = next(r for r in runs if r.info.run_id != run_id)
        assert {a.path for a in client.list_artifacts(replayed_first.info.run_id, "model")} == {"model/model.pt"}
    print(f"\nfault MLflow unreachable: training went on (offline run {start_s:.1f} s incl. the failed start); "
          f"records replayed later; no metric lost")


# ---------------------------------------------------------------- stage arguments (cluster jobs)

def test_stage_arguments_are_a_params_file_and_dotted_overrides(tmp_path):
    from pipeline import cli
    assert cli.parse_stage_arguments([]) == (None, ())
    assert cli.parse_stage_arguments(["--params", "x.yaml", "reid.P=3", "seed=1"]) == ("x.yaml", ("reid.P=3", "seed=1"))
    assert cli.parse_stage_arguments(["--params=y.yaml"]) == ("y.yaml", ())
    with pytest.raises(cli.InputError, match=r"argument '--epochs': expected --params FILE or KEY.PATH=VALUE"):
        cli.parse_stage_arguments(["--epochs", "3"])
    # A stage script with a bad override ends with one clear line and status 2.
    shutil.copy(ROOT / "params.yaml", tmp_path / "p.yaml")
    done = subprocess.run([sys.executable, str(ROOT / "stages/train_reid.py"), "--params", str(tmp_path / "p.yaml"),
                           "reid.P=0"], cwd=tmp_path, env=stage_env(PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "p.yaml" in done.stderr and "reid.P" in done.stderr, done.stderr[-2000:]
