"""Shard writing and the readers later stages use (single process; 2-rank tests in test_shards_dist.py)."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.records import Record
from pipeline.data.shards import (
    ShardError,
    ShardOptions,
    TrainStream,
    eval_pipeline,
    read_manifest,
    shard_urls,
    write_shards,
)
from pipeline.dist.env import DistInfo


def make_records(root: Path, n_train=20, n_query=4, n_gallery=10, size=(40, 32), labels=True):
    """Tiny JPEGs (+ label PNGs for every other image) as the dataset readers would list them."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_train), ("query", n_query), ("gallery", n_gallery)):
        folder = root / split
        folder.mkdir(parents=True)
        recs = []
        for i in range(n):
            vid, cam = i % 5 + (0 if split == "train" else 100), i % 3
            key = f"{vid:04d}_c{cam:03d}_{i:08d}_0"
            img = folder / f"{key}.jpg"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(img)
            label = None
            if labels and i % 2 == 0:
                label = img.with_suffix(".png")
                Image.fromarray(rng.integers(0, 5, (size[1], size[0]), dtype=np.uint8), "L").save(label)
            recs.append(Record(key, img, vid, cam, split, label, {"azimuth_deg": float(i)}))
        splits[split] = recs
    return splits


OPTS = ShardOptions(samples_per_shard=6, min_shards=2)


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_manifest_counts_hashes_and_sample_layout(tmp_path):
    splits = make_records(tmp_path / "raw")
    manifest = write_shards(splits, tmp_path / "shards", OPTS, seed=0)
    assert read_manifest(tmp_path / "shards") == manifest
    train = manifest["splits"]["train"]
    assert train["samples"] == 20 and train["identities"] == 5 and train["cameras"] == 3
    assert train["labels"] == 10
    assert len(train["shards"]) == 4  # ceil(20 / 6)
    assert sum(s["samples"] for s in train["shards"]) == 20
    assert len(manifest["splits"]["query"]["shards"]) == 2  # min_shards beats 4 / 6
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            data = (tmp_path / "shards" / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    names = tar_members(tmp_path / "shards" / "gallery-000000.tar")
    assert "0100_c000_00000000_0.jpg" in names and "0100_c000_00000000_0.mask.png" in names
    assert "0101_c001_00000001_0.json" in names and "0101_c001_00000001_0.mask.png" not in names
    assert not list((tmp_path).glob("**/*.tmp*")), "no temporary files left behind"


def test_train_split_is_shuffled_deterministically_others_keep_order(tmp_path):
    splits = make_records(tmp_path / "raw")
    a = write_shards(splits, tmp_path / "a", OPTS, seed=1)
    b = write_shards(splits, tmp_path / "b", OPTS, seed=1)
    c = write_shards(splits, tmp_path / "c", OPTS, seed=2)

    def hashes(m):
        return [s["sha256"] for s in m["splits"]["train"]["shards"]]
    assert hashes(a) == hashes(b) != hashes(c)
    keys = [s["key"] for s in eval_pipeline(shard_urls(tmp_path / "a", "train"))]
    assert sorted(keys) == sorted(r.key for r in splits["train"]) and keys != [r.key for r in splits["train"]]
    gallery = [s["key"] for s in eval_pipeline(shard_urls(tmp_path / "a", "gallery"))]
    assert gallery == [r.key for r in splits["gallery"]]


def test_decoded_sample_has_image_mask_and_meta(tmp_path):
    splits = make_records(tmp_path / "raw")
    write_shards(splits, tmp_path / "s", OPTS, seed=0)
    sample = next(iter(eval_pipeline(shard_urls(tmp_path / "s", "query"))))
    rec = splits["query"][0]
    assert sample["key"] == rec.key
    assert sample["image"].shape == (32, 40, 3) and sample["image"].dtype == np.uint8
    assert sample["mask"].shape == (32, 40)  # single channel, not RGB
    assert np.array_equal(sample["mask"], np.asarray(Image.open(rec.label)))
    meta = sample["meta"]
    assert (meta["vid"], meta["camera"], meta["split"], meta["source_key"]) == (rec.vid, rec.camera, "query", rec.key)
    assert meta["view"] == {"azimuth_deg": 0.0}


def test_resize_stores_training_resolution_and_nearest_masks(tmp_path):
    splits = make_records(tmp_path / "raw")
    opts = ShardOptions(samples_per_shard=6, min_shards=2, resize=(16, 20), keep_originals=True)
    write_shards(splits, tmp_path / "s", opts, seed=0)
    sample = next(iter(eval_pipeline(shard_urls(tmp_path / "s", "query"), map_fn=lambda s: s)))
    assert Image.open(__import__("io").BytesIO(sample["jpg"])).size == (20, 16)
    mask = np.asarray(Image.open(__import__("io").BytesIO(sample["mask.png"])))
    assert mask.shape == (16, 20) and set(np.unique(mask)) <= set(range(5))
    assert sample["orig.jpg"] == splits["query"][0].image.read_bytes()
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["orig_width"], meta["orig_height"]) == (20, 16, 40, 32)


def test_corrupt_image_is_skipped_and_listed_or_fatal_when_strict(tmp_path):
    splits = make_records(tmp_path / "raw")
    bad = splits["train"][3]
    bad.image.write_bytes(bad.image.read_bytes()[:100])  # truncated JPEG
    manifest = write_shards(splits, tmp_path / "s", OPTS, seed=0, workers=2)
    assert manifest["splits"]["train"]["samples"] == 19
    [skipped] = manifest["skipped"]
    assert skipped["key"] == bad.key and skipped["image"] == str(bad.image) and "OSError" in skipped["reason"]
    assert skipped["reason"].startswith("truncated file")

    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(ShardError, match=f"{bad.image}.*strict"):
        write_shards(splits, tmp_path / "s", ShardOptions(6, 2, strict=True), seed=0)
    after = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    assert after == before, "a failed run must leave the previous output untouched"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_skip_reasons_name_empty_and_garbage_files_and_the_manifest_is_byte_stable(tmp_path):
    splits = make_records(tmp_path / "raw")
    empty, garbage = splits["train"][1], splits["train"][2]
    empty.image.write_bytes(b"")
    garbage.image.write_bytes(b"not an image at all")
    one = write_shards(splits, tmp_path / "a", OPTS, seed=0)
    reasons = {s["key"]: s["reason"] for s in one["skipped"]}
    assert reasons[empty.key] == "empty file (0 bytes)"
    assert reasons[garbage.key].startswith("not decodable (UnidentifiedImageError")
    assert " at 0x" not in reasons[garbage.key]
    write_shards(splits, tmp_path / "b", OPTS, seed=0)
    # no timings, no memory addresses: the same inputs give the same manifest bytes
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()



def test_bad_label_is_reported_with_its_path(tmp_path):
    splits = make_records(tmp_path / "raw")
    label = splits["gallery"][0].label
    Image.fromarray(np.full((32, 40), 9, np.uint8), "L").save(label)
    manifest = write_shards(splits, tmp_path / "s", OPTS, seed=0)
    [skipped] = manifest["skipped"]
    assert str(label) in skipped["reason"] and "expected labels 0..4" in skipped["reason"]


def test_workers_do_not_change_the_output(tmp_path):
    splits = make_records(tmp_path / "raw")
    one = write_shards(splits, tmp_path / "one", OPTS, seed=0, workers=1)
    two = write_shards(splits, tmp_path / "two", OPTS, seed=0, workers=2)
    assert one["splits"] == two["splits"]


def test_eval_pipeline_partitions_samples_across_ranks(tmp_path):
    splits = make_records(tmp_path / "raw")
    write_shards(splits, tmp_path / "s", OPTS, seed=0)
    urls = shard_urls(tmp_path / "s", "train")
    per_rank = [[s["key"] for s in eval_pipeline(urls, info=rank_info(r, 2))] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(r.key for r in splits["train"])
    assert rank_info(1, 3).share(urls) == [urls[1]]  # the one rule: items[rank::world_size]
    with pytest.raises(ValueError, match="only 4 shards"):
        eval_pipeline(urls, info=rank_info(0, 5))


def rank_info(rank: int, world_size: int) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=0, device=torch.device("cpu"), owns_group=False)


def test_train_stream_fixed_batches_reproducible_per_seed_epoch_rank(tmp_path):
    splits = make_records(tmp_path / "raw")
    write_shards(splits, tmp_path / "s", OPTS, seed=0)
    urls = shard_urls(tmp_path / "s", "train")

    def keys(epoch, rank=0, workers=0):
        stream = TrainStream(urls, batch_size=4, batches_per_epoch=7, seed=3, rank=rank,
                             num_workers=workers, shuffle_buffer=8)
        return [[s["key"] for s in batch] for batch in stream.epoch(epoch)]

    first = keys(0)
    assert len(first) == 7 and all(len(b) == 4 for b in first)  # 28 samples > 20: resampled
    assert keys(0) == first
    assert keys(1) != first and keys(0, rank=1) != first
    assert len(keys(0, workers=2)) == 7
    assert keys(0, workers=2) == keys(0, workers=2)


def test_palette_label_is_read_by_index_not_by_colour(tmp_path):
    splits = make_records(tmp_path / "raw")
    label = splits["gallery"][0].label
    labels = np.zeros((32, 40), np.uint8)
    labels[4:12, 5:30], labels[14:20, 5:30], labels[22:30, 5:30] = 1, 3, 4
    coloured = Image.fromarray(labels, "P")
    coloured.putpalette([0, 0, 0, 230, 40, 60, 40, 190, 80, 30, 120, 230, 250, 210, 30] + [0] * (256 - 5) * 3)
    coloured.save(label)  # how annotation tools often save: class index + display colour
    manifest = write_shards(splits, tmp_path / "s", OPTS, seed=0)
    assert manifest["skipped"] == []
    key = splits["gallery"][0].key
    sample = next(s for s in eval_pipeline(shard_urls(tmp_path / "s", "gallery")) if s["key"] == key)
    assert np.array_equal(sample["mask"], labels)
