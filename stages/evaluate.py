"""evaluate stage: embed query and gallery with the trained PVEN, rank exactly, report and draw.

    dvc repro evaluate
    torchrun --standalone --nproc_per_node 2 stages/evaluate.py   # ranks split the embedding work

Reads params ``seed``, ``data.source``, ``data.test_subset``, ``masks.out_dir``,
``reid.out_dir`` and ``eval``. Every rank embeds its shards of the masked splits; rank 0
saves ``embeddings/<split>/``, ranks the held-out validation identities (``val_query`` vs
``val_gallery``, when ``data.val_ids`` made them) with every λ of the scan and takes the
best one for ``eval.lam: val`` (``plots/lam_scan.csv``, ``reports/lam_scan.png``), then
scores the test embeddings three ways (the inference-side ablation): global only (D_g),
local only (D_l) and PVEN (D_g + lam D_l), with the dataset's protocol, with ``eval.bootstrap``
query-identity resamples for 95% intervals and the paired differences PVEN - global / PVEN - local (docs/method.md §9).
Writes ``metrics/eval.json`` (headline: at most 8 numbers), ``metrics/eval_intervals.json``
(the other headline intervals and the paired differences), ``reports/eval.json`` (all of
it, with the cross-view table when the images know their azimuth), ``reports/eval_queries.csv``
(per query and mode: AP and first rank), ``plots/cmc.csv`` + ``reports/cmc.png``,
``plots/crossview.csv`` + ``reports/crossview.png`` (mAP per azimuth-difference bin; no
rows without views) and ranked-list pictures ``reports/ranked_first.png`` /
``reports/ranked_worst.png`` (ranked by the PVEN distance itself: with ``eval.rerank`` the
metrics are re-ranked, the pictures are not).
"""
import functools
from pathlib import Path

from pipeline import atomic, cli
from pipeline.config import Params, ParamsView, stage_params
from pipeline.data.records import held_out_pair
from pipeline.data.shards import fetch_samples, read_manifest
from pipeline.dist.env import init_distributed, shutdown
from pipeline.evaluation.features import load_features
from pipeline.evaluation.report import (
    CROSSVIEW_COLUMNS,
    LAM_COLUMNS,
    QUERY_COLUMNS,
    choose_lambda,
    cmc_chart,
    crossview_chart,
    lam_chart,
    ranked_pictures,
    score,
)
from pipeline.reid.distance import spec_for
from pipeline.reid.embed import extract_split, model_forward
from pipeline.reid.model import MODEL_FILE, load_model
from pipeline.tracking import headline, stage_run, without_timings

PARAMS = ("seed", "data.source", "data.test_subset", "masks.out_dir", "reid.out_dir", "eval")
EMBEDDINGS = Path("embeddings")
METRICS, REPORT = Path("metrics/eval.json"), Path("reports/eval.json")
HEADLINE = {"mAP": "pven.mAP", "mAP_lo": "pven.mAP_lo", "mAP_hi": "pven.mAP_hi", "rank1": "pven.rank1",
            "mINP": "pven.mINP", "mAP_global": "global.mAP", "mAP_local": "local.mAP", "lam": "lam.chosen"}
# the other headline numbers' intervals and the paired difference PVEN - global (dvc metrics diff)
INTERVALS_FILE = Path("metrics/eval_intervals.json")
INTERVALS = {"rank1_lo": "pven.rank1_lo", "rank1_hi": "pven.rank1_hi", "rank5": "pven.rank5",
             "rank5_lo": "pven.rank5_lo", "rank5_hi": "pven.rank5_hi",
             "mINP_lo": "pven.mINP_lo", "mINP_hi": "pven.mINP_hi",
             "mAP_global_lo": "global.mAP_lo", "mAP_global_hi": "global.mAP_hi",
             "mAP_local_lo": "local.mAP_lo", "mAP_local_hi": "local.mAP_hi",
             **{f"{m}_pven_minus_global{end}": f"differences.pven_minus_global.{m}{end}"
                for m in ("mAP", "rank1") for end in ("", "_lo", "_hi")}}
CMC, CMC_PNG = Path("plots/cmc.csv"), Path("reports/cmc.png")
CROSSVIEW, CROSSVIEW_PNG = Path("plots/crossview.csv"), Path("reports/crossview.png")
QUERIES = Path("reports/eval_queries.csv")
LAM_SCAN, LAM_PNG = Path("plots/lam_scan.csv"), Path("reports/lam_scan.png")


def main(params: Params | ParamsView | None = None, root: str | Path = ".") -> dict | None:
    """Run the stage in ``root`` (the project folder; params paths are relative to it); rank 0 returns the metrics."""
    root = Path(root)
    params = stage_params(params, PARAMS, "evaluate", root / "params.yaml")
    cfg, source, masked = params.eval, params.data.source, root / params.masks.out_dir
    info = init_distributed()
    model, meta = load_model(root / params.reid.out_dir / MODEL_FILE, info.device)
    splits = ["test"] if source == "vehicleid" else ["query", "gallery"]
    val = list(held_out_pair(read_manifest(masked)["splits"]) or ())   # held-out ids (data.val_ids)
    try:
        with stage_run("evaluate", params) as run:
            for split in splits + val:
                extract_split(model_forward(model), masked, split, root / EMBEDDINGS, info,
                              size=tuple(meta["image_size"]), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
            if not info.is_main:
                return None
            sets = {split: load_features(root / EMBEDDINGS / split) for split in splits}
            validation = tuple(load_features(root / EMBEDDINGS / split)[0] for split in val) if val else None
            base, lam, lam_rows = choose_lambda(spec_for(meta.get("distance", {"variant": meta["variant"]})),
                                                cfg.lam, validation)
            scores = score(sets, cfg, source=source, test_subset=params.data.test_subset, seed=params.seed, base=base)
            scores.metrics["lam"] = lam
            atomic.write_json(root / REPORT, without_timings(scores.metrics))
            atomic.write_json(root / METRICS, headline(scores.metrics, HEADLINE))
            atomic.write_json(root / INTERVALS_FILE, headline(scores.metrics, INTERVALS))
            atomic.write_csv(root / QUERIES, scores.queries, QUERY_COLUMNS)
            atomic.write_csv(root / CMC, scores.cmc, number_format="g")
            atomic.write_png(root / CMC_PNG, cmc_chart(scores.cmc))
            atomic.write_csv(root / CROSSVIEW, scores.crossview, CROSSVIEW_COLUMNS, number_format="g")
            atomic.write_png(root / CROSSVIEW_PNG, crossview_chart(scores.crossview))
            atomic.write_csv(root / LAM_SCAN, lam_rows, LAM_COLUMNS, number_format="g")
            atomic.write_png(root / LAM_PNG, lam_chart(lam_rows, lam["chosen"]))
            run.log_metrics(scores.metrics)
            pictures = {} if source == "vehicleid" or cfg.grid_queries == 0 else ranked_pictures(
                sets, scores, cfg.grid_queries, functools.partial(fetch_samples, masked))
            ranked = {Path(f"reports/ranked_{name}.png"): image for name, image in pictures.items()}
            for path, image in ranked.items():
                atomic.write_png(root / path, image)
            for path in (METRICS, INTERVALS_FILE, REPORT, QUERIES, CMC, CMC_PNG, CROSSVIEW, CROSSVIEW_PNG, LAM_SCAN,
                         LAM_PNG, *ranked):
                run.log_artifact(root / path)
            print(f"evaluate: {scores.metrics}")
            return scores.metrics
    finally:
        shutdown(info)


if __name__ == "__main__":
    cli.run_stage(main)
