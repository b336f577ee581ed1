"""The parser network: a segmentation-models-pytorch ``Unet`` over 5 view labels.

Labels (docs/method.md §1): 0 background, 1 front, 2 back, 3 side, 4 top.

Checkpoints are plain data, never a pickled module, so they load with
``torch.load(weights_only=True)``::

    {"state_dict": {name: tensor}, "config": {"encoder": str, "image_size": int, "classes": int},
     "meta": {...JSON-able facts: epoch, val metrics...}}

``config`` is all that is needed to rebuild the network (:func:`build_parser`); the
masks stage takes ``image_size`` from it, not from params, so inference always runs
at the size the parser was trained at. An optional ``config["logit_bias"]`` (one float
per class) is added to the logits before the argmax at inference (see
:func:`pipeline.parsing.train.prior_bias`).

Inputs are RGB images resized to ``image_size`` x ``image_size`` and normalised with
the ImageNet mean/std (:func:`to_input`), the convention of smp's pretrained encoders,
so a local ImageNet encoder state dict works unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cli import InputError
from pipeline.constants import NUM_LABELS
from pipeline.data.transforms import normalize_images
from pipeline.dist.checkpoint import torch_save_atomic

CHECKPOINT = "parser.pt"  # file name inside parser.out_dir


class CheckpointError(InputError):
    """A parser checkpoint or encoder weight file that cannot be used."""


def build_parser(encoder: str, classes: int = NUM_LABELS, encoder_weights: str | Path | None = None):
    """A randomly initialised ``smp.Unet`` (no download ever); optionally load a local encoder state dict.

    ``encoder`` is any smp encoder name (resnet18, se_resnext50_32x4d, ...).
    ``encoder_weights``: None, or the path of a ``torch.save``-d state dict of the encoder
    (e.g. ``model.encoder.state_dict()``, or a torchvision/timm ImageNet classifier whose
    extra head keys such as ``fc.*`` are ignored). Raises CheckpointError naming the file
    when it is missing or does not fit the encoder.
    """
    import segmentation_models_pytorch as smp

    try:
        model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=classes)
    except KeyError as exc:
        raise CheckpointError(f"parser.encoder: {encoder!r} is not a segmentation-models-pytorch "
                              f"encoder ({exc})") from None
    if encoder_weights is not None:
        load_encoder_weights(model, encoder_weights)
    return model


def load_encoder_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a local encoder state dict into ``model.encoder``; returns the ignored (extra) keys.

    Every encoder tensor must be present with the right shape: a partial load would
    silently leave random layers behind, so it is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"parser.encoder_weights: file {path} not found (expected a local encoder "
                              "state dict saved with torch.save; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise CheckpointError(f"parser.encoder_weights: {path} is not a torch state dict: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"parser.encoder_weights: {path} holds a {type(state).__name__}, expected a state dict")
    own = model.encoder.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"parser.encoder_weights: {path} lacks {len(missing)} encoder tensors "
                              f"(first: {missing[0]!r}); is it a state dict of this encoder?")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"parser.encoder_weights: {path}: {name} has shape "
                                  f"{tuple(state[name].shape)}, the encoder expects {tuple(tensor.shape)}")
    model.encoder.load_state_dict({k: state[k] for k in own})
    return sorted(set(state) - set(own))


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB batch (B, S, S, 3), array or tensor -> normalised float32 tensor (B, 3, S, S)."""
    return normalize_images(torch.as_tensor(images).permute(0, 3, 1, 2)).contiguous()


def logit_bias(config: dict[str, Any]) -> torch.Tensor | None:
    """The checkpoint's per-class inference bias as a (C, 1, 1) tensor, or None."""
    bias = config.get("logit_bias")
    return None if bias is None else torch.tensor(bias, dtype=torch.float32).view(-1, 1, 1)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict[str, Any],
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``{"state_dict", "config", "meta"}`` atomically (temp file + rename)."""
    for key in ("encoder", "image_size", "classes"):
        if key not in config:
            raise ValueError(f"checkpoint config lacks {key!r} (has {sorted(config)})")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return torch_save_atomic({"state_dict": state, "config": dict(config), "meta": dict(meta or {})}, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the parser from a checkpoint: returns ``(model in eval mode, config, meta)``.

    Uses ``torch.load(weights_only=True)``: a checkpoint holding anything but tensors and
    plain data is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no parser checkpoint (run the train_parser stage first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable parser checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= set(ckpt):
        raise CheckpointError(f"{path}: expected a dict with 'state_dict' and 'config'")
    config = ckpt["config"]
    bias = config.get("logit_bias")
    if bias is not None and len(bias) != int(config["classes"]):
        raise CheckpointError(f"{path}: config.logit_bias has {len(bias)} values, expected one per class "
                              f"({config['classes']})")
    model = build_parser(config["encoder"], int(config["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), config, ckpt.get("meta", {})
