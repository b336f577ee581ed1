"""Pixel-level transforms the parser and the ReID model share: resizing and input normalisation."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear with antialiasing (PIL)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 labels -> ``size`` = (height, width), nearest neighbour (no blended labels)."""
    if labels.shape == tuple(size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


def normalize_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) 0..255 -> float32 normalised with the ImageNet mean/std (same device, same strides
    unless ``channels_last`` asks for that memory format)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
