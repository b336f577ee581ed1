"""export stage: the trained PVEN and parser as ONNX graphs, their parity, MLflow logged models.

    dvc repro export
    python stages/export.py                      # the same, by hand (one process)

Reads params ``seed``, ``data.source``, ``data.test_subset``, ``masks.out_dir``,
``parser.out_dir``, ``reid.out_dir``, ``eval`` and ``export``. Writes ``export.out_dir``
(``pven.onnx``, ``parser.onnx``, ``preprocessing.json``: :mod:`pipeline.export.graphs`),
``metrics/export.json`` and ``reports/export.json``:

* parity: onnxruntime against torch eager on ``export.parity_images`` held-out query images
  (features of the PVEN, logits and labels of the parser); above ``export.tolerance`` the
  stage fails, after writing its report;
* rankings: the query and gallery (VehicleID: test) embedded through ``pven.onnx`` and
  scored as the evaluate stage scores its own embeddings (same protocol, λ and blocks):
  the three modes' mAP next to the evaluate stage's (``reports/eval.json``), and their
  difference;
* both graphs logged to the stage's MLflow run as logged models (``name=pven`` /
  ``name=parser``, with signature and input example); their URIs (``models:/m-...``) are
  printed and set as the run's tags ``model_uri.pven`` / ``model_uri.parser``.
"""
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic, cli
from pipeline.config import Params, ParamsView, stage_params
from pipeline.dist.checkpoint import file_sha256
from pipeline.dist.env import SINGLE
from pipeline.evaluation.features import load_features
from pipeline.evaluation.protocols import evaluate_protocol
from pipeline.evaluation.report import protocol_kwargs
from pipeline.evaluation.spec import MODES
from pipeline.export.check import held_out_samples, parser_parity, reid_parity
from pipeline.export.graphs import (
    PARSER_FILE,
    PREPROCESSING_FILE,
    REID_FILE,
    ParserGraph,
    ReidGraph,
    export_onnx,
    preprocessing,
)
from pipeline.export.runtime import OnnxReid
from pipeline.parsing.model import CHECKPOINT, load_checkpoint, logit_bias
from pipeline.reid.data import collate, prepare
from pipeline.reid.distance import spec_for
from pipeline.reid.embed import extract_split
from pipeline.reid.model import MODEL_FILE, load_model
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "data.source", "data.test_subset", "masks.out_dir", "parser.out_dir", "reid.out_dir", "eval",
          "export")
METRICS, REPORT, EVAL_REPORT = Path("metrics/export.json"), Path("reports/export.json"), Path("reports/eval.json")
HEADLINE = {"reid_max_rel_diff": "parity.reid.max", "parser_max_rel_diff": "parity.parser.logits",
            "parser_label_agreement": "parity.parser.label_agreement", "mAP_onnx": "rankings.pven.mAP_onnx",
            "mAP_diff": "rankings.max_abs_mAP_diff"}


class ParityError(RuntimeError):
    """The exported graphs do not compute what the torch models compute (within export.tolerance)."""


def _signatures(size: tuple[int, int], parser_size: int, feat_dim: int):
    """MLflow tensor signatures with a free batch axis (-1)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    h, w = size
    u8, f32 = np.dtype(np.uint8), np.dtype(np.float32)
    reid = ModelSignature(Schema([TensorSpec(u8, (-1, 3, h, w), "images"), TensorSpec(u8, (-1, h, w), "masks")]),
                          Schema([TensorSpec(f32, (-1, feat_dim), "global"),
                                  TensorSpec(f32, (-1, 4, feat_dim), "local"), TensorSpec(f32, (-1, 4), "visibility")]))
    parser = ModelSignature(Schema([TensorSpec(u8, (-1, 3, parser_size, parser_size), "images")]),
                            Schema([TensorSpec(f32, (-1, 5, parser_size, parser_size), "logits")]))
    return reid, parser


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "export", root / "params.yaml")
    cfg, source, masked = params.export, params.data.source, root / params.masks.out_dir
    torch.manual_seed(params.seed)
    model_path, parser_path = root / params.reid.out_dir / MODEL_FILE, root / params.parser.out_dir / CHECKPOINT
    model, meta = load_model(model_path)
    parser, parser_config, _ = load_checkpoint(parser_path)
    bias, size, parser_size = logit_bias(parser_config), tuple(meta["image_size"]), int(parser_config["image_size"])
    evaluated = json.loads((root / EVAL_REPORT).read_text())
    base = spec_for(meta.get("distance", {"variant": meta["variant"]}), lam=float(evaluated["lam"]["chosen"]))
    splits = ["test"] if source == "vehicleid" else ["query", "gallery"]
    out_dir = root / cfg.out_dir
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with stage_run("export", params) as run:
        samples = held_out_samples(masked, splits[0], cfg.parity_images)
        example = collate_example(samples, size)
        export_onnx(ReidGraph(model), example, staging / REID_FILE, ["images", "masks"], ["global", "local",
                                                                                          "visibility"])
        export_onnx(ParserGraph(parser, bias), (torch.zeros(2, 3, parser_size, parser_size, dtype=torch.uint8),),
                    staging / PARSER_FILE, ["images"], ["logits"])
        record = preprocessing(meta, parser_config, lam=base.lam_value, reid_sha256=file_sha256(model_path),
                               parser_sha256=file_sha256(parser_path))
        atomic.write_json(staging / PREPROCESSING_FILE, record)
        parity = {"images": len(samples), "split": splits[0], "tolerance": cfg.tolerance,
                  "reid": reid_parity(model, staging / REID_FILE, samples, size, cfg.batch_size),
                  "parser": parser_parity(parser, bias, staging / PARSER_FILE, samples, parser_size, cfg.batch_size)}
        rankings = onnx_rankings(staging / REID_FILE, masked, splits, params, base, size, evaluated)
        atomic.swap_dir(staging, out_dir)
        reid_sig, parser_sig = _signatures(size, parser_size, int(meta["feat_dim"]))
        images, masks = (t.numpy() for t in example)
        uris = {"pven": run.log_onnx_model(out_dir / REID_FILE, "pven", reid_sig, {"images": images, "masks": masks}),
                "parser": run.log_onnx_model(out_dir / PARSER_FILE, "parser", parser_sig,
                                             {"images": np.zeros((1, 3, parser_size, parser_size), np.uint8)})}
        run.set_tags({f"model_uri.{name}": uri for name, uri in uris.items() if uri})
        # The report holds no URI (a model id is new on every run, the report must not change).
        report = {"parity": parity, "rankings": rankings, "logged_models": sorted(n for n, u in uris.items() if u),
                  "files": {name: (out_dir / name).stat().st_size for name in (REID_FILE, PARSER_FILE)}}
        atomic.write_json(root / REPORT, without_timings(report))
        atomic.write_json(root / METRICS, headline(report, HEADLINE))
        run.log_metrics({"parity": parity, "rankings": rankings})
        for path in (root / METRICS, root / REPORT, out_dir / PREPROCESSING_FILE):
            run.log_artifact(path)
        worst = max(parity["reid"]["max"], parity["parser"]["logits"])
        if worst > cfg.tolerance:
            raise ParityError(f"export: onnxruntime differs from torch eager by {worst:.3g} (relative), above "
                              f"export.tolerance {cfg.tolerance:g}: see {REPORT}")
    print(f"export: {headline(report, HEADLINE)}; models {uris}")
    return report


def collate_example(samples: list[dict], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two held-out samples as the export's example inputs (uint8 images (2, 3, H, W), masks (2, H, W))."""
    batch = collate([prepare(s, size) for s in samples[:2]])
    return batch["images"], batch["masks"]


def onnx_rankings(onnx_path: Path, masked: Path, splits: list[str], params, base, size, evaluated: dict) -> dict:
    """The three modes' mAP of the ONNX embeddings, beside the evaluate stage's, and the largest difference."""
    forward = OnnxReid(onnx_path)
    with tempfile.TemporaryDirectory(prefix="pven-export-") as tmp:
        for split in splits:
            extract_split(forward, masked, split, Path(tmp), SINGLE, size=size, batch_size=params.export.batch_size)
        sets = {split: load_features(Path(tmp) / split) for split in splits}
        kwargs = protocol_kwargs(params.eval, params.data.source, params.data.test_subset, params.seed, sets)
        out = {}
        for mode in MODES:
            got = evaluate_protocol(params.data.source, dataclasses.replace(base, mode=mode), **kwargs).summary()
            want = evaluated[mode]["mAP"]
            out[mode] = {"mAP_onnx": got["mAP"], "mAP_torch": want, "mAP_diff": got["mAP"] - want,
                         "rank1_onnx": got.get("rank1")}
    out["max_abs_mAP_diff"] = max(abs(out[m]["mAP_diff"]) for m in MODES)
    out["lam"] = base.lam_value
    return out


if __name__ == "__main__":
    cli.run_stage(main)
