"""tune stage: a Ray Tune sweep of the loss weights, each trial a real (multi-worker) training run.

    dvc repro tune/dvc.yaml                     # not part of the default `dvc repro` (tune/dvc.yaml)
    python stages/tune.py                       # the same by hand, on this machine (a local Ray)
    python stages/tune.py -S tune.num_samples=4 -S tune.max_t=4    # with overrides
    RAY_ADDRESS=127.0.0.1:6379 python stages/tune.py               # on a running cluster
    ray submit cluster/tune.yaml stages/tune.py -- -S tune.num_samples=16

``ray submit`` uploads only this file and runs it as ``~/tune.py`` on the head node; the
project itself reaches the nodes through the cluster YAML's ``file_mounts`` (``~/pven``) and
is installed there. So the project is, in this order: ``--project DIR``; the folder of
``--params FILE``; the working directory when it holds params.yaml and dvc.yaml (DVC runs it
there); the checkout this file lies in; ``~/pven``. The stage runs in that folder.

Reads params ``seed``, ``masks.out_dir`` (the data every trial trains on: shared storage on
a multi-node cluster), ``reid`` (what a trial trains) and ``tune`` (the sweep). Writes
``tune/best.yaml`` (the best trial's overrides), ``tune/results.csv`` (one row per trial),
``tune/parallel.png``, ``metrics/tune.json``; Ray's results and the trials' checkpoints go
to ``tune.storage`` (kept between runs: a rerun resumes the sweep). MLflow: a parent run
``tune`` with one child run per trial (pipeline/tune/sweep.py).
"""
import argparse
import os
import sys
from pathlib import Path

SYNCED = Path("~/pven")   # where cluster/*.yaml file_mounts put the project on every node


def find_project(project: str | None, params_file: str | None) -> Path:
    """The project folder (see the module docstring for the order); exits with a message if none."""
    here = Path(__file__).resolve().parent.parent
    candidates = [Path(project)] if project else [Path(params_file).resolve().parent] if params_file else [
        Path.cwd(), here, SYNCED.expanduser()]
    for folder in candidates:
        if (folder / "params.yaml").is_file() and (project or params_file or (folder / "dvc.yaml").is_file()):
            return folder.resolve()
    sys.exit(f"error: no project found (looked for params.yaml in {', '.join(map(str, candidates))}); "
             f"pass --project DIR or --params FILE")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    _parser.add_argument("--project", help="project folder (params.yaml, the data, outputs)")
    _parser.add_argument("--params", help="params file (its folder is the project)")
    _parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, the local cluster, or a "
                                           "new local Ray)")
    _parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                         help="params override, as for dvc exp run -S (repeatable)")
    ARGS = _parser.parse_args()
    ROOT = find_project(ARGS.project, ARGS.params)
    os.chdir(ROOT)  # MLflow's default store and every relative params path belong to the project
    try:
        import pipeline  # noqa: F401  (the installed package)
    except ImportError:  # a checkout that was synced but not installed
        sys.path.insert(0, str(ROOT))

from pipeline import cli  # noqa: E402
from pipeline.config import Params, ParamsView, load_params, stage_params  # noqa: E402
from pipeline.tune.sweep import run_sweep  # noqa: E402

PARAMS = ("seed", "masks.out_dir", "reid", "tune")


def main(params: Params | ParamsView | None = None, root: str | Path = ".", overrides=(), address=None,
         params_file: str | Path | None = None) -> dict:
    """Run (or resume) the sweep for the project in ``root``; returns metrics/tune.json's numbers."""
    root = Path(root)
    if params is None:
        params = load_params(params_file or root / "params.yaml", overrides)
    params = stage_params(params, PARAMS, "tune", root / "params.yaml")
    result = run_sweep(params, root, address=address)
    return result.metrics | {"best_overrides": result.overrides, "rows": result.rows, "name": result.name,
                             "path": result.path, "restored": result.restored, "parent_run_id": result.parent_run_id}


if __name__ == "__main__":
    cli.run(lambda: main(root=ROOT, overrides=ARGS.set, address=ARGS.address, params_file=ARGS.params))
