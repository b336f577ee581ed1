"""Masks stage library: output layout, predicted (never ground-truth) masks, corrupt images skipped and listed."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.shards import (
    ShardOptions,
    TrainStream,
    eval_pipeline,
    index_tar,
    read_manifest,
    shard_urls,
    write_shards,
    write_tar,
)
from pipeline.parsing.model import build_parser, save_checkpoint
from pipeline.parsing.predict import write_masked_shards
from pipeline.parsing.report import masks_sheet
from tests.test_shards import make_records

TINY_ENCODER = "tu-mobilenetv3_small_050"


def make_inputs(root: Path) -> tuple[Path, Path]:
    """Shards of tiny random images (half with a ground-truth mask) and an untrained parser checkpoint."""
    write_shards(make_records(root / "raw", n_train=8, n_query=4, n_gallery=6, size=(40, 32)),
                 root / "shards", ShardOptions(samples_per_shard=3, min_shards=2), seed=0)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "parser.pt", build_parser(TINY_ENCODER),
                           {"encoder": TINY_ENCODER, "image_size": 32, "classes": 5})
    return root / "shards", ckpt


def raw_samples(url: str) -> list[dict]:
    return list(eval_pipeline([url], map_fn=lambda s: s))


def corrupt_sample(shard: Path, index: int, ext: str = "jpg") -> str:
    """Replace the ``ext`` member of the index-th sample of a shard by bytes no decoder accepts; returns its key."""
    samples = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
               for s in raw_samples(str(shard))]
    samples[index][ext] = b"\xff\xd8\xff\xe0 this is neither a jpeg nor json"
    write_tar(shard, samples)
    return samples[index]["__key__"]


def test_one_output_shard_per_input_same_samples_with_predicted_masks(tmp_path):
    shards, ckpt = make_inputs(tmp_path)
    result = write_masked_shards(shards, tmp_path / "masked", ckpt, batch_size=2)
    out = tmp_path / "masked"
    src_manifest = read_manifest(shards)
    assert result["manifest"] == read_manifest(out)
    for split, info in src_manifest["splits"].items():
        assert [s["name"] for s in read_manifest(out)["splits"][split]["shards"]] == [s["name"] for s in info["shards"]]
        for url_in, url_out in zip(shard_urls(shards, split), shard_urls(out, split)):
            a, b = raw_samples(url_in), raw_samples(url_out)
            assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
            for x, y in zip(a, b):
                assert x["jpg"] == y["jpg"]
                meta = json.loads(y["json"])
                assert meta.pop("mask_source") == "parser" and meta == json.loads(x["json"])
                labels = np.array(Image.open(io.BytesIO(y["mask.png"])))
                assert labels.dtype == np.uint8 and labels.shape == (32, 40) and labels.max() < 5
                if "mask.png" in x:  # the ground truth is never copied (random labels: never equal)
                    assert x["mask.png"] != y["mask.png"]
    assert read_manifest(out)["splits"]["train"]["samples"] == 8
    assert read_manifest(out)["splits"]["train"]["identities"] == 5
    metrics = result["metrics"]
    assert metrics["images"] == 18 and metrics["skipped"] == 0
    assert metrics["heldout_truth"]["images"] == 5  # query 2 + gallery 3 ground-truth masks, train excluded
    assert 0.0 <= metrics["splits"]["query"]["visible"]["front"] <= 1.0
    # The folder reads like any shard folder.
    stream = TrainStream(shard_urls(out, "train"), batch_size=4, batches_per_epoch=2, seed=0)
    assert all(s["mask"] is not None for batch in stream.epoch(0) for s in batch)
    assert masks_sheet(out, shards, count=3).shape[2] == 3
    assert not list(tmp_path.glob(".masked*")), "staging folder swapped in, nothing left behind"


@pytest.mark.parametrize("ext", ["jpg", "json"])
def test_corrupt_sample_is_skipped_and_listed(tmp_path, ext):
    shards, ckpt = make_inputs(tmp_path)
    bad = corrupt_sample(shards / "gallery-000000.tar", 1, ext)
    result = write_masked_shards(shards, tmp_path / "masked", ckpt, batch_size=4, mask_size=(16, 20))
    skipped = result["manifest"]["skipped"]
    assert len(skipped) == 1 and skipped[0]["key"] == bad and skipped[0]["split"] == "gallery"
    assert skipped[0]["shard"] == "gallery-000000.tar" and "Error" in skipped[0]["reason"]
    keys_in = [k for k, _ in index_tar(shards / "gallery-000000.tar")]
    keys_out = [k for k, _ in index_tar(tmp_path / "masked" / "gallery-000000.tar")]
    assert keys_out == [k for k in keys_in if k != bad]
    assert result["metrics"]["skipped"] == 1 and result["metrics"]["splits"]["gallery"]["skipped"] == 1
    assert result["manifest"]["splits"]["gallery"]["samples"] == 5
    sample = raw_samples(str(tmp_path / "masked" / "gallery-000000.tar"))[0]
    assert Image.open(io.BytesIO(sample["mask.png"])).size == (20, 16)  # masks.mask_size = [16, 20]


def test_checkpoint_logit_bias_is_applied(tmp_path):
    shards, _ = make_inputs(tmp_path)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "biased.pt", build_parser(TINY_ENCODER),
                           {"encoder": TINY_ENCODER, "image_size": 32, "classes": 5,
                            "logit_bias": [-1e4, -1e4, 1e4, -1e4, -1e4]})
    write_masked_shards(shards, tmp_path / "masked", ckpt)
    sample = raw_samples(str(tmp_path / "masked" / "query-000000.tar"))[0]
    assert np.unique(np.array(Image.open(io.BytesIO(sample["mask.png"])))).tolist() == [2]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    shards, _ = make_inputs(tmp_path)
    with pytest.raises(Exception, match="no parser checkpoint"):
        write_masked_shards(shards, tmp_path / "masked", tmp_path / "none.pt")
    assert not list(tmp_path.glob("*masked*"))


def test_labels_source_writes_each_images_own_label_map_and_refuses_unlabelled_images(tmp_path):
    shards, ckpt = make_inputs(tmp_path)
    # Half of the images have a label: the ablation refuses to invent the others' masks.
    with pytest.raises(Exception, match=r"masks.source=labels: .* has no label mask.png"):
        write_masked_shards(shards, tmp_path / "masked", ckpt, batch_size=2, source="labels")
    assert not (tmp_path / "masked").exists(), "nothing written on error"
    # Give every image a label, then the output carries exactly those labels.
    for split in ("train", "query", "gallery"):
        for url in shard_urls(shards, split):
            samples = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                       for s in raw_samples(url)]
            for i, s in enumerate(samples):
                if "mask.png" not in s:
                    labels = np.full((32, 40), i % 5, dtype=np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(labels, "L").save(buf, format="PNG")
                    s["mask.png"] = buf.getvalue()
            write_tar(Path(url), samples)
    result = write_masked_shards(shards, tmp_path / "masked", ckpt, batch_size=2, source="labels")
    assert result["manifest"]["mask_source"] == "labels"
    for split in ("train", "query", "gallery"):
        for url_in, url_out in zip(shard_urls(shards, split), shard_urls(tmp_path / "masked", split)):
            for x, y in zip(raw_samples(url_in), raw_samples(url_out)):
                assert json.loads(y["json"])["mask_source"] == "labels"
                truth = np.array(Image.open(io.BytesIO(x["mask.png"])))
                assert np.array_equal(np.array(Image.open(io.BytesIO(y["mask.png"]))), truth)
    assert result["metrics"]["heldout_truth"]["miou"] == 1.0
