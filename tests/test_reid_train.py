"""The ReID training loop for real: one process in-process, 2 gloo processes under torchrun
(DDP and DeepSpeed ZeRO 0/1), kill-and-resume, NaN handling, the stage script.

Tiny sizes: 8 training identities of 5 images at 32 px, P x K = 4 x 2, 2 epochs of 5 steps.
DeepSpeed JIT-compiles one CPU op on first use (30-50 s once), cached in
TORCH_EXTENSIONS_DIR (set by conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.dist.env import DistInfo
from pipeline.reid.model import load_model
from pipeline.reid.train import NonFiniteLossError, train
from tests.conftest import ROOT, TINY, free_port, stage_env, write_project
from tests.test_reid_data import make_masked_shards

REID_TINY = ["reid.image_size=[32, 32]", "reid.P=4", "reid.K=2", "reid.epochs=2", "reid.batches_per_epoch=5",
             "reid.checkpoint_every=3", "reid.num_workers=1", "reid.pad=2", "reid.precision=fp32",
             "reid.channels_last=false", "reid.val_every=0", "reid.shuffle_buffer=16", "reid.pk_buffer=64"]
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on 1 thread, like the torchrun workers (OMP_NUM_THREADS=1): on a
    shared 2-core machine, 2 OpenMP threads next to a loader worker are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_masked_shards(tmp_path_factory.mktemp("reid_train"), n_train_ids=8, n_test_ids=4, per_id=5)


def torchrun(shards: Path, work: Path, *args: str, nproc: int = 2, restarts: int = 0, timeout: int = 240,
             **extra_env: str) -> dict:
    """Run tests/workers/reid_train.py under torchrun; return the result JSON rank 0 wrote."""
    result = work / "result.json"
    # c10d rendezvous: unlike the static one, it hands restarted workers a fresh group.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--max-restarts", str(restarts), "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", work.name,
           "tests/workers/reid_train.py", str(shards), str(work), str(result), *REID_TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra_env}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(result.read_text()) | {"log": done.stdout + done.stderr}


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory):
    # Validates after the last epoch (after every loss the other tests compare).
    return torchrun(shards, tmp_path_factory.mktemp("ddp"), "reid.val_every=2")


def losses(run: dict) -> list[float]:
    return [s["loss"] for s in run["steps"]]


@pytest.mark.distributed
def test_ddp_two_ranks_hold_identical_weights(ddp_run):
    assert len(ddp_run["steps"]) == 10
    assert ddp_run["ranks"][0]["params"] == ddp_run["ranks"][1]["params"]
    # Rank 0 ranks the gathered query/gallery features; every rank returns its numbers.
    val = [r["val"] for r in ddp_run["ranks"]]
    assert val[0] == val[1] and 0.0 <= val[0]["val_mAP"] <= 1.0, val
    assert all(torch.isfinite(torch.tensor(losses(ddp_run))))


@pytest.mark.distributed
def test_two_torchrun_nodes_on_loopback_equal_a_two_process_single_node_run(shards, tmp_path, ddp_run):
    # Two "nodes" (--nnodes 2 --nproc_per_node 1), c10d rendezvous on 127.0.0.1, started the way
    # cluster/slurm/node.sh starts them: the host named explicitly (is_host, pytorch#73656), each
    # node's address given (--local_addr), bounded join/read timeouts.
    port, result = free_port(), tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
         "--rdzv_conf", f"join_timeout=120,read_timeout=120,is_host={int(i == 0)}", "--local_addr", "127.0.0.1",
         "tests/workers/reid_train.py", str(shards), str(tmp_path / "work"), str(result), *REID_TINY,
         "reid.val_every=2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    two = json.loads(result.read_text())
    assert two["ranks"][0]["params"] == two["ranks"][1]["params"], "both nodes hold the same weights"
    assert [r["params"] for r in two["ranks"]] == [r["params"] for r in ddp_run["ranks"]], \
        "bitwise the weights of the 2-process single-node run"
    assert losses(two) == losses(ddp_run)


# torchrun shares its rendezvous TCPStore with the workers, and restarted workers can read the
# dead attempt's keys (pytorch#135712): the documented opt-out avoids it for --max-restarts.


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_deepspeed_matches_ddp_step_by_step(shards, tmp_path, ddp_run, zero):
    # ZeRO-1 is also killed after its step-3 checkpoint and resumed: DeepSpeed's own
    # checkpoint files go through the same atomic "latest" protocol.
    kill = ["--kill-at", "3"] if zero == 1 else []
    ds = torchrun(shards, tmp_path / f"zero{zero}", "reid.backend=deepspeed",
                  f"reid.deepspeed_config=cluster/deepspeed/zero{zero}.json", *kill,
                  restarts=1 if kill else 0)
    assert ds["resumed_from"] == (3 if kill else None)
    assert ds["ranks"][0]["params"] == ds["ranks"][1]["params"]
    # Same data, same fp32 Adam, gradients averaged over 2 ranks either way. On CPU they
    # agree bitwise; the tolerance allows for reduction-order differences elsewhere.
    assert losses(ds) == pytest.approx(losses(ddp_run), rel=1e-4, abs=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_mid_epoch_resumes_to_the_same_weights(shards, tmp_path, ddp_run):
    # Rank 0 SIGKILLs itself right after the step-3 checkpoint (epoch 1 of 5 steps: mid-epoch);
    # torchrun restarts both ranks, which resume from it.
    resumed = torchrun(shards, tmp_path / "killed", "--kill-at", "3", restarts=1)
    assert resumed["resumed_from"] == 3
    assert "resuming from" in resumed["log"] and "step-00000003" in resumed["log"]
    assert [r["params"] for r in resumed["ranks"]] == [r["params"] for r in ddp_run["ranks"]], \
        "bitwise the same weights as the uninterrupted run"
    assert losses(resumed) == losses(ddp_run)


def test_in_process_training_validates_checkpoints_and_resumes_finished_run(shards, tmp_path):
    params = load_params(ROOT / "params.yaml", [*REID_TINY, "reid.val_every=1"])
    seen = []
    first = train(params, ONE, data_dir=shards, out_dir=tmp_path / "model", checkpoint_dir=tmp_path / "ckpt",
                  on_epoch=seen.append, show_progress=False)
    assert [h["epoch"] for h in seen] == [1, 2] and all(0 < h["val_mAP"] <= 1 for h in seen)
    assert first.resumed_from is None and first.global_step == 10
    (config_dir,) = (tmp_path / "ckpt").iterdir()   # one folder per configuration fingerprint
    assert json.loads((config_dir / "latest.json").read_text())["step"] == 10
    assert sorted(p.name for p in config_dir.glob("step-*")) == ["step-00000009", "step-00000010"]
    model, meta = load_model(first.model_path)
    assert meta["class_vids"] == list(range(8)) and model.classifier.out_features == 8
    # A finished run restarted (e.g. `dvc repro --force`): nothing to train, same model again.
    again = train(params, ONE, data_dir=shards, out_dir=tmp_path / "model2", checkpoint_dir=tmp_path / "ckpt",
                  show_progress=False)
    assert again.resumed_from == 10 and len(again.steps) == 10
    assert torch.equal(load_model(again.model_path)[0].neck.weight, model.neck.weight)
    # Fault table, "a run with other params on the same checkpoint folder": not resumed, and the
    # other configuration's checkpoints are kept beside the new run's (pruned only on request).
    changed = load_params(ROOT / "params.yaml", [*REID_TINY, "reid.batches_per_epoch=3", "reid.loss.w_ltri=0.5"])
    fresh = train(changed, ONE, data_dir=shards, out_dir=tmp_path / "model3", checkpoint_dir=tmp_path / "ckpt",
                  show_progress=False)
    assert fresh.resumed_from is None and fresh.global_step == 6
    kept = {p.name: sorted(q.name for q in p.glob("step-*")) for p in (tmp_path / "ckpt").iterdir()}
    assert kept == {config_dir.name: ["step-00000009", "step-00000010"],
                    next(k for k in kept if k != config_dir.name): ["step-00000003", "step-00000006"]}
    # The first configuration still resumes (nothing to redo) after the other one ran.
    assert train(params, ONE, data_dir=shards, out_dir=tmp_path / "model4", checkpoint_dir=tmp_path / "ckpt",
                 show_progress=False).resumed_from == 10
    from pipeline.dist.checkpoint import configurations, prune
    assert {r["fingerprint"]: r["steps"] for r in configurations(tmp_path / "ckpt")}[config_dir.name] == [9, 10]
    assert prune(tmp_path / "ckpt", keep=(config_dir.name,)) != [] and \
        [p.name for p in (tmp_path / "ckpt").iterdir()] == [config_dir.name]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    # lr 1e30: step 1 is finite (and checkpointed), its update makes step 2's loss NaN.
    params = load_params(ROOT / "params.yaml", [*REID_TINY, "reid.lr=1.0e+30", "reid.checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 1, step 2.*Last good checkpoint: "
                                                 r".*step-00000001"):
        train(params, ONE, data_dir=shards, out_dir=tmp_path / "model", checkpoint_dir=tmp_path / "ckpt",
              show_progress=False)
    (config_dir,) = (tmp_path / "ckpt").iterdir()
    assert json.loads((config_dir / "latest.json").read_text())["step"] == 1
    assert [p.name for p in config_dir.glob("step-*")] == ["step-00000001"]
    state = torch.load(config_dir / "step-00000001/engine/ddp.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model").exists(), "no final model from a failed run"


def test_too_few_identities_for_P_is_a_clear_error(shards, tmp_path):
    params = load_params(ROOT / "params.yaml", [*REID_TINY, "reid.P=9"])
    with pytest.raises(ValueError, match=r"reid.P=9 .* only 8 training identities"):
        train(params, ONE, data_dir=shards, out_dir=tmp_path / "m", checkpoint_dir=tmp_path / "c")


@pytest.mark.slow
def test_stage_runs_under_torchrun_and_writes_its_outputs(shards, tmp_path):
    import shutil
    project = write_project(tmp_path / "project", [*TINY, *REID_TINY, "reid.val_every=2"])
    shutil.copytree(shards, project / "data/masked")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "1", "stages/train_reid.py"]  # dvc.yaml's cmd
    env = stage_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((project / "reports/train.json").read_text())
    assert metrics["steps"] == 10 and metrics["world_size"] == 1 and 0 < metrics["val_mAP"] <= 1
    rows = (project / "plots/train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,id,gtri,ltri,center,lr" and len(rows) == 11
    payload = torch.load(project / "models/reid/model.pt", weights_only=True)
    assert payload["class_vids"] == list(range(8)) and payload["config"]["backbone"] == "resnet18"
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("pven").experiment_id])[0]
    assert run.info.run_name == "train_reid" and "val_mAP" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.pt", "model/model.json"}


@pytest.mark.distributed
@pytest.mark.slow
def test_official_variant_trains_on_two_ranks_and_resumes_its_centres(shards, tmp_path):
    # Local neck, nearest masks, v + 1, sqrt part distance and the centre loss, whose centres
    # (a buffer, stepped in closed form on the all-reduced batch) must agree across ranks and
    # come back from the checkpoint: the killed-and-resumed run ends where the straight one does.
    straight = torchrun(shards, tmp_path / "straight", "reid.variant=official")
    resumed = torchrun(shards, tmp_path / "resumed", "reid.variant=official", "--kill-at", "3", restarts=1)
    assert resumed["resumed_from"] == 3
    for run in (straight, resumed):
        assert run["ranks"][0]["params"] == run["ranks"][1]["params"]
        assert run["ranks"][0]["centers"] == run["ranks"][1]["centers"] is not None
        assert all(s["center"] > 0 for s in run["steps"])
    assert losses(resumed) == losses(straight)
    assert resumed["ranks"][0]["centers"] == straight["ranks"][0]["centers"]
    assert resumed["ranks"][0]["params"] == straight["ranks"][0]["params"]
