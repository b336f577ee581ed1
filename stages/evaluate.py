"""evaluate stage: embed query and gallery with the trained PVEN, rank exactly, report and draw.

    dvc repro evaluate
    torchrun --standalone --nproc_per_node 2 stages/evaluate.py   # ranks split the embedding work

Reads params ``seed``, ``data`` (source, test_subset), ``masks.out_dir``, ``reid.out_dir``
and ``eval``. Every rank embeds its shards of the masked splits; rank 0 saves
``embeddings/<split>/`` and scores the same embeddings three ways (the inference-side
ablation): global only (D_g), local only (D_l) and PVEN (D_g + lam D_l), with the
dataset's protocol. Writes ``metrics/eval.json``, ``plots/cmc.csv`` and ranked-list
pictures ``reports/ranked_first.png`` / ``reports/ranked_worst.png`` (ranked by the PVEN
distance itself: with ``eval.rerank`` the metrics are re-ranked, the pictures are not).
"""
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import load_params
from pipeline.dist.env import init_distributed, shutdown
from pipeline.evaluation import MODES, DistanceSpec, RerankConfig, evaluate_protocol
from pipeline.evaluation.extract import extract_split, load_features
from pipeline.evaluation.report import cmc_rows, fetch_images, ranked_lists
from pipeline.reid.model import load_model
from pipeline.reid.train import MODEL_FILE
from pipeline.tracking import stage_run
from pipeline.viz import ranked_grid

EMBEDDINGS = Path("embeddings")
METRICS = Path("metrics/eval.json")
CMC = Path("plots/cmc.csv")


def main() -> None:
    params = load_params("params.yaml")
    cfg, source = params.eval, params.data.source
    info = init_distributed()
    model, meta = load_model(Path(params.reid.out_dir) / MODEL_FILE, info.device)
    masked = Path(params.masks.out_dir)
    splits = ["test"] if source == "vehicleid" else ["query", "gallery"]
    with stage_run("evaluate", params, ["seed", "data", "masks", "reid", "eval"]) as run:
        for split in splits:
            extract_split(model, masked, split, EMBEDDINGS, info, size=tuple(meta["image_size"]),
                          batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        if info.is_main:
            report = score(params, meta["variant"], splits)
            atomic.write_json(METRICS, report["metrics"])
            atomic.write_text(CMC, _csv(report["cmc"]))
            run.log_metrics(report["metrics"])
            for path in (METRICS, CMC, *report["pictures"]):
                run.log_artifact(path)
            print(f"evaluate: {report['metrics']}")
    shutdown(info)


def score(params, variant: str, splits: list[str]) -> dict:
    cfg, source = params.eval, params.data.source
    sets = {split: load_features(EMBEDDINGS / split) for split in splits}
    rerank = RerankConfig(cfg.k1, cfg.k2, cfg.rerank_lambda) if cfg.rerank else None
    kwargs = dict(q_block=cfg.query_block, g_block=cfg.gallery_block, rerank=rerank)
    if source == "vehicleid":
        kwargs.update(test=sets["test"][0], repeats=cfg.vehicleid_repeats, seed=params.seed)
    else:
        kwargs.update(query=sets["query"][0], gallery=sets["gallery"][0])
    if source == "veriwild":
        kwargs.update(subset=params.data.test_subset, remove_junk=cfg.remove_junk)
    metrics, curves, results = {}, {}, {}
    for mode in MODES:
        spec = DistanceSpec(mode=mode, variant=variant, lam=cfg.lam)
        result = evaluate_protocol(source, spec, **kwargs)
        metrics[mode] = result.summary()
        curves[mode] = result.metrics.cmc
        results[mode] = result
    metrics["protocol"] = results["pven"].description
    metrics["variant"] = variant
    pictures = []
    if source != "vehicleid" and cfg.grid_queries > 0:
        spec = DistanceSpec(mode="pven", variant=variant, lam=cfg.lam)
        shown = results["pven"]
        if rerank is not None:  # the pictures rank by the PVEN distance itself: pick and title by its APs
            shown = evaluate_protocol(source, spec, **{**kwargs, "rerank": None})
        pictures = draw_ranked(params, sets, shown.metrics, spec, shown.remove_junk)
    return {"metrics": metrics, "cmc": cmc_rows(curves), "pictures": pictures}


def draw_ranked(params, sets, metrics, spec, remove_junk) -> list[Path]:
    """Ranked lists of the first and the worst (lowest AP) queries, with view masks and weights."""
    (query, q_keys), (gallery, g_keys) = sets["query"], sets["gallery"]
    n = params.eval.grid_queries
    scored = np.flatnonzero(~np.isnan(metrics.ap))
    picks = {"first": scored[:n].tolist(), "worst": scored[np.argsort(metrics.ap[scored], kind="stable")[:n]].tolist()}
    lists = {name: ranked_lists(query, gallery, p, spec, remove_junk) for name, p in picks.items()}
    masked = Path(params.masks.out_dir)
    q_img = fetch_images(masked, "query", {q_keys[i] for p in picks.values() for i in p})
    g_img = fetch_images(masked, "gallery", {g_keys[j] for ls in lists.values() for r in ls for j in r["gallery"]})
    paths = []
    for name, ranked in lists.items():
        rows = [{"title": f"query {q_keys[r['query']]} (id {query.ids[r['query']]}) "
                          f"AP {metrics.ap[r['query']]:.2f}",
                 "query": q_img[q_keys[r["query"]]],
                 "ranked": [(*g_img[g_keys[j]], ok, w, d) for j, ok, w, d in
                            zip(r["gallery"], r["correct"], r["weights"], r["distance"])]}
                for r in ranked]
        path = Path(f"reports/ranked_{name}.png")
        with atomic.replacing(path) as tmp:
            ranked_grid(rows).save(tmp, format="PNG")
        paths.append(path)
    return paths


def _csv(rows: list[dict]) -> str:
    header = list(rows[0])
    return ",".join(header) + "\n" + "".join(",".join(f"{r[h]:g}" for h in header) + "\n" for r in rows)


if __name__ == "__main__":
    main()
