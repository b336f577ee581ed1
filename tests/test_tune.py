"""The Ray Tune sweep for real: a two-node Ray cluster on loopback, multi-worker trials (gloo),
ASHA, nested MLflow runs, a killed driver and a killed worker that resume, bad input refused
before anything starts, and the cluster launcher YAMLs checked by Ray's own validator.

The cluster is started the way a user starts one (``ray start --head`` + ``ray start
--address``, one CPU each, on 127.0.0.1), inside a network namespace that has only ``lo``
(:class:`tests.conftest.LoopbackNetwork`: on a worker node Ray 2.60 turns 127.0.0.1 into the
machine's outward address and binds all interfaces), with token authentication (the token in a temporary
file, ``RAY_AUTH_TOKEN_PATH``), usage stats off and ``RAY_TMPDIR`` in a short temporary
folder. Every process of it carries ``PVEN_RAY_CLUSTER=<id>`` in its environment: that is
how the tests find a Train worker to kill and, at the end, stop the cluster by PID (never
``ray stop``, which would stop every Ray on the machine) and check that nothing is left.

The sweep runs through the stage script copied to a fake home folder as ``~/tune.py`` with the
project at ``~/pven``: what ``ray submit cluster/tune.yaml stages/tune.py`` does on a head node.
Data: 8 training identities of 5 images at 32 px (tests/test_reid_data.py), P x K = 4 x 2,
2-3 epochs of 2 steps, validated every epoch.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.constants import TRIAL_METRICS
from tests.conftest import ROOT, TINY, LoopbackNetwork, free_port, stage_env, write_project
from tests.test_reid_data import make_masked_shards
from tests.test_reid_train import REID_TINY

VENV_BIN = Path(sys.executable).parent
SWEEP_TINY = [*TINY, *REID_TINY, "reid.batches_per_epoch=2", "reid.num_workers=0", "tune.max_t=2",
              "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_failures=1"]


# ---------------------------------------------------------------------------------- the cluster
def cluster_pids(tag: str) -> list[int]:
    """PIDs of every live process whose environment holds ``PVEN_RAY_CLUSTER=<tag>``."""
    needle = f"PVEN_RAY_CLUSTER={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _net_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


class LocalCluster:
    """A real two-node Ray cluster on 127.0.0.1 (see the module docstring); ``stop()`` by PID."""

    def __init__(self, cpus_per_node: int = 1):
        self.tag = secrets.token_hex(6)
        self.tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))   # short: Ray's socket paths must fit
        token = self.tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = stage_env(RAY_TMPDIR=str(self.tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                             RAY_USAGE_STATS_ENABLED="0", PVEN_RAY_CLUSTER=self.tag,
                             PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="600")
        ports = lambda: ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port",  # noqa: E731
                         str(free_port()), "--runtime-env-agent-port", str(free_port()),
                         "--dashboard-agent-grpc-port", str(free_port())]
        ray = str(VENV_BIN / "ray")
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
                  "--disable-usage-stats"]
        self.network = LoopbackNetwork()
        try:
            self._start([ray, "start", "--head", "--port", str(self.port), "--dashboard-port", str(free_port()),
                         *common, *ports()])
            self._start([ray, "start", "--address", self.address, *common, *ports()])
            self._wait_for_nodes(2)
            outside = [(p, cmdline(p)[:80]) for p in self.pids() if _net_ns(p) not in (self.network.ns, None)]
            assert not outside, f"Ray processes outside the loopback-only namespace: {outside}"
        except BaseException:
            self.stop()
            raise

    def _start(self, cmd: list[str]) -> None:
        done = subprocess.run(self.network.wrap(cmd), env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def _wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        code = (f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                "print(sum(1 for x in ray.nodes() if x['Alive']), ray.cluster_resources().get('CPU'))")
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(self.network.wrap([sys.executable, "-c", code]), env=self.env, capture_output=True,
                                 text=True, timeout=600)
            if out.returncode == 0 and out.stdout.split()[:1] == [str(n)]:
                return
            assert time.monotonic() < deadline, f"the cluster has not {n} nodes: {out.stdout} {out.stderr[-2000:]}"
            time.sleep(2)

    def pids(self) -> list[int]:
        return cluster_pids(self.tag)

    def stop(self) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left after 15 s; assert none remains."""
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.5)
        left = self.pids()
        self.network.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert not left, f"Ray processes left: {[(p, cmdline(p)[:80]) for p in left]}"


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


# ---------------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_masked_shards(tmp_path_factory.mktemp("tune_data"), n_train_ids=8, n_test_ids=4, per_id=5)


def synced_project(tmp_path: Path, shards: Path, overrides: list[str]) -> tuple[Path, Path]:
    """A fake home with the stage script as ``~/tune.py`` and the project at ``~/pven`` (the
    cluster YAML's file_mounts target), data included. Returns (home, project)."""
    home = tmp_path / "home"
    project = write_project(home / "pven", [*SWEEP_TINY, *overrides])
    shutil.copytree(shards, project / "data/masked")
    shutil.copy(ROOT / "stages/tune.py", home / "tune.py")
    return home, project


def start_driver(home: Path, cluster: LocalCluster, db: Path, *args: str) -> subprocess.Popen:
    """``python ~/tune.py`` from the home folder, as ``ray submit`` runs it on the head node."""
    env = {**cluster.env, "HOME": str(home), "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
           "OMP_NUM_THREADS": "1"}
    log = open(home / f"driver-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(cluster.network.wrap([sys.executable, "tune.py", *args]), cwd=home, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def run_driver(home: Path, cluster: LocalCluster, db: Path, *args: str, timeout: float = 1200) -> tuple[int, str]:
    proc = start_driver(home, cluster, db, *args)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, driver_log(home)


def driver_log(home: Path) -> str:
    return max(home.glob("driver-*.log"), key=lambda p: p.stat().st_mtime).read_text()


def results(project: Path) -> list[dict]:
    import csv
    return list(csv.DictReader((project / "tune/results.csv").open()))


def mlflow_runs(db: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("pven")
    return client, client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def sweep_dir(project: Path) -> Path | None:
    found = list((project / "checkpoints/tune").glob("sweep-*"))
    assert len(found) <= 1, found
    return found[0] if found else None


def trial_results(project: Path) -> dict[str, list[dict]]:
    """Tune's own record per trial folder: the reported results, one dict per line of result.json."""
    out = {}
    folders = sweep_dir(project).glob("_trial_*") if sweep_dir(project) else []
    for folder in folders:
        lines = (folder / "result.json").read_text().splitlines() if (folder / "result.json").exists() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def terminated_trials(project: Path) -> set[str]:
    """Trials that Tune's saved experiment state lists as TERMINATED (what a restore skips)."""
    folder = sweep_dir(project)
    states = sorted(folder.glob("experiment_state-*.json")) if folder else []
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:   # being replaced right now
        return set()
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, home: Path | None = None,
             poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before {what}:\n{driver_log(home)[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


# ---------------------------------------------------------------------------------- the tests
def on_the_cluster(slow: bool = False, distributed: bool = False):
    """The markers of a test that runs on the module's Ray cluster (``ray``, ``server``, and
    ``slow`` / ``distributed`` as asked)."""
    marks = [pytest.mark.ray, pytest.mark.server, *[pytest.mark.slow] * slow, *[pytest.mark.distributed] * distributed]

    def mark(test):
        for m in marks:
            test = m(test)
        return test
    return mark


@on_the_cluster(slow=True, distributed=True)
def test_sweep_of_two_worker_trials_on_a_two_node_cluster(cluster, shards, tmp_path):
    # 2 workers x 0.9 CPU: on two 1-CPU nodes each trial's workers sit on different nodes
    # (gloo across them) and trials run one after another, so ASHA compares each with the
    # ones before it at the 1-epoch rung and stops the worse (loss: it differs with the weights).
    home, project = synced_project(tmp_path, shards, ["tune.num_samples=4", "tune.workers=2",
                                                      "tune.cpus_per_worker=0.9", "tune.metric=loss",
                                                      "tune.mode=min"])
    db = tmp_path / "mlflow.db"
    rc, log = run_driver(home, cluster, db)
    assert rc == 0, log[-6000:]
    rows = results(project)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert any(r["status"] == "stopped_early" and r["epochs"] == "1" for r in rows), rows
    assert any(r["status"] == "completed" and r["epochs"] == "2" for r in rows), rows

    # MLflow: one parent (the stage's run) with the search space, one child per trial.
    client, runs = mlflow_runs(db)
    [parent] = [r for r in runs if r.data.tags.get("stage") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == 5
    space = json.loads(parent.data.tags["search_space"])
    assert [d["key"] for d in space][:2] == ["reid.loss.w_id", "reid.loss.w_gtri"]
    assert {c.data.tags["trial_id"] for c in children} == {r["trial_id"] for r in rows}
    by_trial = {r["trial_id"]: r for r in rows}
    for child in children:
        row = by_trial[child.data.tags["trial_id"]]
        assert child.data.tags["stopped_early"] == str(row["status"] == "stopped_early").lower()
        assert child.info.status == ("KILLED" if row["status"] == "stopped_early" else "FINISHED")
        assert child.data.metrics["epochs"] == int(row["epochs"])
        assert float(child.data.params["reid.loss.w_id"]) == pytest.approx(float(row["reid.loss.w_id"]), rel=1e-5)
        # One point per epoch. A trial ASHA stopped may log the epoch it was in when Tune ended it
        # (its workers go down with their controller, a moment after Tune's decision).
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_mAP"))
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= int(row["epochs"])
        assert child.data.metrics["world_size"] == 2
        assert set(TRIAL_METRICS) <= set(child.data.metrics), "every metric tune.metric may name is reported"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best.yaml", "results.csv", "parallel.png",
                                                                           "tune.json"}

    # tune/best.yaml: the best trial's overrides, taken as they are by load_params (and dvc exp run -S).
    best = yaml.safe_load((project / "tune/best.yaml").read_text())
    params = load_params(project / "params.yaml", overrides=best)
    winner = min((r for r in rows if r["final_loss"]), key=lambda r: float(r["final_loss"]))
    assert params.reid.loss.w_ltri == pytest.approx(float(winner["reid.loss.w_ltri"]), rel=1e-5)
    assert all(o.startswith("reid.loss.") and "=" in o for o in best) and len(best) == 5
    metrics = json.loads((project / "metrics/tune.json").read_text())
    assert metrics["trials"] == 4 and metrics["best_loss"] == pytest.approx(float(winner["final_loss"]), rel=1e-5)
    from PIL import Image
    assert Image.open(project / "tune/parallel.png").size == (760, 420)
    # Trial checkpoints live in the sweep's storage, never in the pipeline's reid.checkpoint_dir.
    assert not (project / "checkpoints/reid").exists()
    assert list((sweep_dir(project) / "train").glob("*/checkpoint-step-*"))


@on_the_cluster(slow=True)
def test_killed_driver_resumes_the_sweep_without_rerunning_finished_trials(cluster, shards, tmp_path):
    # One worker of 0.9 CPU per trial: two trials at a time, three trials of 2 epochs (no ASHA).
    home, project = synced_project(tmp_path, shards, ["tune.num_samples=3", "tune.workers=1",
                                                      "tune.cpus_per_worker=0.9", "tune.scheduler=fifo"])
    db = tmp_path / "mlflow.db"
    proc = start_driver(home, cluster, db)
    try:
        wait_for(lambda: terminated_trials(project), 900, "a trial to finish", proc, home)
        done = terminated_trials(project)
        before = {t: len(rows) for t, rows in trial_results(project).items() if t in done}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (project / "tune/results.csv").exists(), "the sweep was killed before it wrote results"
    # Ray ends the dead driver's trials; wait until no Train worker is left, then run the stage again.
    wait_for(lambda: not [p for p in cluster.pids() if "RayTrainWorker" in cmdline(p)], 120, "the trials to end")

    rc, log = run_driver(home, cluster, db)
    assert rc == 0, log[-6000:]
    assert "resuming sweep" in log
    rows = results(project)
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    assert all(r["status"] == "completed" and r["epochs"] == "2" for r in rows), rows
    after = trial_results(project)
    assert before and len(before) < 3, "killed mid-run: some trials finished, some not"
    for trial, count in before.items():
        assert len(after[trial]) == count, f"finished trial {trial} was run again"
    client, runs = mlflow_runs(db)
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "the resumed sweep keeps its parent run"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    for child in children:   # one point per epoch, even for a trial restarted from its checkpoint
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_mAP")) == [1, 2]


@on_the_cluster(slow=True, distributed=True)
def test_a_killed_train_worker_resumes_its_trial_from_the_checkpoint(cluster, shards, tmp_path):
    # 12 steps an epoch: the trial runs for seconds after its first result, not milliseconds (a
    # CI machine once finished all 4 epochs of 2 steps between two polls).
    home, project = synced_project(tmp_path, shards, ["tune.num_samples=1", "tune.workers=2",
                                                      "tune.cpus_per_worker=0.45", "tune.scheduler=fifo",
                                                      "tune.max_t=4", "reid.batches_per_epoch=12"])
    db = tmp_path / "mlflow.db"
    proc = start_driver(home, cluster, db)
    try:
        # Tune has the first epoch's result only once Ray Train registered its checkpoint (a
        # checkpoint folder in storage alone may still be mid-upload, and not be restored).
        workers: list[int] = []

        def reported_and_running() -> bool:
            reported = [len(rows) for rows in trial_results(project).values()]
            assert not reported or reported[0] < 4, "the trial ended before a worker could be killed"
            workers[:] = [p for p in cluster.pids() if "RayTrainWorker" in cmdline(p)]
            return bool(reported) and len(workers) == 2

        wait_for(reported_and_running, 900, "the trial's first reported epoch with 2 live workers", proc, home,
                 poll=0.2)
        os.kill(workers[-1], signal.SIGKILL)
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = driver_log(home)
    assert proc.returncode == 0, log[-6000:]
    [row] = results(project)
    assert row["status"] == "completed" and row["epochs"] == "4" and row["resumed"] == "True", row
    reported = next(iter(trial_results(project).values()))
    assert [r["epoch"] for r in reported][-1] == 4 and max(r["resumed_from_step"] for r in reported) >= 2
    client, runs = mlflow_runs(db)
    [child] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert int(child.data.tags["resumed_from_step"]) >= 2 and child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_mAP")) == [1, 2, 3, 4]


@on_the_cluster()
def test_more_workers_than_the_cluster_has_cpus_fails_before_any_trial(cluster, shards, tmp_path):
    home, project = synced_project(tmp_path, shards, ["tune.workers=3"])
    db = tmp_path / "mlflow.db"
    rc, log = run_driver(home, cluster, db, timeout=600)
    assert rc == 2, log[-4000:]
    assert "error: tune.workers: a trial needs 3 workers x 0.99 CPUs" in log
    assert "the cluster has 2 CPUs on 2 node" in log
    assert "Traceback" not in log
    assert not (project / "checkpoints/tune").exists() and not mlflow_runs(db)[1], "nothing started"


@pytest.mark.parametrize("override, needle", [
    ("tune.space=[{key: reid.loss.w_idd, dist: uniform, low: 0.1, high: 1}]",
     "tune.space[0].key: 'reid.loss.w_idd': unknown key (did you mean 'reid.loss.w_id'?"),
    ("tune.space=[{key: reid.loss.w_id, dist: uniform, low: 1.0, high: 1.0}]",
     "tune.space[0] (reid.loss.w_id): empty range [1.0, 1.0], expected low < high"),
    ("tune.space=[{key: reid.loss.w_id, dist: choice, values: []}]",
     "tune.space[0] (reid.loss.w_id): dist choice takes a non-empty list of values"),
    ("tune.space=[{key: reid.loss.margin_g, dist: uniform, low: 0.0, high: 0.5}]",
     "the value 0.0 is not valid for the key: reid.loss.margin_g: got 0.0, expected a value > 0.0"),
    ("tune.space=[{key: reid.epochs, dist: choice, values: [2, 4]}]", "'reid.epochs': set by the sweep itself"),
    ("tune.space=[{key: reid.P, dist: uniform, low: 2, high: 8}]", "draws floats, but the key takes an integer"),
    ("tune.metric=val_map", "tune.metric: got 'val_map', expected one of 'val_mAP'"),
    ("tune.max_t=1", "tune.grace_period: got 2, expected at most tune.max_t (1)"),
    ("tune.spaces=[]", "tune.spaces: unknown key (did you mean 'space'?"),
])
def test_bad_sweep_params_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert needle in str(err.value)


def test_the_stage_refuses_bad_input_before_starting_ray(shards, tmp_path):
    # Through the stage script from a foreign folder: exit 2, one line, no Ray started.
    home, project = synced_project(tmp_path, shards, [])
    env = stage_env(HOME=str(home), PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_ADDRESS="127.0.0.1:1")
    bad = "tune.space=[{key: reid.loss.w_gtri, dist: loguniform, low: 0.5, high: 0.5}]"
    done = subprocess.run([sys.executable, "tune.py", "-S", bad], cwd=home, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2 and "error: " in done.stderr and "empty range [0.5, 0.5]" in done.stderr, done.stderr
    # A validation metric, but shards without validation splits: no trial could ever report it.
    manifest = project / "data/masked/manifest.json"
    data = json.loads(manifest.read_text())
    for split in ("query", "gallery"):
        data["splits"].pop(split)
    manifest.write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "tune.py"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "tune.metric: 'val_mAP' is a validation metric" in done.stderr, done.stderr
    assert not (project / "checkpoints/tune").exists()


def test_trial_resources_follow_the_cluster():
    from pipeline.tune.space import trial_resources
    params = load_params(ROOT / "params.yaml")
    cpu = trial_resources(params, [{"CPU": 2.0}])
    assert (cpu.workers, cpu.use_gpu, cpu.max_concurrent) == (1, False, 2)   # 0.99 + 0.01 CPUs a trial
    gpu = trial_resources(params, [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}])
    assert (gpu.workers, gpu.use_gpu, gpu.max_concurrent) == (4, True, 2)    # one worker per GPU of a node
    with pytest.raises(ConfigError, match="tune.use_gpu: true, but the cluster has no GPU"):
        trial_resources(load_params(ROOT / "params.yaml", ["tune.use_gpu=true"]), [{"CPU": 4.0}])


def test_optuna_search_draws_inside_the_space_and_repeats_with_the_seed():
    # tune.search=optuna: Ray's OptunaSearch over the space as search_space() builds it (Ray
    # converts each tune domain to an Optuna distribution); TPE learns from completed trials.
    from pipeline.tune.space import search_space
    from pipeline.tune.sweep import _searcher

    params = load_params(ROOT / "params.yaml", ["tune.search=optuna",
                                                "tune.space=[{key: reid.loss.w_ltri, dist: loguniform, low: 0.01, "
                                                "high: 2.0}, {key: reid.P, dist: choice, values: [4, 8]}]"])

    def draws() -> list[dict]:
        searcher, limit = _searcher(params, max_concurrent=2)
        assert limit == 2, "a Searcher's concurrency is limited by Tune's max_concurrent_trials"
        searcher.set_search_properties(params.tune.metric, params.tune.mode, search_space(params))
        out = []
        for i in range(6):
            config = searcher.suggest(f"t{i}")
            searcher.on_trial_complete(f"t{i}", {params.tune.metric: config["reid.loss.w_ltri"], "done": True})
            out.append(config)
        return out

    first = draws()
    assert all(0.01 <= c["reid.loss.w_ltri"] <= 2.0 and c["reid.P"] in (4, 8) for c in first), first
    assert all(isinstance(c["reid.P"], int) for c in first)
    assert len({c["reid.loss.w_ltri"] for c in first}) == 6
    assert draws() == first, "seeded by params.seed"


def test_parallel_chart_draws_every_trial():
    from pipeline.charts import parallel_chart
    rows = [{"a": 0.1 * i, "b": 2.0 - i, "m": 0.3 + 0.05 * i} for i in range(5)] + [{"a": 0.2, "b": None, "m": None}]
    image = parallel_chart(rows, ["a", "b", "m"], "m", title="t")
    assert image.size == (760, 420) and len(set(image.getdata())) > 3
    assert parallel_chart(rows, ["a", "b", "m"], "m", title="t").tobytes() == image.tobytes()
    with pytest.raises(ValueError, match="no rows"):
        parallel_chart([], ["a", "m"], "m", title="t")


# ---------------------------------------------------------------------------------- cluster YAMLs
@pytest.mark.parametrize("name", ["tune.yaml", "tune-local.yaml"])
def test_cluster_launcher_configs_validate_with_rays_checker(name):
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(cfg))
    mounts = cfg["file_mounts"]
    assert "~/pven" in mounts, "the project reaches every node at the path stages/tune.py looks in"
    setup = "\n".join(cfg.get("setup_commands", []))
    pinned = [line.split("==")[1].split()[0] for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line.startswith("torch==")]
    assert f"torch=={pinned[0]}" in setup and setup.index("torch==") < setup.index("-e \"$HOME/pven")
    setup += "\n".join(cfg.get("head_setup_commands", []) + cfg.get("initialization_commands", []))
    assert "MLFLOW_TRACKING_URI" in setup and "RAY_USAGE_STATS_ENABLED" in setup
    assert "/mnt/shared" in setup   # shared storage for Tune results, checkpoints and shards
    if name == "tune.yaml":
        assert cfg["provider"]["type"] == "aws" and cfg["max_workers"] >= 1
        types = cfg["available_node_types"]
        assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
        assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    else:
        assert cfg["provider"]["type"] == "local" and cfg["provider"]["head_ip"]
