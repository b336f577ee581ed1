"""shard stage: read a dataset in its official layout and write WebDataset shards of every split.

    dvc repro shard
    python stages/shard.py          # the same, by hand (reads ./params.yaml)

Reads params ``seed``, ``data`` and ``shard``. ``data.val_ids`` training identities become
the validation splits (``val_query``, ``val_gallery``; :mod:`pipeline.data.holdout`). Writes ``shard.out_dir`` (tars +
manifest.json) and ``metrics/shard.json`` (per-split counts, skipped inputs).
"""
import time
from pathlib import Path

from pipeline import atomic, cli
from pipeline.config import Params, ParamsView, stage_params
from pipeline.data.holdout import hold_out
from pipeline.data.records import SPLITS
from pipeline.data.shards import MANIFEST, ShardOptions, shard_metrics, write_shards
from pipeline.data.sources import read_dataset_checked, skipped_entry
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "data", "shard")
METRICS, REPORT = Path("metrics/shard.json"), Path("reports/shard.json")
HEADLINE = {f"{split}_samples": f"{split}.samples" for split in SPLITS} | {
    "skipped": "skipped", "seconds": "seconds"}


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "shard", root / "params.yaml")
    cfg, data = params.shard, params.data
    out_dir = root / cfg.out_dir
    started = time.perf_counter()
    with stage_run("shard", params) as run:
        splits, problems = read_dataset_checked(data.source, root / data.root, data.test_subset, cfg.bad_entries)
        splits = hold_out(splits, data.val_ids)
        manifest = write_shards(splits, out_dir, ShardOptions.from_config(cfg), seed=params.seed, workers=cfg.workers,
                                extra={"source": data.source, "root": data.root}, show_progress=True,
                                skipped=[skipped_entry(p) for p in problems])
        metrics = shard_metrics(manifest) | {"seconds": round(time.perf_counter() - started, 2)}
        atomic.write_json(root / REPORT, without_timings(metrics))
        atomic.write_json(root / METRICS, headline(metrics, HEADLINE))
        run.log_metrics(metrics)
        for path in (out_dir / MANIFEST, root / METRICS, root / REPORT):
            run.log_artifact(path)
    for item in manifest["skipped"]:
        print(f"shard: skipped {item['split']} {item['image']}: {item['reason']}")
    print(f"shard: {metrics}")
    return metrics


if __name__ == "__main__":
    cli.run(main)
