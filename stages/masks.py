"""masks stage: predict view masks for every ReID image with the trained parser.

    dvc repro masks
    python stages/masks.py                                  # the same, by hand (one process)
    torchrun --nproc_per_node 4 stages/masks.py             # 4 processes (GPUs), shards split rank::4

Reads params ``seed``, ``masks``, ``shard.out_dir`` (the shards) and ``parser.out_dir``
(the checkpoint; its config gives the input size). Writes ``masks.out_dir``: one shard
per input shard, same samples in the same order, with the *predicted* ``mask.png``
(ground-truth masks are not copied, except for the ablation ``masks.source: labels``,
which writes every image's own label map instead) and a manifest; ``metrics/masks.json`` (per-view
visibility and area, IoU against ground truth where it exists, images/s) and
``reports/masks_overlays.png`` (image | prediction | ground truth), logged to MLflow.
Undecodable images are skipped and listed in the manifest.
"""
from pathlib import Path

import torch

from pipeline import atomic, cli
from pipeline.config import Params, ParamsView, stage_params
from pipeline.data.shards import MANIFEST
from pipeline.dist.env import init_distributed, shutdown
from pipeline.parsing.model import CHECKPOINT
from pipeline.parsing.predict import write_masked_shards
from pipeline.parsing.report import masks_sheet, save_png
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "masks", "shard.out_dir", "parser.out_dir")
METRICS, REPORT = Path("metrics/masks.json"), Path("reports/masks.json")
HEADLINE = {"heldout_miou": "heldout_truth.miou", "images": "images", "skipped": "skipped",
            "images_per_s": "images_per_s"}
OVERLAYS = Path("reports/masks_overlays.png")


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict | None:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); rank 0 returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "masks", root / "params.yaml")
    cfg, shards, out_dir = params.masks, root / params.shard.out_dir, root / params.masks.out_dir
    info = init_distributed()
    torch.manual_seed(params.seed)
    try:
        with stage_run("masks", params, rank=info.rank) as run:
            result = write_masked_shards(shards, out_dir, root / params.parser.out_dir / CHECKPOINT,
                                         batch_size=cfg.batch_size, mask_size=cfg.mask_size,
                                         num_workers=cfg.num_workers, info=info, show_progress=True,
                                         source=cfg.source)
            if info.is_main:
                atomic.write_json(root / REPORT, without_timings(result["metrics"]))
                atomic.write_json(root / METRICS, headline(result["metrics"], HEADLINE))
                save_png(root / OVERLAYS, masks_sheet(out_dir, shards))
                run.log_metrics(result["metrics"])
                for path in (root / METRICS, root / REPORT, root / OVERLAYS, out_dir / MANIFEST):
                    run.log_artifact(path)
    finally:
        shutdown(info)
    if not info.is_main:
        return None
    metrics = result["metrics"]
    for item in result["manifest"]["skipped"]:
        print(f"masks: skipped {item['split']} {item['shard']} {item['key']}: {item['reason']}")
    print(f"masks: {metrics['images']} images, {metrics['skipped']} skipped, {metrics['images_per_s']} img/s, "
          f"held-out mIoU {metrics.get('heldout_truth', {}).get('miou')}")
    return metrics


if __name__ == "__main__":
    cli.run_stage(main)
