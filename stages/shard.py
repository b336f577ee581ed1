"""shard stage: read a dataset in its official layout and write WebDataset shards of every split.

    dvc repro shard
    python stages/shard.py          # the same, by hand (reads ./params.yaml)

Reads params ``seed``, ``data`` and ``shard``. Writes ``shard.out_dir`` (tars +
manifest.json) and ``metrics/shard.json`` (per-split counts, skipped inputs).
"""
from pathlib import Path

from pipeline import atomic
from pipeline.config import Params, ParamsView, stage_params
from pipeline.data.shards import MANIFEST, ShardOptions, shard_metrics, write_shards
from pipeline.data.sources import read_dataset
from pipeline.tracking import stage_run

PARAMS = ("seed", "data", "shard")
METRICS = Path("metrics/shard.json")


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "shard", root / "params.yaml")
    cfg, data = params.shard, params.data
    out_dir = root / cfg.out_dir
    with stage_run("shard", params) as run:
        splits = read_dataset(data.source, root / data.root, data.test_subset)
        manifest = write_shards(splits, out_dir, ShardOptions.from_config(cfg), seed=params.seed, workers=cfg.workers,
                                extra={"source": data.source, "root": data.root}, show_progress=True)
        metrics = shard_metrics(manifest)
        atomic.write_json(root / METRICS, metrics)
        run.log_metrics(metrics)
        run.log_artifact(out_dir / MANIFEST)
    for item in manifest["skipped"]:
        print(f"shard: skipped {item['split']} {item['image']}: {item['reason']}")
    print(f"shard: {metrics}")
    return metrics


if __name__ == "__main__":
    main()
