"""onnxruntime behind the torch models' call signatures.

:class:`OnnxReid` is a :data:`pipeline.reid.embed.Forward` (uint8 images (B, 3, H, W) and
masks (B, H, W) -> ``{"neck", "local", "visibility"}`` float32 tensors), so
:func:`pipeline.reid.embed.embed_shards` and the search command embed with it unchanged;
:class:`OnnxParser` maps uint8 (B, S, S, 3) batches to logits (B, 5, S, S), as
:func:`pipeline.parsing.predict.forward` does for the torch parser. Both run on the CPU
execution provider unless told otherwise, with as many intra-op threads as torch uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.cli import InputError


def session(path: Path, providers: list[str] | None = None):
    """An onnxruntime InferenceSession of ``path`` (a clear error when the file is missing or broken)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no ONNX model (run the export stage first: dvc repro export)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise InputError(f"{path}: onnxruntime cannot load it: {exc}") from None


class OnnxReid:
    """``pven.onnx`` as a Forward: (uint8 images (B, 3, H, W), uint8 masks (B, H, W)) -> output dict."""

    def __init__(self, path: Path, providers: list[str] | None = None):
        self.session = session(path, providers)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {"images": np.ascontiguousarray(torch.as_tensor(images, dtype=torch.uint8).numpy()),
                 "masks": np.ascontiguousarray(torch.as_tensor(masks, dtype=torch.uint8).numpy())}
        neck, local, vis = self.session.run(["global", "local", "visibility"], feeds)
        return {"neck": torch.from_numpy(neck), "local": torch.from_numpy(local), "visibility": torch.from_numpy(vis)}


class OnnxParser:
    """``parser.onnx``: uint8 (B, S, S, 3) RGB batch -> float32 logits (B, 5, S, S) (bias included)."""

    def __init__(self, path: Path, providers: list[str] | None = None):
        self.session = session(path, providers)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        batch = np.ascontiguousarray(np.asarray(images, np.uint8).transpose(0, 3, 1, 2))
        return torch.from_numpy(self.session.run(["logits"], {"images": batch})[0])
