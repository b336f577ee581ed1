"""masks stage: predict view masks for every ReID image with the trained parser.

    dvc repro masks
    python stages/masks.py                                  # the same, by hand (one process)
    torchrun --nproc_per_node 4 stages/masks.py             # 4 processes (GPUs), shards split rank::4

Reads params ``seed`` and ``masks``, the shards in ``shard.out_dir`` and the checkpoint
in ``parser.out_dir`` (its config gives the input size). Writes ``masks.out_dir``: one
shard per input shard, same samples in the same order, with the *predicted* ``mask.png``
(ground-truth masks are never copied) and a manifest; ``metrics/masks.json`` (per-view
visibility and area, IoU against ground truth where it exists, images/s) and
``reports/masks_overlays.png`` (image | prediction | ground truth), logged to MLflow.
Undecodable images are skipped and listed in the manifest.
"""
import sys
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.config import load_params
from pipeline.data.shards import MANIFEST
from pipeline.dist.env import init_distributed, shutdown
from pipeline.parsing.model import CHECKPOINT
from pipeline.parsing.predict import write_masked_shards
from pipeline.parsing.report import masks_sheet, save_png
from pipeline.tracking import stage_run

METRICS = Path("metrics/masks.json")
OVERLAYS = Path("reports/masks_overlays.png")


def main() -> None:
    params = load_params("params.yaml")
    cfg = params.masks
    info = init_distributed()
    torch.manual_seed(params.seed)
    try:
        with stage_run("masks", params, ["seed", "masks"], rank=info.rank) as run:
            result = write_masked_shards(
                params.shard.out_dir, cfg.out_dir, Path(params.parser.out_dir) / CHECKPOINT,
                batch_size=cfg.batch_size, mask_size=cfg.mask_size, num_workers=cfg.num_workers,
                rank=info.rank, world_size=info.world_size, device=info.device,
                progress=info.is_main and sys.stderr.isatty())
            if info.is_main:
                metrics = result["metrics"]
                atomic.write_json(METRICS, metrics)
                save_png(OVERLAYS, masks_sheet(cfg.out_dir, params.shard.out_dir))
                run.log_metrics(metrics)
                for path in (METRICS, OVERLAYS, Path(cfg.out_dir) / MANIFEST):
                    run.log_artifact(path)
    finally:
        shutdown(info)
    if info.is_main:
        for item in result["manifest"]["skipped"]:
            print(f"masks: skipped {item['split']} {item['shard']} {item['key']}: {item['reason']}")
        held = metrics.get("heldout_truth", {}).get("miou")
        print(f"masks: {metrics['images']} images, {metrics['skipped']} skipped, "
              f"{metrics['images_per_s']} img/s, held-out mIoU {held}")


if __name__ == "__main__":
    main()
