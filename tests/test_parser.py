"""Parser library: loss weights, IoU math, checkpoints, local encoder weights, aligned augmentation, data split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.parsing.data import Augment, ParsingDataset, annotated_subset, augment, soft_labels
from pipeline.parsing.metrics import confusion_matrix, iou_scores
from pipeline.parsing.model import CheckpointError, build_parser, load_checkpoint, save_checkpoint, to_input
from pipeline.parsing.report import overlay_sheet
from pipeline.parsing.train import class_weights, pixel_counts, prior_bias, train_parser
from pipeline.viz import LABEL_COLOURS

TINY_ENCODER = "tu-mobilenetv3_small_050"  # 2.2 M parameters: builds and runs in a blink


def test_balanced_weights_are_inverse_pixel_frequency():
    # 8 pixels: background 4, front 2, side 2; back and top absent.
    mask = np.array([[0, 0, 0, 0], [1, 1, 3, 3]], np.uint8)
    counts = pixel_counts([mask])
    assert counts.tolist() == [4, 2, 0, 2, 0]
    w = class_weights(counts)
    # 1/f = 2, 4, -, 4, -; scaled so the 3 present classes average 1: 2*3/10, 4*3/10.
    np.testing.assert_allclose(w, [0.6, 1.2, 0.0, 1.2, 0.0], rtol=1e-6)
    assert w[1] / w[0] == pytest.approx(2.0)  # half as frequent -> twice the weight
    with pytest.raises(ValueError, match="label 7"):
        pixel_counts([np.array([[7]], np.uint8)])
    # Inference bias -log w: a pixel the weighted network calls 'front' only because front
    # weighs 2x background goes back to background.
    bias = prior_bias(w)
    np.testing.assert_allclose(bias, [-np.log(0.6), -np.log(1.2), 0.0, -np.log(1.2), 0.0], rtol=1e-6)
    logits = np.log(np.array([0.3, 0.5, 1e-3, 0.1, 1e-3]))  # weighted softmax favours front (0.5 vs 0.3)
    assert logits.argmax() == 1 and (logits + bias).argmax() == 0  # 0.3/0.6 > 0.5/1.2


def test_iou_and_miou_on_a_hand_computed_case():
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    truth = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, truth)
    assert conf[:3, :3].tolist() == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]  # rows truth, columns prediction
    scores = iou_scores(conf)
    # IoU_c = TP / (pred_c + true_c - TP): 1/(2+2-1), 2/(2+3-2), 1/(2+1-1); 3 and 4 absent from both.
    assert scores["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert scores["iou"][3] is None and scores["iou"][4] is None
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_acc"] == pytest.approx(4 / 6)
    # A class in the truth but never predicted scores 0 and counts in the mean.
    missed = iou_scores(confusion_matrix(np.array([0, 0]), np.array([0, 4])))
    assert missed["iou"][4] == 0.0 and missed["miou"] == pytest.approx((1 / 2 + 0) / 2)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_parser(TINY_ENCODER).eval()
    x = to_input(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    config = {"encoder": TINY_ENCODER, "image_size": 64, "classes": 5}
    save_checkpoint(tmp_path / "parser.pt", model, config, {"epoch": 3})
    raw = torch.load(tmp_path / "parser.pt", weights_only=True)  # plain data only, no pickled module
    assert set(raw) == {"state_dict", "config", "meta"} and raw["config"] == config
    loaded, cfg, meta = load_checkpoint(tmp_path / "parser.pt")
    assert cfg == config and meta == {"epoch": 3} and not loaded.training
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(CheckpointError, match="run the train_parser stage"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "bad_bias.pt", model, {**config, "logit_bias": [0.0, 1.0, 2.0]})
    with pytest.raises(CheckpointError,
                       match=r"bad_bias\.pt: config\.logit_bias has 3 values, expected one per class \(5\)"):
        load_checkpoint(tmp_path / "bad_bias.pt")


def test_local_encoder_weights_load_through_params_and_missing_file_is_clear(tmp_path, tiny_params):
    torch.manual_seed(1)
    source = build_parser(TINY_ENCODER)
    state = dict(source.encoder.state_dict())
    state["classifier.weight"] = torch.zeros(3)  # an ImageNet classifier's head: ignored
    torch.save(state, tmp_path / "encoder.pt")
    torch.manual_seed(2)
    model = build_parser(TINY_ENCODER, encoder_weights=tmp_path / "encoder.pt")
    for name, tensor in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor), name

    # The params path: train_parser builds its model from parser.encoder_weights.
    from pipeline.config import params_from_dict
    cfg = params_from_dict(tiny_params.to_dict(), [f"parser.encoder_weights={tmp_path / 'nope.pt'}",
                                                   f"parser.encoder={TINY_ENCODER}"]).parser
    with pytest.raises(CheckpointError, match=r"nope\.pt not found"):
        train_parser(cfg, [], [], 0, tmp_path / "out")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks .* encoder tensors"):
        build_parser(TINY_ENCODER, encoder_weights=tmp_path / "other.pt")


def _blocks(size=64) -> np.ndarray:
    """A label map of large blocks of every class (few boundary pixels)."""
    mask = np.zeros((size, size), np.uint8)
    q = size // 4
    mask[q:2 * q, q:3 * q] = 1
    mask[2 * q:3 * q, q:2 * q] = 2
    mask[2 * q:3 * q, 2 * q:3 * q] = 3
    mask[q // 2:q, q:3 * q] = 4
    return mask


def test_augmentation_keeps_image_and_mask_aligned():
    mask = _blocks()
    image = LABEL_COLOURS[mask]  # each pixel's colour names its label
    aug = Augment(scale=(0.7, 1.3), shift=0.15, jitter=0.0, flip=0.5)
    for seed in range(6):
        img2, mask2 = augment(image, mask, np.random.default_rng(seed), aug)
        assert img2.shape == image.shape and mask2.shape == mask.shape and mask2.dtype == np.uint8
        assert set(np.unique(mask2)) <= set(range(5)), "nearest resampling: no blended labels"
        # Where the image shows a pure label colour (not a bilinear blend at an edge), the
        # mask must hold that label.
        dist = np.abs(img2[:, :, None, :].astype(int) - LABEL_COLOURS[None, None].astype(int)).sum(-1)
        pure = dist.min(-1) == 0
        agree = (dist.argmin(-1) == mask2)[pure].mean()
        assert pure.mean() > 0.8 and agree > 0.98, (seed, pure.mean(), agree)
    # Colour jitter changes the image only: the same draws give the same mask.
    jittered = augment(image, mask, np.random.default_rng(3), Augment(scale=(0.7, 1.3), shift=0.15, jitter=0.5))
    plain = augment(image, mask, np.random.default_rng(3), aug)
    assert np.array_equal(jittered[1], plain[1]) and not np.array_equal(jittered[0], plain[0])
    # A certain flip with no zoom/shift is an exact mirror of both.
    flipped = augment(image, mask, np.random.default_rng(0), Augment(scale=(1, 1), shift=0, jitter=0, flip=1))
    assert np.array_equal(flipped[0], image[:, ::-1]) and np.array_equal(flipped[1], mask[:, ::-1])


def test_soft_labels_are_area_shares():
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 3], [2, 2, 4, 4], [2, 4, 4, 4]], np.uint8)
    soft = soft_labels(labels, 2)
    assert soft.shape == (5, 2, 2)
    assert soft[:, 0, 0].tolist() == [1, 0, 0, 0, 0]
    assert soft[:, 0, 1].tolist() == [0, 0.75, 0, 0.25, 0]
    assert soft[:, 1, 0].tolist() == [0, 0, 0.75, 0, 0.25]
    assert np.array_equal(soft_labels(labels, 4).argmax(0).numpy(), labels), "same size: one-hot"


def test_dataset_items_are_reproducible_per_epoch(tmp_path):
    from pipeline.data.shards import ShardOptions, write_shards
    from tests.test_shards import make_records
    write_shards(make_records(tmp_path / "raw", size=(48, 40)), tmp_path / "s",
                 ShardOptions(samples_per_shard=6, min_shards=2), seed=0)
    train, val = annotated_subset(tmp_path / "s", val_fraction=0.3, seed=0)
    assert len(train) + len(val) == 10 and {s.vid for s in train}.isdisjoint({s.vid for s in val})
    assert (train, val) == annotated_subset(tmp_path / "s", val_fraction=0.3, seed=0)
    ds = ParsingDataset(train, 32, Augment(), seed=5)
    image, labels = ds[0]
    assert image.shape == (32, 32, 3) and image.dtype == torch.uint8 and labels.shape == (5, 32, 32)
    torch.testing.assert_close(labels.sum(0), torch.ones(32, 32))  # class shares per pixel
    assert torch.equal(ds[0][0], image)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image), "a new epoch draws new augmentations"


# ---- the overlay picture (reports/parser_val_overlays.png, reports/masks_overlays.png) ---------
def _sheet_rows(n: int = 2):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        labels = np.zeros((40, 60), np.uint8)
        labels[5:20, 5:55] = 1 + i % 4
        labels[20:35, 5:55] = 3
        labels[0:5, 30:60] = 4
        labels[35:40, 0:30] = 2
        rows.append((image, [labels, labels if i == 0 else None]))
    return rows


def _dark(band: np.ndarray) -> int:
    return int((band.astype(int).sum(axis=2) < 200).sum())


def test_overlay_sheet_grid_and_named_legend():
    tile = 64
    sheet = overlay_sheet(_sheet_rows(), tile=tile)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    tile_w = 96  # 60 x 40 images keep their aspect at 64 px high
    grid_h = 2 * tile  # + a 2 px white gap under each row
    assert sheet.shape[1] >= 3 * tile_w
    # the image itself sits unchanged (resized) in the first column, the overlay in the second
    assert (sheet[:tile, :tile_w] == np.asarray(_fit_reference(_sheet_rows()[0][0], tile, tile_w))).all()
    # below the grid: the legend band, as tall as a line of text at least, with every label's colour
    legend = sheet[grid_h + 2 * 2:]
    assert (sheet[grid_h + 2:grid_h + 4] == 255).all()
    assert legend.shape[0] >= 18
    for colour in LABEL_COLOURS[1:]:
        assert (legend == colour).all(axis=2).any(), colour
    # ... and names beside the swatches: dark text pixels, varied (not a flat fill)
    assert _dark(legend) > 200 and legend.std() > 40
    # a missing label map is a grey tile saying so (light text on grey)
    grey = sheet[tile + 2:2 * tile + 2, 2 * (tile_w + 2):2 * (tile_w + 2) + tile_w]
    assert (grey == 96).all(axis=2).mean() > 0.8 and (grey.astype(int).sum(axis=2) > 500).any()


def _fit_reference(image, height, width):
    from PIL import Image
    return Image.fromarray(image).resize((width, height), Image.NEAREST)


def test_overlay_sheet_column_titles_and_title_add_bands_with_text():
    rows = _sheet_rows()
    plain = overlay_sheet(rows, tile=64)
    named = overlay_sheet(rows, tile=64, columns=["image", "ground truth", "prediction"], title="Parser on val")
    extra = named.shape[0] - plain.shape[0]
    assert extra >= 2 * 16 and named.shape[1] == plain.shape[1]
    assert (named[extra:] == plain).all()  # the bands are on top, the rest is unchanged
    bands = named[:extra]
    assert _dark(bands) > 150 and bands.std() > 20
    # a title over each column: text in the band over each of the three columns
    column_band = bands[-18:]
    for c in range(3):
        assert _dark(column_band[:, c * 98:(c + 1) * 98]) > 20, c
    with pytest.raises(ValueError, match="2 column titles"):
        overlay_sheet(rows, columns=["image", "prediction"])
    with pytest.raises(ValueError, match="no rows"):
        overlay_sheet([])
