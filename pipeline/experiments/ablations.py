"""Trained ablations as DVC experiments, and one table of them with paired bootstrap intervals.

    python -m pipeline.experiments.ablations            # every ablation below, at the params.yaml budget
    python -m pipeline.experiments.ablations --only pven,global_only -S reid.epochs=24   # some, extra overrides

Each ablation is ``dvc exp run --temp -n abl-<name>`` with its ``-S`` overrides (plus the
command's own ``-S``, applied to every ablation alike), so it reruns only the stages its
overrides touch (the rest comes from DVC's run cache) and leaves the workspace as it was.
The stages' MLflow runs carry the tag ``ablation=<name>`` (``PVEN_ABLATION``); the driver
then logs one MLflow run per ablation (``ablation <name>``, tags ``ablation`` and
``dvc_experiment``) with its table row and its per-query CSV.

The table compares every ablation with the first one (``pven``) on the SAME test queries,
paired by query key: per-query AP and rank-1 of the ablation's scored mode (``global``
for the global-only model: D_g at inference; ``pven`` otherwise) from the experiment's
``reports/eval_queries.csv``, resampled by query identity with the same counts on both
sides (:func:`pipeline.evaluation.bootstrap.paired_difference`, docs/method.md §9). Written
to ``reports/ablations.md`` and ``reports/ablations.json`` (atomic), and printed.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic, cli
from pipeline.config import load_params
from pipeline.evaluation.bootstrap import interval, paired_difference

QUERIES = "reports/eval_queries.csv"
TABLE_MD, TABLE_JSON = Path("reports/ablations.md"), Path("reports/ablations.json")


@dataclass(frozen=True)
class Ablation:
    name: str
    overrides: tuple[str, ...]
    mode: str            # the evaluation mode scored: pven, or global for a model without the local loss
    about: str


ABLATIONS: tuple[Ablation, ...] = (
    Ablation("pven", (), "pven", "PVEN, paper variant (the default run)"),
    Ablation("global_only", ("reid.loss.w_ltri=0",), "global", "no local triplet loss, D_g at inference"),
    Ablation("official", ("reid.variant=official",), "pven", "the authors' code (docs/method.md §3)"),
    Ablation("gt_masks", ("masks.source=labels",), "pven", "exact label maps instead of the parser's masks"),
    Ablation("uniform_attention", ("reid.attention=uniform",), "pven", "a_i = 1/4 instead of common-visible attention"),
)
BY_NAME = {a.name: a for a in ABLATIONS}


def run_experiment(ablation: Ablation, extra: list[str], root: Path) -> str:
    """``dvc exp run --temp`` for one ablation; returns the experiment's git ref."""
    name = f"abl-{ablation.name}"
    env = {**os.environ, "PVEN_ABLATION": ablation.name}
    # A previous experiment of this name would make dvc refuse the new one.
    subprocess.run(["dvc", "exp", "remove", name], cwd=root, env=env, capture_output=True, text=True)
    sets = [arg for override in (*ablation.overrides, *extra) for arg in ("-S", override)]
    done = subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *sets], cwd=root, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ablation {ablation.name}: dvc exp run failed (exit {done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                          capture_output=True, text=True, check=True).stdout.split()
    mine = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    if len(mine) != 1:
        raise RuntimeError(f"ablation {ablation.name}: expected one experiment ref named {name}, found {mine}")
    return mine[0]


def read_queries(root: Path, ref: str) -> list[dict[str, str]]:
    """The per-query rows of an experiment (``git show <ref>:reports/eval_queries.csv``)."""
    text = subprocess.run(["git", "show", f"{ref}:{QUERIES}"], cwd=root, capture_output=True, text=True)
    if text.returncode != 0:
        raise RuntimeError(f"{ref}: no {QUERIES} in the experiment ({text.stderr.strip()})")
    return list(csv.DictReader(io.StringIO(text.stdout)))


def _column(rows: list[dict[str, str]], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP (NaN: skipped) and rank-1 hit (0/1, NaN: skipped) of ``mode``."""
    ap = np.array([float(r[f"{mode}_ap"]) if r[f"{mode}_ap"] else np.nan for r in rows])
    first = np.array([int(r[f"{mode}_first_rank"]) for r in rows])
    return ap, np.where(first > 0, (first == 1).astype(float), np.nan)


def compare(runs: dict[str, list[dict[str, str]]], resamples: int, seed: int) -> list[dict]:
    """One table row per ablation; differences against the first one, paired by query key."""
    names = list(runs)
    base_name = names[0]
    base = {(r["repeat"], r["key"]): r for r in runs[base_name]}
    rows = []
    for name in names:
        ablation = BY_NAME[name]
        mine = {(r["repeat"], r["key"]): r for r in runs[name]}
        if set(mine) != set(base):
            raise ValueError(f"ablation {name}: its test queries differ from {base_name}'s "
                             f"({len(set(mine) ^ set(base))} keys differ); the data must be the same")
        keys = sorted(base)
        ours = [mine[k] for k in keys]
        theirs = [base[k] for k in keys]
        groups = np.array([r["vid"] for r in ours])
        ap, r1 = _column(ours, ablation.mode)
        base_ap, base_r1 = _column(theirs, BY_NAME[base_name].mode)
        row = {"ablation": name, "about": ablation.about, "overrides": list(ablation.overrides), "mode": ablation.mode}
        for metric, values, reference in (("mAP", ap, base_ap), ("rank1", r1, base_r1)):
            row.update(interval(values, groups, resamples=resamples, seed=seed).fields(metric))
            diff = paired_difference(values, reference, groups, resamples=resamples, seed=seed)
            row.update(diff.fields(f"{metric}_minus_{base_name}"))
        row["queries"] = int(np.isfinite(ap).sum())
        row["identities"] = int(len(set(groups[np.isfinite(ap)])))
        rows.append(row)
    return rows


def markdown(rows: list[dict], base: str) -> str:
    """The table as GitHub markdown: value [95% interval]."""
    def cell(row, key):
        return f"{row[key]:.3f} [{row[key + '_lo']:.3f}, {row[key + '_hi']:.3f}]"

    lines = [f"| ablation | what | scored | mAP | rank-1 | mAP − {base} | rank-1 − {base} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['ablation']} | {row['about']} | {row['mode']} | {cell(row, 'mAP')} | "
                     f"{cell(row, 'rank1')} | {cell(row, f'mAP_minus_{base}')} | {cell(row, f'rank1_minus_{base}')} |")
    queries = rows[0]["queries"]
    lines.append(f"\n{queries} test queries of {rows[0]['identities']} identities; 95% percentile intervals of a "
                 f"paired bootstrap over query identities (docs/method.md §9).")
    return "\n".join(lines) + "\n"


def log_to_mlflow(rows: list[dict], refs: dict[str, str], root: Path) -> None:
    """One MLflow run per ablation, tagged with its name, holding its row."""
    from pipeline.tracking import DEFAULT_EXPERIMENT, tracking_uri

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    for row in rows:
        name = row["ablation"]
        with mlflow.start_run(run_name=f"ablation {name}", tags={
                "ablation": name, "dvc_experiment": f"abl-{name}", "stage": "ablations",
                "overrides": " ".join(row["overrides"]) or "(none)", "scored_mode": row["mode"]}):
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)})
            mlflow.log_text(subprocess.run(["git", "show", f"{refs[name]}:{QUERIES}"], cwd=root, capture_output=True,
                                           text=True, check=True).stdout, f"ablation-{name}/eval_queries.csv")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments.ablations",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BY_NAME)} (the first is the baseline)")
    parser.add_argument("-S", "--set", dest="extra", action="append", default=[],
                        help="an override applied to every ablation (dvc exp run -S)")
    parser.add_argument("--root", default=".", help="the project folder (a DVC repo)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    names = args.only.split(",") if args.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise cli.InputError(f"--only: unknown ablation {unknown[0]!r}; expected some of {', '.join(BY_NAME)}")
    params = load_params(root / "params.yaml", args.extra)   # a bad override fails here, before any run
    refs, runs = {}, {}
    for name in names:
        print(f"ablations: running {name} ({' '.join(BY_NAME[name].overrides) or 'no override'})", flush=True)
        refs[name] = run_experiment(BY_NAME[name], args.extra, root)
        runs[name] = read_queries(root, refs[name])
    rows = compare(runs, params.eval.bootstrap, params.seed)
    table = markdown(rows, names[0])
    atomic.write_text(root / TABLE_MD, table)
    atomic.write_json(root / TABLE_JSON, {"baseline": names[0], "extra_overrides": args.extra, "rows": rows})
    log_to_mlflow(rows, refs, root)
    print(table)
    return rows


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
