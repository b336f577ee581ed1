"""train_parser stage: train the vehicle part parser (smp U-Net, balanced CE) on the annotated subset.

    dvc repro train_parser
    python stages/train_parser.py            # the same, by hand (reads ./params.yaml)

Reads params ``seed``, ``parser`` and ``shard.out_dir`` (the shards). Trains on the
training split's images that carry a label, validates every epoch on a held-out part
of them (by identity), keeps the best checkpoint. Writes ``parser.out_dir``/parser.pt
(state dict + config, loads with ``torch.load(weights_only=True)``), ``metrics/parser.json``
(val per-class IoU, mIoU, pixel accuracy), ``plots/parser/{loss,miou}.csv`` and
``reports/parser_val_overlays.png`` (image | ground truth | prediction), all logged to MLflow.
"""
from pathlib import Path

import torch

from pipeline import atomic, cli
from pipeline.charts import line_chart
from pipeline.config import Params, ParamsView, stage_params
from pipeline.parsing.data import annotated_subset
from pipeline.parsing.model import CHECKPOINT
from pipeline.parsing.report import parser_metrics, save_png, val_overlays
from pipeline.parsing.train import train_parser
from pipeline.threads import training_threads
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "parser", "shard.out_dir")
METRICS, REPORT = Path("metrics/parser.json"), Path("reports/parser.json")
HEADLINE = {"val_miou": "val.miou", "val_pixel_acc": "val.pixel_acc", "best_epoch": "best_epoch", "seconds": "seconds"}
PLOTS = Path("plots/parser")
OVERLAYS = Path("reports/parser_val_overlays.png")
CURVES = Path("reports/parser_curves.png")


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "train_parser", root / "params.yaml")
    cfg = params.parser
    history = []
    with stage_run("train_parser", params) as run:
        def on_epoch(epoch: int, row: dict) -> None:  # curves appear while training runs
            history.append(row)
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            atomic.write_csv(root / PLOTS / "loss.csv", history, ["epoch", "train_loss", "val_loss"], ".6g")
            atomic.write_csv(root / PLOTS / "miou.csv", history, ["epoch", "val_miou", "val_pixel_acc"], ".6g")

        train, val = annotated_subset(root / params.shard.out_dir, cfg.val_fraction, params.seed)
        print(f"train_parser: {len(train)} train / {len(val)} val annotated images")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with training_threads(cfg.num_workers, device):
            result = train_parser(cfg, train, val, params.seed, root / cfg.out_dir, device=device,
                                  show_progress=True, on_epoch=on_epoch)
        metrics = parser_metrics(result)
        atomic.write_json(root / REPORT, without_timings(metrics))
        atomic.write_json(root / METRICS, headline(metrics, HEADLINE))
        run.log_metrics(metrics)
        save_png(root / OVERLAYS, val_overlays(root / cfg.out_dir / CHECKPOINT, val))
        atomic.write_png(root / CURVES, line_chart(history, "epoch", ["train_loss", "val_loss", "val_miou"],
                                                   title="Part parser: loss and val mIoU per epoch",
                                                   x_label="epoch", y_label="loss (CE) / mIoU"))
        for path in (METRICS, REPORT, OVERLAYS, CURVES, PLOTS / "loss.csv", PLOTS / "miou.csv"):
            run.log_artifact(root / path)
    print(f"train_parser: val mIoU {metrics['val']['miou']:.4f} (epoch {metrics['best_epoch']}), "
          f"{metrics['seconds']:.0f} s")
    return metrics


if __name__ == "__main__":
    cli.run(main)
