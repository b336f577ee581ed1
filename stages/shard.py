"""shard stage: read a dataset in its official layout and write WebDataset shards of every split.

    dvc repro shard
    python stages/shard.py          # the same, by hand (reads ./params.yaml)

Reads params ``seed``, ``data`` and ``shard``. Writes ``shard.out_dir`` (tars +
manifest.json) and ``metrics/shard.json`` (per-split counts, skipped inputs).
"""
from pathlib import Path

from pipeline import atomic
from pipeline.config import load_params
from pipeline.data.shards import MANIFEST, ShardOptions, write_shards
from pipeline.data.sources import read_dataset
from pipeline.tracking import stage_run

METRICS = Path("metrics/shard.json")


def main() -> None:
    params = load_params("params.yaml")
    cfg = params.shard
    out_dir = Path(cfg.out_dir)
    with stage_run("shard", params, ["seed", "data", "shard"]) as run:
        splits = read_dataset(params.data.source, params.data.root, params.data.test_subset)
        opts = ShardOptions(samples_per_shard=cfg.samples_per_shard, min_shards=cfg.min_shards,
                            resize=cfg.resize, keep_originals=cfg.keep_originals,
                            jpeg_quality=cfg.jpeg_quality, strict=cfg.strict)
        manifest = write_shards(splits, out_dir, opts, seed=params.seed, workers=cfg.workers,
                                extra={"source": params.data.source, "root": params.data.root})
        metrics = {split: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
                   for split, info in manifest["splits"].items()}
        metrics["skipped"] = len(manifest["skipped"])
        metrics["seconds"] = manifest["seconds"]
        atomic.write_json(METRICS, metrics)
        run.log_metrics(metrics)
        run.log_artifact(out_dir / MANIFEST)
    for item in manifest["skipped"]:
        print(f"shard: skipped {item['split']} {item['image']}: {item['reason']}")
    print(f"shard: {metrics}")


if __name__ == "__main__":
    main()
