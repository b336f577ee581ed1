"""ReID data feeding: joint augmentation, P x K batches, masks required; plus the shard builder other ReID tests use."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.records import Record
from pipeline.data.shards import ShardOptions, TrainStream, shard_urls, write_shards
from pipeline.reid.data import EvalTransform, TrainTransform, augment, collate, prepare, read_vid
from pipeline.reid.sampling import PKBatcher


def vehicle(rng: np.random.Generator, colours: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A toy vehicle: side + front or back (+ top half the time) in the identity's part colours.

    Returns (image HxWx3 uint8, labels HxW uint8 0..4): learnable identities with true masks.
    """
    image = rng.integers(0, 60, (size, size, 3)).astype(np.int16)
    labels = np.zeros((size, size), np.uint8)
    top, mid, bottom = int(size * 0.2), int(size * 0.4), int(size * 0.85)
    if rng.random() < 0.5:
        labels[top:mid, size // 8:size - size // 8] = 4
    split = int(size * rng.uniform(0.3, 0.6))
    end = 1 if rng.random() < 0.5 else 2  # front or back visible
    left, right = (end, 3) if rng.random() < 0.5 else (3, end)
    labels[mid:bottom, :split] = left
    labels[mid:bottom, split:] = right
    for part in range(1, 5):
        region = labels == part
        image[region] = colours[part - 1] + rng.integers(-20, 21, (int(region.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def make_masked_shards(root: Path, n_train_ids=6, n_test_ids=3, per_id=4, size=32, seed=0,
                       samples_per_shard=8, min_shards=2) -> Path:
    """Shards in the masked-shard format (every sample has mask.png) at ``root/shards``.

    Train ids 0..n_train_ids-1; test ids start at 100, each with one query (camera 0)
    and per_id - 1 gallery images (cameras 1, 2, ...).
    """
    rng = np.random.default_rng(seed)
    splits: dict[str, list] = {"train": [], "query": [], "gallery": []}
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ids = [("train", v) for v in range(n_train_ids)] + [("test", 100 + v) for v in range(n_test_ids)]
    for kind, vid in ids:
        colours = rng.integers(60, 256, (4, 3))
        for i in range(per_id):
            split = "train" if kind == "train" else ("query" if i == 0 else "gallery")
            image, labels = vehicle(rng, colours, size)
            key = f"{vid:04d}_c{i:03d}_{i:04d}"
            Image.fromarray(image).save(raw / f"{key}.jpg", quality=95)
            Image.fromarray(labels, "L").save(raw / f"{key}.png")
            splits[split].append(Record(key, raw / f"{key}.jpg", vid, i, split, raw / f"{key}.png"))
    out = root / "shards"
    write_shards(splits, out, ShardOptions(samples_per_shard=samples_per_shard, min_shards=min_shards), seed=seed)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_masked_shards(tmp_path_factory.mktemp("reid_data"))


def _raw_samples(shard_dir):
    import webdataset as wds
    return list(wds.DataPipeline(wds.SimpleShardList(shard_urls(shard_dir, "train")), wds.tarfile_to_samples()))


def test_prepare_resizes_image_bilinear_and_mask_nearest(shards):
    sample = prepare(_raw_samples(shards)[0], (48, 40))
    assert sample["image"].shape == (48, 40, 3) and sample["image"].dtype == np.uint8
    assert sample["mask"].shape == (48, 40)
    assert set(np.unique(sample["mask"])) <= {0, 1, 2, 3, 4}, "nearest keeps labels labels"
    assert sample["vid"] in range(6)


def test_augment_moves_image_and_mask_together_and_erases_image_only():
    labels = np.zeros((32, 32), np.uint8)
    labels[8:20, 4:12] = 3
    image = np.zeros((32, 32, 3), np.uint8)
    image[labels == 3] = 200
    sample = {"key": "k", "image": image, "mask": labels, "vid": 1, "camera": 0}
    for seed in range(20):
        out = augment(sample, np.random.default_rng(seed), pad=6, erase_prob=0.0)
        # Wherever the mask says "side", the image holds the side's pixels: same flip and crop.
        assert np.array_equal(out["image"][..., 0] == 200, out["mask"] == 3)
    erased = augment(sample, np.random.default_rng(1), pad=0, erase_prob=1.0)
    assert (erased["image"] != np.where(erased["mask"][..., None] == 3, 200, 0)).any(), "image erased"
    flips = {tuple(augment(sample, np.random.default_rng(s), 0, 0.0)["mask"].nonzero()[1][:1]) for s in range(10)}
    assert len(flips) == 2, "both flipped and unflipped outputs occur"
    assert sorted(np.unique(erased["mask"])) == [0, 3], "erasing never touches the mask"


def test_prepare_rejects_sample_without_mask(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    raw = {"__key__": "0001_c001_x", "jpg": buf.getvalue(), "json": b'{"vid": 1, "camera": 1, "split": "train"}'}
    with pytest.raises(ValueError, match=r"0001_c001_x.*no mask.png.*masked shards"):
        prepare(raw, (8, 8))


def test_pk_batches_hold_P_ids_times_K_and_are_reproducible(shards):
    def stream(seed):
        return TrainStream(shard_urls(shards, "train"), batch_size=6, batches_per_epoch=5, seed=seed,
                           num_workers=0, shuffle_buffer=8, map_fn=read_vid,
                           batch_fn=PKBatcher(3, 2, seed, TrainTransform((32, 32), 4, 0.5)), collate_fn=collate)
    a, b, c = list(stream(0).epoch(0)), list(stream(0).epoch(0)), list(stream(1).epoch(0))
    assert len(a) == 5
    for batch in a:
        ids, counts = np.unique(batch["vids"].numpy(), return_counts=True)
        assert len(ids) == 3 and (counts == 2).all()
        assert batch["images"].shape == (6, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["masks"].shape == (6, 32, 32)
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b)), "same seed, same pixels"
    assert not all(torch.equal(x["images"], y["images"]) for x, y in zip(a, c))


def test_pk_batcher_falls_back_with_replacement_when_buffer_is_full():
    # 5 identities, 1 sample each, buffer cap 6: no identity ever reaches K=2.
    samples = [{"__key__": f"k{i}", "vid": i % 5} for i in range(12)]
    batches = list(PKBatcher(2, 2, 0, max_buffered=6)(iter(samples)))
    assert batches, "progress even when no identity has K samples"
    for batch in batches:
        vids = [s["vid"] for s in batch]
        assert len(batch) == 4 and len(set(vids)) == 2 and all(vids.count(v) == 2 for v in set(vids))


def test_eval_transform_and_collate_keep_order(shards):
    from pipeline.data.shards import eval_pipeline
    samples = list(eval_pipeline(shard_urls(shards, "gallery"), map_fn=EvalTransform((32, 32))))
    batch = collate(samples)
    assert batch["keys"] == [s["key"] for s in samples]
    assert batch["vids"].tolist() == [s["vid"] for s in samples]
    assert batch["cameras"].min() >= 1
