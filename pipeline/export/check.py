"""Parity of the exported graphs: onnxruntime against torch eager on held-out images.

:func:`held_out_samples` takes the first ``n`` samples of a split of the masked shards (the
test split's identities were never trained on): the stored image and its stored mask.
:func:`reid_parity` compares the PVEN's three outputs on them, :func:`parser_parity` the
parser's logits and the label maps they give. Figures are
:func:`~pipeline.export.graphs.max_relative_difference` (max |onnx - torch| / max |torch|).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import decode_sample, eval_pipeline, shard_urls
from pipeline.data.transforms import resize_image
from pipeline.export.graphs import REID_OUTPUTS, ParserGraph, ReidGraph, max_relative_difference
from pipeline.export.runtime import OnnxParser, OnnxReid
from pipeline.parsing.predict import logits_to_labels
from pipeline.reid.data import collate, prepare


def held_out_samples(shard_dir: Path, split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` decoded samples of ``split`` (``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8, ...)."""
    out = []
    for sample in eval_pipeline(shard_urls(shard_dir, split), map_fn=decode_sample):
        out.append(sample)
        if len(out) == n:
            break
    return out


@torch.no_grad()
def reid_parity(model: torch.nn.Module, onnx_path: Path, samples: list[dict[str, Any]], size: tuple[int, int],
                batch_size: int) -> dict[str, float]:
    """Max relative difference of ``global``, ``local``, ``visibility`` (and ``max`` of them) over ``samples``."""
    graph, runtime = ReidGraph(model), OnnxReid(onnx_path)
    worst = dict.fromkeys(REID_OUTPUTS, 0.0)
    for start in range(0, len(samples), batch_size):
        batch = collate([prepare(s, size) for s in samples[start:start + batch_size]])
        want = dict(zip(REID_OUTPUTS, (t.numpy() for t in graph(batch["images"], batch["masks"]))))
        got = runtime(batch["images"], batch["masks"])
        got = {"global": got["neck"].numpy(), "local": got["local"].numpy(), "visibility": got["visibility"].numpy()}
        for name in REID_OUTPUTS:
            worst[name] = max(worst[name], max_relative_difference(got[name], want[name]))
    return {**worst, "max": max(worst.values())}


@torch.no_grad()
def parser_parity(model: torch.nn.Module, bias: torch.Tensor | None, onnx_path: Path, samples: list[dict[str, Any]],
                  size: int, batch_size: int) -> dict[str, float]:
    """Max relative difference of the logits, and the share of pixels whose label agrees (at image size)."""
    graph, runtime = ParserGraph(model, bias), OnnxParser(onnx_path)
    worst, agree, pixels = 0.0, 0, 0
    for start in range(0, len(samples), batch_size):
        images = [s["image"] for s in samples[start:start + batch_size]]
        batch = np.stack([resize_image(im, size) for im in images])
        want = graph(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())
        got = runtime(batch)
        worst = max(worst, max_relative_difference(got.numpy(), want.numpy()))
        for lg_got, lg_want, im in zip(got, want, images):
            a, b = logits_to_labels(lg_got, im.shape[:2]), logits_to_labels(lg_want, im.shape[:2])
            agree += int((a == b).sum())
            pixels += a.size
    return {"logits": worst, "label_agreement": agree / max(pixels, 1)}
