"""train_parser stage: train the vehicle part parser (smp U-Net, balanced CE) on the annotated subset.

    dvc repro train_parser
    python stages/train_parser.py            # the same, by hand (reads ./params.yaml)

Reads params ``seed`` and ``parser`` (and the shards in ``shard.out_dir``). Trains on
the training split's images that carry a label, validates every epoch on a held-out
part of them (by identity), keeps the best checkpoint. Writes ``parser.out_dir``/parser.pt
(state dict + config, loads with ``torch.load(weights_only=True)``), ``metrics/parser.json``
(val per-class IoU, mIoU, pixel accuracy), ``plots/parser/{loss,miou}.csv`` and
``reports/parser_val_overlays.png`` (image | ground truth | prediction), all logged to MLflow.
"""
import sys
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.config import load_params
from pipeline.data.records import VIEW_NAMES
from pipeline.parsing.data import annotated_subset, decode_pair
from pipeline.parsing.model import CHECKPOINT, load_checkpoint, logit_bias
from pipeline.parsing.predict import predict_labels
from pipeline.parsing.report import overlay_sheet, save_png
from pipeline.parsing.train import train_parser
from pipeline.tracking import stage_run

METRICS = Path("metrics/parser.json")
PLOTS = Path("plots/parser")
OVERLAYS = Path("reports/parser_val_overlays.png")


def main() -> None:
    params = load_params("params.yaml")
    cfg = params.parser
    history = []
    with stage_run("train_parser", params, ["seed", "parser"]) as run:
        def on_epoch(epoch: int, row: dict) -> None:  # curves appear while training runs
            history.append(row)
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            atomic.write_text(PLOTS / "loss.csv", _csv(history, ["epoch", "train_loss", "val_loss"]))
            atomic.write_text(PLOTS / "miou.csv", _csv(history, ["epoch", "val_miou", "val_pixel_acc"]))

        train, val = annotated_subset(params.shard.out_dir, cfg.val_fraction, params.seed)
        print(f"train_parser: {len(train)} train / {len(val)} val annotated images")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result = train_parser(cfg, train, val, params.seed, cfg.out_dir, device=device,
                              progress=sys.stderr.isatty(), on_epoch=on_epoch)
        val_scores = result["val"]
        metrics = {"val": {"miou": val_scores["miou"], "pixel_acc": val_scores["pixel_acc"],
                           "iou": dict(zip(VIEW_NAMES, val_scores["iou"]))},
                   "best_epoch": result["best_epoch"], "train_images": result["train_images"],
                   "val_images": result["val_images"], "seconds": result["seconds"],
                   "class_weights": dict(zip(VIEW_NAMES, result["class_weights"])),
                   "pixel_freq": dict(zip(VIEW_NAMES, result["pixel_freq"]))}
        atomic.write_json(METRICS, metrics)
        run.log_metrics(metrics)
        model, config, _ = load_checkpoint(Path(cfg.out_dir) / CHECKPOINT)
        pairs = [decode_pair(s) for s in val[:8]]
        preds = predict_labels(model, [im for im, _ in pairs], config["image_size"], bias=logit_bias(config))
        save_png(OVERLAYS, overlay_sheet([(im, [gt, p]) for (im, gt), p in zip(pairs, preds)]))
        for path in (METRICS, OVERLAYS, PLOTS / "loss.csv", PLOTS / "miou.csv"):
            run.log_artifact(path)
    print(f"train_parser: val mIoU {metrics['val']['miou']:.4f} (epoch {metrics['best_epoch']}), "
          f"{metrics['seconds']:.0f} s")


def _csv(rows: list[dict], columns: list[str]) -> str:
    return "\n".join([",".join(columns)] + [",".join(f"{r[c]:.6g}" for c in columns) for r in rows]) + "\n"

if __name__ == "__main__":
    main()
