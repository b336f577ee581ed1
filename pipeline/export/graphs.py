"""The exported graphs: PVEN and parser, uint8 images in, normalisation inside the graph.

``pven.onnx``
    inputs  ``images`` uint8 (B, 3, H, W) RGB at the model's ``image_size``;
            ``masks``  uint8 (B, H, W) view labels 0..4 (0 background) at the same size
    outputs ``global`` float32 (B, C) (after the BN neck: what evaluation ranks),
            ``local`` float32 (B, 4, C) part features, ``visibility`` float32 (B, 4)
            (mask cells of each part on the feature map)
``parser.onnx``
    input   ``images`` uint8 (B, 3, S, S) RGB at the parser's ``image_size``
    output  ``logits`` float32 (B, 5, S, S), the checkpoint's prior correction added

B is a dynamic axis. The ImageNet mean/std normalisation runs inside both graphs, so a
consumer only resizes: the image bilinearly, the parser's logits bilinearly to the image
size before the argmax, the label map by nearest neighbour to the PVEN's input size
(:func:`preprocessing` records it; what the masks stage and the evaluate stage do).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic
from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD, PART_NAMES, VIEW_NAMES
from pipeline.data.transforms import normalize_images

REID_FILE, PARSER_FILE, PREPROCESSING_FILE = "pven.onnx", "parser.onnx", "preprocessing.json"
REID_OUTPUTS = ("global", "local", "visibility")
OPSET = 18


class ReidGraph(torch.nn.Module):
    """PVEN with its input normalisation: (uint8 images, uint8 masks) -> (global, local, visibility)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(normalize_images(images), masks)
        return out["neck"], out["local"], out["visibility"]


class ParserGraph(torch.nn.Module):
    """The parser with its normalisation and inference bias: uint8 (B, 3, S, S) -> logits (B, 5, S, S)."""

    def __init__(self, model: torch.nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("bias", torch.zeros(len(VIEW_NAMES), 1, 1) if bias is None else bias.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize_images(images)).float() + self.bias


def export_onnx(graph: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
                outputs: list[str]) -> Path:
    """``graph`` traced on ``example`` (torch.export) as an ONNX file at ``path``, batch axis dynamic.

    Written to a temporary name beside ``path`` and renamed: an interrupted export leaves
    the previous file, never half of one.
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch} for name in inputs}
    with atomic.replacing(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the exporter's notes on its own internals
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(graph, example, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        program.save(str(tmp))
        _strip_trace_records(tmp)
    return Path(path)


def _strip_trace_records(path: Path) -> None:
    """Drop the exporter's per-node debug records (FX node names, stack traces of generated code):
    they number the trace (``getitem_63``, ``<eval_with_key>.86``) differently on every export,
    so the same weights would give a different file and DVC would rerun what follows for nothing."""
    import onnx

    model = onnx.load(str(path))

    def strip(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    strip(attr.g)
                for sub in attr.graphs:
                    strip(sub)
        del graph.metadata_props[:]
    strip(model.graph)
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]
    onnx.save(model, str(path))


def preprocessing(reid_meta: dict[str, Any], parser_config: dict[str, Any], *, lam: float,
                  reid_sha256: str, parser_sha256: str) -> dict[str, Any]:
    """What a consumer of the two graphs needs: sizes, normalisation, resize rules, distance, lambda.

    ``reid_meta`` is the model file's record (:func:`pipeline.reid.model.load_model`),
    ``parser_config`` the parser checkpoint's config; the sha256 of both source files
    identify the model an index or a ranking was made with, whichever backend runs it.
    """
    height, width = (int(s) for s in reid_meta["image_size"])
    return {
        "format": 1,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 255.0,
                          "in_graph": True, "rule": "(uint8 - 255 * mean) / (255 * std), per RGB channel"},
        "parser": {"file": PARSER_FILE, "input": "images uint8 (B, 3, S, S) RGB", "output": "logits (B, 5, S, S)",
                   "image_size": int(parser_config["image_size"]), "labels": list(VIEW_NAMES),
                   "image_resize": "RGB image to S x S, bilinear with antialiasing (PIL)",
                   "mask_rule": "logits bilinearly (align_corners=False) to the image's own size, argmax over classes",
                   "logit_bias_in_graph": parser_config.get("logit_bias") is not None, "sha256": parser_sha256},
        "reid": {"file": REID_FILE, "inputs": "images uint8 (B, 3, H, W) RGB, masks uint8 (B, H, W) labels 0..4",
                 "outputs": {"global": "(B, C) after the BN neck", "local": f"(B, 4, C) parts {list(PART_NAMES)}",
                             "visibility": "(B, 4) mask cells per part on the feature map"},
                 "image_size": [height, width], "feat_dim": int(reid_meta["feat_dim"]),
                 "image_resize": "RGB image to H x W, bilinear with antialiasing (PIL)",
                 "mask_resize": "label map to H x W, nearest neighbour (PIL)",
                 "variant": reid_meta["variant"], "distance": dict(reid_meta.get("distance", {})),
                 "lam": float(lam), "sha256": reid_sha256},
    }


def max_relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the largest error relative to the output's scale.

    Relative to the largest magnitude rather than elementwise: features hold exact zeros
    (an invisible part), where an elementwise ratio means nothing.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {want.shape}")
    scale = float(np.abs(want).max()) if want.size else 0.0
    return float(np.abs(got - want).max() / scale) if scale > 0 else float(np.abs(got - want).max(initial=0.0))
