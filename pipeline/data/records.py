"""The one record type every dataset reader produces and the shard stage consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Split = Literal["train", "query", "gallery", "test", "val_query", "val_gallery"]
"""``test`` is a pool without a fixed query/gallery split (VehicleID: the
evaluation protocol draws the gallery from it); VeRi-776, VERI-Wild and the
synthetic set have explicit ``query`` and ``gallery`` splits. ``val_query`` /
``val_gallery`` are training identities held out for validation
(:mod:`pipeline.data.holdout`, ``data.val_ids``)."""

SPLITS: tuple[str, ...] = ("train", "query", "gallery", "test", "val_query", "val_gallery")
VAL_SPLITS: tuple[str, str] = ("val_query", "val_gallery")


def held_out_pair(splits) -> tuple[str, str] | None:
    """``VAL_SPLITS`` when ``splits`` (names, e.g. a shard manifest's ``splits``) holds both, else None."""
    return VAL_SPLITS if all(split in splits for split in VAL_SPLITS) else None

# Columns of the synthetic set's views.csv (written by the renderer, read by sources):
# image folder and file name, vehicle id, camera, and the view in degrees.
VIEWS_COLUMNS: tuple[str, ...] = ("folder", "name", "vid", "camera", "azimuth_deg", "elevation_deg")


@dataclass(frozen=True)
class Record:
    """One image of a dataset split.

    key:        unique within the split, no dots (WebDataset splits keys at dots)
    image:      path of the JPEG on disk
    vid:        the dataset's vehicle id
    camera:     camera id, or -1 where the dataset has none (VehicleID)
    split:      one of SPLITS
    label:      path of a parsing label PNG (uint8, values 0..4), if one exists
    meta:       extra per-image facts to carry into the shard json (e.g. the
                synthetic renderer's azimuth/elevation in degrees)
    """
    key: str
    image: Path
    vid: int
    camera: int
    split: str
    label: Path | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if "." in self.key or "/" in self.key:
            raise ValueError(f"record key {self.key!r} (image {self.image}) must not contain '.' or '/'")
        if self.split not in SPLITS:
            raise ValueError(f"record {self.key!r}: split {self.split!r} is not one of {SPLITS}")
