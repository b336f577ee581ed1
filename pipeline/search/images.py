"""Reading the image files a user hands to the search command, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.cli import InputError

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_SIDE = 16        # px: smaller images carry no usable view (the parser alone reads 64 px)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageError(InputError):
    """An image file that cannot be searched with: unreadable, not an image, grey, too small."""


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, by suffix), as sorted paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not found:
        raise InputError(f"{folder}: no image files ({', '.join(SUFFIXES)})")
    return found


def read_image(path: Path) -> np.ndarray:
    """A colour image file -> (H, W, 3) uint8 RGB; :class:`ImageError` naming the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in GREY_MODES:
                raise ImageError(f"{path}: a grayscale image (mode {mode}); expected a colour (RGB) image")
            rgb = np.array(im.convert("RGB"))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ImageError(f"{path}: {rgb.shape[1]} x {rgb.shape[0]} px; expected at least {MIN_SIDE} px a side")
    return rgb
