"""``python -m pipeline.search index|query ...`` (console script ``pven-search``): see :mod:`pipeline.search`.

    python -m pipeline.search index data/masked --split gallery --out indexes/gallery
    python -m pipeline.search index photos/ --out indexes/photos          # parses every image first
    torchrun --nproc_per_node 4 -m pipeline.search index photos/ --out indexes/photos
    python -m pipeline.search query indexes/photos car1.jpg car2.jpg --top 10 --png ranked.png

Bad input (a missing model, an unreadable or grey image, an index of another model) ends
with ``error: <message naming the file>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, cli
from pipeline.constants import PART_NAMES
from pipeline.data.shards import fetch_samples
from pipeline.dist.env import init_distributed, shutdown
from pipeline.evaluation.features import FeatureSet
from pipeline.evaluation.topk import QUERY_TILE, attention_weights, nearest
from pipeline.search.encoder import BACKENDS, Encoder
from pipeline.search.images import read_image
from pipeline.search.index import build_index, check_compatible, index_blocks, keys_at, read_index
from pipeline.search.picture import ranked_html, ranked_png


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__.splitlines()[0])
    models = argparse.ArgumentParser(add_help=False)
    models.add_argument("--backend", choices=BACKENDS, default="torch")
    models.add_argument("--model", type=Path, default=Path("models/reid/model.pt"), help="torch: the PVEN model file")
    models.add_argument("--parser", type=Path, default=Path("models/parser/parser.pt"),
                        help="torch: the parser checkpoint")
    models.add_argument("--export-dir", type=Path, default=Path("models/export"),
                        help="onnx: the export stage's folder")
    models.add_argument("--batch-size", type=int, default=32)
    verbs = ap.add_subparsers(dest="verb", required=True)
    ix = verbs.add_parser("index", parents=[models], help="embed a folder of images or masked shards into an index")
    ix.add_argument("source", type=Path, help="a folder of images, or a masked shard folder (with manifest.json)")
    ix.add_argument("--out", type=Path, required=True, help="the index folder to write")
    ix.add_argument("--split", help="shards: the split to index (default gallery)")
    ix.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (listed in index.json)")
    q = verbs.add_parser("query", parents=[models], help="rank an index for new images")
    q.add_argument("index", type=Path)
    q.add_argument("images", type=Path, nargs="+")
    q.add_argument("--top", type=int, default=10)
    q.add_argument("--lam", type=float, help="weight of the local distance (default: the export's, or the variant's)")
    q.add_argument("--block-rows", type=int, default=65536, help="index rows ranked at a time (memory)")
    q.add_argument("--png", type=Path, help="write the ranked lists as a picture")
    q.add_argument("--html", type=Path, help="write the ranked lists as an HTML page")
    return ap


def _encoder(args: argparse.Namespace, need_parser: bool = True) -> Encoder:
    return Encoder.load(args.backend, model=args.model, parser=args.parser, export_dir=args.export_dir,
                        lam=getattr(args, "lam", None), need_parser=need_parser)


def run_index(args: argparse.Namespace) -> dict[str, Any] | None:
    shards = (args.source / "manifest.json").is_file()
    encoder = _encoder(args, need_parser=not shards)
    info = init_distributed()
    try:
        record = build_index(args.source, args.out, encoder, info, split=args.split, batch_size=args.batch_size,
                             skip_bad=args.skip_bad)
    finally:
        shutdown(info)
    if record is not None:
        print(json.dumps({"index": str(args.out), "count": record["count"], "skipped": len(record["skipped"]),
                          "backend": record["backend"], "source": record["source"]}))
    return record


def run_query(args: argparse.Namespace) -> dict[str, Any]:
    if args.top < 1 or args.block_rows < 1:
        raise cli.InputError(f"--top {args.top} / --block-rows {args.block_rows}: expected >= 1")
    record = read_index(args.index)
    encoder = _encoder(args)
    check_compatible(record, encoder, args.index)
    images = [read_image(path) for path in args.images]
    masks = encoder.masks(images)
    feats = encoder.features(images, masks)
    n = len(images)
    query = FeatureSet(np.full(n, -1), np.full(n, -1), feats["global"], feats["local"], feats["visibility"])
    dist, rows = nearest(query, index_blocks(args.index, args.block_rows), encoder.spec, args.top, QUERY_TILE)
    vis = np.load(args.index / "visibility.npy", mmap_mode="r")
    ids = np.load(args.index / "ids.npy", mmap_mode="r")
    keys = keys_at(args.index, {int(r) for r in rows.ravel()})
    out = {"index": str(args.index), "backend": encoder.backend, "variant": encoder.spec.variant,
           "lam": encoder.spec.lam_value, "queries": []}
    for qi, path in enumerate(args.images):
        weights = attention_weights(feats["visibility"][qi], vis[rows[qi]], encoder.spec)
        out["queries"].append({"image": str(path), "results": [
            {"rank": rank, "key": keys[int(r)], "distance": float(d), "id": int(ids[r]),
             "weights": {p: round(float(w), 6) for p, w in zip(PART_NAMES, wr)}}
            for rank, (r, d, wr) in enumerate(zip(rows[qi], dist[qi], weights), 1)]})
    print(json.dumps(out, indent=2))
    if args.png or args.html:
        pictured = _picture_rows(out, images, masks, record, encoder)
        if args.png:
            atomic.write_png(args.png, ranked_png(pictured, out["lam"], out["variant"]))
        if args.html:
            atomic.write_text(args.html, ranked_html(pictured, out["lam"], out["variant"]))
    return out


def _picture_rows(out: dict[str, Any], images: list[np.ndarray], masks: list[np.ndarray], record: dict[str, Any],
                  encoder: Encoder) -> list[dict[str, Any]]:
    """The result images with their masks: from the shards (stored masks) or re-read and parsed from the folder."""
    wanted = {x["key"] for q in out["queries"] for x in q["results"]}
    source = record["source"]
    if source["kind"] == "shards":
        found = fetch_samples(Path(source["root"]), source["split"], wanted)
    else:
        ordered = sorted(wanted)
        pics = [read_image(Path(source["root"]) / key) for key in ordered]
        found = dict(zip(ordered, zip(pics, encoder.masks(pics) if pics else [])))
    return [{"name": q["image"], "image": im, "mask": mk, "id": -1,
             "results": [{**x, "image": found[x["key"]][0], "mask": found[x["key"]][1]} for x in q["results"]]}
            for q, im, mk in zip(out["queries"], images, masks)]


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cli.run(lambda: run_index(args) if args.verb == "index" else run_query(args))


if __name__ == "__main__":
    main(sys.argv[1:])
