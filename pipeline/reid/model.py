"""The PVEN network (docs/method.md §2): ResNet backbone, global branch, view-aware local branch.

Input: ``images`` (B, 3, H, W) float, normalised; ``masks`` (B, Hm, Wm) integer label
maps (0 background, 1 front, 2 back, 3 side, 4 top), any size (typically H x W).
The backbone gives the feature map F (B, C, h, w): with last stride 1, h = H/16
(a 256 px image gives 16 x 16; 128 px gives 8 x 8). C is 512 for ResNet-18/34 and
2048 for ResNet-50/101.

Outputs (:meth:`PVEN.forward`, a dict; all float32 whatever the autocast dtype):

* ``global``     (B, C)    f_g = global average pooling of F (before the BN neck)
* ``neck``       (B, C)    f_g after the BatchNorm neck
* ``logits``     (B, N)    bias-free classifier over the N training identities
* ``local``      (B, 4, C) part features f_l^i (eq. 1), zero for an invisible part; with
                 ``local_neck`` the output of the local BN neck instead (what the local
                 loss and evaluation use, as the authors' ``neck_feat: after``)
* ``visibility`` (B, 4)    v_i = area of part i on the feature map in cells (eq. 2),
                 without ``vis_offset`` (the distances add it)

Masks are reduced to F's size by max pooling (paper; a part present anywhere in a
cell marks the cell) or nearest interpolation (``mask_pool='nearest'``, the code's
variant), after a one-hot of labels 1..4 (background dropped).

The ``official`` variant (``ParsingReidModel`` in the authors'
``examples/parsing_reid/model.py``, silverbulletmdc/PVEN 0b2e1a8) is
``mask_pool='nearest'`` (``F.interpolate(mask, x.shape[2:])``), ``vis_offset=1``
(``vis_score = mask.sum(dim=[2, 3]) + 1``, and the pooled feature
``adaptive_avg_pool2d(mask * x) * (h * w / vis_score)`` = sum M F / (sum M + 1)) and
``local_neck=True`` (``local_bn_neck = BatchNorm1d(2048 * 4)`` over the (B, C, 4) part
features flattened to (B, 4C); their ``local_classifier`` feeds no loss and is left out).
``centers`` adds the centre-loss centres (N, C) as a buffer, updated by
:func:`pipeline.reid.losses.update_centers`, so checkpoints carry them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from pipeline.cli import InputError
from pipeline.constants import NUM_PARTS

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
MODEL_FILE = "model.pt"  # file name inside reid.out_dir (see model_payload)


class PretrainedError(InputError):
    """A pretrained weights file that is missing or does not fit the backbone."""


class ModelFileError(InputError):
    """A ReID model file that is missing or not one (``models/reid/model.pt``)."""


def build_backbone(name: str, last_stride: int = 1, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its pooling and fc head -> (module, channels).

    ``last_stride`` 1 removes the stride 2 of the last stage (output stride 16 instead
    of 32). ``pretrained``: None (random init), ``'imagenet'`` (torchvision's weights
    API; downloads on first use) or the path of a local state dict (see
    :func:`load_backbone_weights`).
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone: got {name!r}, expected one of {BACKBONES}")
    weights = "DEFAULT" if pretrained == "imagenet" else None
    net = torchvision.models.get_model(name, weights=weights)
    if pretrained not in (None, "imagenet"):
        load_backbone_weights(net, pretrained)
    if last_stride == 1:
        # The first block of layer4 strides in one 3x3 conv (BasicBlock conv1,
        # Bottleneck conv2) and in its 1x1 downsample conv: set both to 1.
        for module in net.layer4[0].modules():
            if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                module.stride = (1, 1)
    elif last_stride != 2:
        raise ValueError(f"last_stride: got {last_stride}, expected 1 or 2")
    channels = net.fc.in_features
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, channels


def load_backbone_weights(net: nn.Module, path: str | Path) -> None:
    """Load a local torchvision-ResNet state dict into ``net`` (a full torchvision ResNet).

    Accepted: a state dict, or a dict holding one under ``state_dict``/``model``; key
    prefixes ``module.`` (DDP) and ``backbone.`` are stripped; the ``fc.*`` head is
    ignored. Loaded with ``weights_only=True`` (no code runs). Raises
    :class:`PretrainedError` naming the file and the first offending keys when the
    file is missing, unreadable, or its keys/shapes do not match the backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"reid.pretrained: weights file {path} not found "
                              f"(expected null, 'imagenet' or a path to a state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise PretrainedError(f"reid.pretrained: cannot read {path} as a torch state dict: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"reid.pretrained: {path} does not hold a state dict (name -> tensor)")
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("fc."):
            clean[key] = value
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(clean))
    unexpected = sorted(set(clean) - set(own))
    wrong = [f"{k}: file {tuple(clean[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in clean and clean[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise PretrainedError(f"reid.pretrained: {path} does not fit a torchvision "
                              f"{type(net).__name__} of this depth: {'; '.join(parts)}")
    net.load_state_dict(clean, strict=False)  # strict except for the ignored fc head


def masks_to_parts(masks: torch.Tensor, size: tuple[int, int], pool: Literal["max", "nearest"] = "max") -> torch.Tensor:
    """Label maps (B, Hm, Wm) ints 0..4 -> part masks M_i (B, 4, h, w) float32 in {0, 1}."""
    if masks.dim() != 3:
        raise ValueError(f"masks: expected (B, H, W) label maps, got shape {tuple(masks.shape)}")
    labels = torch.arange(1, NUM_PARTS + 1, device=masks.device).view(1, NUM_PARTS, 1, 1)
    onehot = (masks.long().unsqueeze(1) == labels).float()
    if pool == "max":
        return F.adaptive_max_pool2d(onehot, size)
    if pool == "nearest":
        return F.interpolate(onehot, size=size, mode="nearest")
    raise ValueError(f"mask_pool: got {pool!r}, expected 'max' or 'nearest'")


def mask_average_pool(fmap: torch.Tensor, parts: torch.Tensor,
                      vis_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2: F (B, C, h, w), M (B, 4, h, w) -> part features (B, 4, C), visibility (B, 4).

    Features are sum M F / (sum M + vis_offset). An invisible part (sum M_i = 0) gets a
    zero feature: with no offset it is divided by a safe 1. The visibility returned is
    sum M, without the offset.
    """
    vis = parts.sum((2, 3))
    summed = torch.einsum("bphw,bchw->bpc", parts, fmap)
    divisor = vis + vis_offset
    return summed / torch.where(divisor > 0, divisor, torch.ones_like(divisor)).unsqueeze(-1), vis


class PVEN(nn.Module):
    """Backbone + global branch (GAP -> BN neck -> bias-free classifier) + view-aware local branch."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", last_stride: int = 1,
                 mask_pool: Literal["max", "nearest"] = "max", pretrained: str | None = None,
                 local_neck: bool = False, vis_offset: float = 0.0, centers: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: got {num_classes}, expected >= 2 training identities")
        self.config = {"num_classes": int(num_classes), "backbone": backbone, "last_stride": int(last_stride),
                       "mask_pool": mask_pool, "local_neck": bool(local_neck), "vis_offset": float(vis_offset),
                       "centers": bool(centers)}
        self.backbone, channels = build_backbone(backbone, last_stride, pretrained)
        self.feat_dim = channels
        self.mask_pool = mask_pool
        self.vis_offset = float(vis_offset)
        self.neck = nn.BatchNorm1d(channels)
        self.neck.bias.requires_grad_(False)  # BNNeck: no shift, the classifier sees a centred feature
        self.classifier = nn.Linear(channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        # The authors' local neck keeps its bias trainable (only the global one is frozen).
        self.local_neck = nn.BatchNorm1d(channels * NUM_PARTS) if local_neck else None
        if centers:  # their CenterLoss draws centres from randn (the seeded global RNG here)
            self.register_buffer("centers", torch.randn(num_classes, channels))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.backbone(images)
        # The global branch stays in the weights' dtype (bf16 under DeepSpeed bf16, where
        # the neck's weights are bf16 too); outputs are handed out in fp32.
        f_g = fmap.mean((2, 3))
        neck = self.neck(f_g)
        logits = self.classifier(neck)
        parts = masks_to_parts(masks, fmap.shape[-2:], self.mask_pool)
        with torch.autocast(fmap.device.type, enabled=False):  # part pooling in fp32
            local, vis = mask_average_pool(fmap.float(), parts, self.vis_offset)
            if self.local_neck is not None:
                # (B, 4, C) -> (B, C, 4) -> (B, 4C): the authors' channel order (c * 4 + i).
                # flatten/unflatten, not view(len(local), ...): the batch size stays symbolic in
                # an ONNX export (a Python int would fix it to the example's batch).
                flat = local.transpose(1, 2).flatten(1)
                flat = self.local_neck(flat.to(self.local_neck.weight.dtype)).float()
                local = flat.unflatten(1, (-1, NUM_PARTS)).transpose(1, 2)
        return {"global": f_g.float(), "neck": neck.float(), "logits": logits.float(),
                "local": local, "visibility": vis}


def build_model(cfg, num_classes: int) -> PVEN:
    """PVEN from a resolved :class:`pipeline.config.ReidConfig` (variant defaults filled in)."""
    return PVEN(num_classes, backbone=cfg.backbone, last_stride=cfg.last_stride, mask_pool=cfg.mask_pool,
                pretrained=cfg.pretrained, local_neck=cfg.local_neck, vis_offset=cfg.vis_offset,
                centers=cfg.loss.w_center > 0)


# --------------------------------------------------------------------------- model files

MODEL_FORMAT = 1


def model_payload(model: PVEN, state_dict: dict[str, torch.Tensor], class_vids: list[int],
                  distance: dict, image_size: tuple[int, int]) -> dict:
    """What ``models/reid/model.pt`` holds: fp32 weights + all that is needed to rebuild and use them.

    ``class_vids[c]`` is the dataset vid of classifier class ``c`` (training identities,
    sorted); ``distance`` holds the settings the distances need (``variant``,
    ``part_distance``, ``vis_offset``, ``attention``: see :func:`pipeline.reid.distance.spec_for`);
    ``image_size`` sizes the inputs. Only plain types and tensors, so
    ``torch.load(weights_only=True)`` reads it.
    """
    return {"format": MODEL_FORMAT, "state_dict": state_dict, "config": dict(model.config),
            "feat_dim": model.feat_dim, "class_vids": [int(v) for v in class_vids],
            "variant": distance["variant"], "distance": dict(distance),
            "image_size": [int(s) for s in image_size], "neck_feature": "after"}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PVEN, dict]:
    """Rebuild a trained PVEN from a model file -> (model in eval mode, the file's other fields)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no ReID model file (run the train_reid stage first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise ModelFileError(f"{path}: not a loadable torch file: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a PVEN model file of format {MODEL_FORMAT}")
    cfg = payload["config"]
    model = PVEN(cfg["num_classes"], backbone=cfg["backbone"], last_stride=cfg["last_stride"],
                 mask_pool=cfg["mask_pool"], pretrained=None, local_neck=cfg.get("local_neck", False),
                 vis_offset=cfg.get("vis_offset", 0.0), centers=cfg.get("centers", False))
    model.load_state_dict(payload["state_dict"])
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(device).eval(), meta
