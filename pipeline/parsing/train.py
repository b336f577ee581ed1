"""Parser training: balanced cross entropy, IoU metrics, and the training loop.

Balanced CE (docs/method.md §1): class ``c`` is weighted by ``1 / f_c``, ``f_c`` its share of
the training masks' pixels, scaled so that the weights of the classes present average
1 (the loss keeps the magnitude of plain CE). A class with no training pixel gets
weight 0: it never appears as a target, and an infinite weight would be meaningless.

Weighted CE moves the decision boundary toward rare classes: the trained network's
softmax estimates ``w_c p(c | x)`` up to a constant, so uncertain pixels (part edges,
the vehicle outline) are over-assigned to rare parts. :func:`prior_bias` gives the
per-class logit offset ``-log w_c`` that undoes this at inference (``parser.prior_correction``);
training itself is unchanged balanced CE. Metrics: :mod:`pipeline.parsing.metrics`.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.constants import NUM_LABELS
from pipeline.data.transforms import resize_image
from pipeline.dist.env import bf16_supported
from pipeline.parsing.data import Annotated, Augment, ParsingDataset, decode_labels, decode_pair, soft_labels
from pipeline.parsing.metrics import confusion_matrix, iou_scores
from pipeline.parsing.model import CHECKPOINT, build_parser, logit_bias, save_checkpoint, to_input
from pipeline.progress import progress

# --------------------------------------------------------------------------- loss weights

def pixel_counts(masks: Iterable[np.ndarray], classes: int = NUM_LABELS) -> np.ndarray:
    """Pixels per label over label maps (H, W) uint8 -> int64 (classes,). Raises on labels >= classes."""
    counts = np.zeros(classes, np.int64)
    for m in masks:
        c = np.bincount(np.asarray(m).ravel(), minlength=classes)
        if len(c) > classes:
            raise ValueError(f"label {len(c) - 1} found, expected labels 0..{classes - 1}")
        counts += c
    return counts


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Balanced CE weights float32 (classes,): inverse pixel frequency, present classes average 1."""
    counts = np.asarray(counts, np.float64)
    if counts.sum() <= 0:
        raise ValueError("class_weights: no labelled pixels")
    present = counts > 0
    inv = np.zeros_like(counts)
    inv[present] = counts.sum() / counts[present]
    return (inv * present.sum() / inv.sum()).astype(np.float32)


def prior_bias(weights: np.ndarray) -> np.ndarray:
    """Inference logit offsets float32 (classes,): ``-log w_c``; 0 for a class without weight."""
    weights = np.asarray(weights, np.float64)
    out = np.zeros_like(weights)
    out[weights > 0] = -np.log(weights[weights > 0])
    return out.astype(np.float32)


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: list[Annotated], image_size: int, batch_size: int,
             weights: torch.Tensor | None = None, device: torch.device | str = "cpu",
             precision: str = "fp32", bias: torch.Tensor | None = None) -> dict[str, Any]:
    """Loss at the network size, IoU at each image's own resolution (how the masks stage predicts).

    ``bias`` (C, 1, 1) is added to the logits before the argmax (not to the loss).

    Returns ``iou_scores`` plus ``"loss"`` (weighted CE, mean over batches) and ``"confusion"``.
    """
    model.eval()
    conf = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
    losses = []
    for start in range(0, len(samples), batch_size):
        pairs = [decode_pair(s) for s in samples[start:start + batch_size]]
        x = np.stack([resize_image(im, image_size) for im, _ in pairs])
        y = torch.stack([soft_labels(m, image_size) for _, m in pairs])
        with _autocast(device, precision):
            logits = model(to_input(x).to(device))
        logits = logits.float().cpu()
        losses.append(float(F.cross_entropy(logits, y, weight=weights)))
        for lg, (_, truth) in zip(logits, pairs):
            up = F.interpolate(lg[None], size=truth.shape, mode="bilinear", align_corners=False)[0]
            up = up if bias is None else up + bias
            conf += confusion_matrix(up.argmax(0).numpy(), truth)
    return {**iou_scores(conf), "loss": float(np.mean(losses)), "confusion": conf.tolist()}


def _autocast(device, precision: str):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------- training

def train_parser(cfg, train: list[Annotated], val: list[Annotated], seed: int, out_dir: str | Path, *,
                 device: torch.device | str = "cpu", show_progress: bool = False,
                 on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the U-Net on ``train``, validate on ``val`` every epoch, keep the best checkpoint.

    ``cfg`` is a :class:`pipeline.config.ParserConfig` (encoder, encoder_weights,
    image_size, epochs, batch_size, lr, weight_decay, num_workers, precision). The
    checkpoint with the highest val mIoU is written to ``out_dir/parser.pt``.
    With ``show_progress`` a bar per epoch and a line with its figures are printed.
    ``on_epoch(epoch, row)`` gets each epoch's row: train_loss, val_loss, val_miou,
    val_pixel_acc, lr, seconds. Returns a summary with the history, the best epoch's
    val scores and the class weights.
    """
    started = time.time()
    torch.manual_seed(seed)
    precision = cfg.precision
    if precision == "bf16" and not bf16_supported(torch.device(device)):
        warnings.warn(f"parser.precision=bf16: no native bf16 on {device}; training in fp32", stacklevel=2)
        precision = "fp32"
    # channels_last: +13% training images/s for the default resnet18 U-Net under bf16 on CPU.
    model = build_parser(cfg.encoder, NUM_LABELS, cfg.encoder_weights).to(device, memory_format=torch.channels_last)
    counts = pixel_counts(decode_labels(s) for s in train)
    weights = torch.from_numpy(class_weights(counts))
    dataset = ParsingDataset(train, cfg.image_size, Augment.from_config(cfg), seed)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, total // 20)
    # Linear warm-up, then cosine decay to zero: stable start from random init, no tuning of steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    config = {"encoder": cfg.encoder, "image_size": cfg.image_size, "classes": NUM_LABELS}
    bias = None
    if cfg.prior_correction:
        config["logit_bias"] = prior_bias(weights.numpy()).tolist()
        bias = logit_bias(config)
    out_dir = Path(out_dir)
    history, best = [], None
    for epoch in range(cfg.epochs):
        t0 = time.time()
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train) >= cfg.batch_size,
            num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        model.train()
        losses = []
        bar = progress(loader, desc=f"train_parser epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       enabled=show_progress, leave=False)
        for images, labels in bar:
            with _autocast(device, precision):
                logits = model(to_input(images).to(device, memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), labels.to(device), weight=weights.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=losses[-1])
        scores = evaluate(model, val, cfg.image_size, cfg.batch_size, weights, device, precision, bias)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": scores["loss"],
               "val_miou": scores["miou"], "val_pixel_acc": scores["pixel_acc"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
        history.append(row)
        if show_progress:
            print(f"train_parser: epoch {epoch + 1}/{cfg.epochs} train_loss {row['train_loss']:.4f} "
                  f"val_loss {row['val_loss']:.4f} val_mIoU {row['val_miou']:.4f} ({row['seconds']:.0f} s)", flush=True)
        if best is None or scores["miou"] > best["scores"]["miou"]:
            best = {"epoch": epoch + 1, "scores": scores}
            save_checkpoint(out_dir / CHECKPOINT, model, config,
                            {"epoch": epoch + 1, "val_miou": scores["miou"], "seed": seed})
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    freq = counts / counts.sum()
    return {"history": history, "best_epoch": best["epoch"], "val": best["scores"],
            "class_weights": weights.tolist(), "pixel_freq": freq.tolist(),
            "train_images": len(train), "val_images": len(val), "config": config,
            "seconds": round(time.time() - started, 2)}
