"""Images in, masks and PVEN features out, on the torch checkpoints or the exported ONNX graphs.

:class:`Encoder` does for a new image what the pipeline does for a dataset image: the
parser sees the image resized to its ``image_size`` (bilinear), its logits are upsampled
bilinearly to the image's own size before the argmax (the masks stage, ``masks.mask_size:
null``), then image and label map are resized to the PVEN's input (bilinear / nearest,
:func:`pipeline.reid.data.prepare`) and embedded (:data:`pipeline.reid.embed.Forward`).
So a dataset image gives the features the evaluate stage stored for it.

``model`` identifies what the features were made with: the sha256 of the torch model file
(for ONNX, the one recorded by the export stage), the variant, feature size and input size.
An index and a query must agree on it.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cli import InputError
from pipeline.data.transforms import resize_image
from pipeline.dist.checkpoint import file_sha256
from pipeline.evaluation.spec import DistanceSpec
from pipeline.export.graphs import PARSER_FILE, PREPROCESSING_FILE, REID_FILE
from pipeline.parsing.model import load_checkpoint, logit_bias
from pipeline.parsing.predict import forward as parser_forward
from pipeline.parsing.predict import logits_to_labels
from pipeline.reid.data import collate, prepare
from pipeline.reid.distance import spec_for
from pipeline.reid.embed import Forward, model_forward
from pipeline.reid.model import load_model

BACKENDS = ("torch", "onnx")
Logits = Callable[[np.ndarray], torch.Tensor]    # uint8 (B, S, S, 3) -> float32 logits (B, 5, S, S)


@dataclass
class Encoder:
    """The two networks of one trained model behind one interface (build with :meth:`load`)."""
    backend: str
    reid: Forward
    image_size: tuple[int, int]      # PVEN input (height, width) px
    model: dict[str, Any]            # sha256, variant, feat_dim, image_size, distance
    spec: DistanceSpec               # the PVEN distance (mode pven) with the lambda in use
    parser: Logits | None = None
    parser_size: int | None = None
    parser_path: Path | None = None

    @classmethod
    def load(cls, backend: str, *, model: Path, parser: Path, export_dir: Path, lam: float | None = None,
             need_parser: bool = True) -> Encoder:
        """``torch``: ``model`` (models/reid/model.pt) and ``parser`` (models/parser/parser.pt);
        ``onnx``: ``export_dir`` (models/export). ``lam`` None: the export's lambda (onnx) or the
        variant's (torch)."""
        if backend not in BACKENDS:
            raise InputError(f"--backend: got {backend!r}, expected one of {BACKENDS}")
        return cls._torch(model, parser, lam, need_parser) if backend == "torch" else cls._onnx(export_dir, lam)

    @classmethod
    def _torch(cls, model_path: Path, parser_path: Path, lam: float | None, need_parser: bool) -> Encoder:
        net, meta = load_model(model_path)
        distance = meta.get("distance", {"variant": meta["variant"]})
        spec = spec_for(distance, lam=lam)
        parser = size = None
        if need_parser:
            parser_net, config, _ = load_checkpoint(parser_path)
            bias, size = logit_bias(config), int(config["image_size"])
            parser = lambda batch: parser_forward(parser_net, batch, "cpu", bias)  # noqa: E731
        fingerprint = {"sha256": file_sha256(model_path), "variant": meta["variant"], "feat_dim": int(meta["feat_dim"]),
                       "image_size": [int(s) for s in meta["image_size"]], "distance": dict(distance)}
        return cls("torch", model_forward(net), tuple(fingerprint["image_size"]), fingerprint, spec, parser, size,
                   Path(parser_path))

    @classmethod
    def _onnx(cls, export_dir: Path, lam: float | None) -> Encoder:
        from pipeline.export.runtime import OnnxParser, OnnxReid

        record_path = Path(export_dir) / PREPROCESSING_FILE
        if not record_path.is_file():
            raise InputError(f"{record_path}: no export record (run the export stage first: dvc repro export)")
        record = json.loads(record_path.read_text())
        reid = record["reid"]
        spec = spec_for(reid["distance"] or {"variant": reid["variant"]}, lam=reid["lam"] if lam is None else lam)
        fingerprint = {"sha256": reid["sha256"], "variant": reid["variant"], "feat_dim": int(reid["feat_dim"]),
                       "image_size": [int(s) for s in reid["image_size"]], "distance": dict(reid["distance"])}
        parser_path = Path(export_dir) / PARSER_FILE
        return cls("onnx", OnnxReid(Path(export_dir) / REID_FILE), tuple(fingerprint["image_size"]), fingerprint,
                   spec, OnnxParser(parser_path), int(record["parser"]["image_size"]), parser_path)

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Predicted label maps (H, W) uint8, one per RGB image (H, W, 3) uint8, at each image's size."""
        if self.parser is None:
            raise InputError(f"{self.parser_path}: no parser loaded, and these images have no masks")
        batch = np.stack([resize_image(im, self.parser_size) for im in images])
        logits = self.parser(batch)
        return [logits_to_labels(lg, im.shape[:2]) for lg, im in zip(logits, images)]

    @torch.no_grad()
    def features(self, images: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Images with their label maps (any sizes) -> ``global`` (B, C), ``local`` (B, 4, C), ``visibility`` (B, 4)."""
        batch = collate([prepare({"key": str(i), "image": im, "mask": mk, "meta": {"vid": -1}}, self.image_size)
                         for i, (im, mk) in enumerate(zip(images, masks))])
        out = self.reid(batch["images"], batch["masks"])
        return {"global": out["neck"].float().numpy(), "local": out["local"].float().numpy(),
                "visibility": out["visibility"].float().numpy()}
