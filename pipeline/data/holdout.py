"""Validation identities held out of the training split (``data.val_ids``).

The test split is for the final numbers only; anything chosen by looking at results (the
inference weight λ, an epoch, a setting) is chosen on these identities instead.

:func:`hold_out` takes the ``n`` training identities with the highest vids (the synthetic
renderer gives them families of their own, so no look-alike of a validation identity is
trained on) out of ``train`` and splits their images like VeRi-776's test set:

* ``val_gallery``: every image of the held-out identities;
* ``val_query``: the first image (by key) of each (identity, camera): it is also in the
  gallery, where the same-id same-camera junk rule removes it and its camera's other
  images, as VeRi-776's query images are removed from its test set.

A dataset without cameras (VehicleID) cannot use that rule: there ``val_query`` holds the
first image of each identity and ``val_gallery`` the others (identities with one image
give no query). Keys stay unique within each split.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

from pipeline.cli import InputError
from pipeline.data.records import Record


class HoldoutError(InputError):
    """``data.val_ids`` asks for more identities than training leaves."""


def hold_out(splits: dict[str, list[Record]], n_ids: int) -> dict[str, list[Record]]:
    """``splits`` with the top ``n_ids`` training vids moved to ``val_query`` / ``val_gallery`` (see module doc)."""
    if n_ids == 0:
        return splits
    train = splits.get("train", [])
    vids = sorted({r.vid for r in train})
    if n_ids > len(vids) - 2:
        raise HoldoutError(f"data.val_ids: got {n_ids}, but the training split has {len(vids)} identities; "
                           f"expected at most {len(vids) - 2} (training needs >= 2)")
    held = set(vids[-n_ids:])
    by_vid: dict[int, list[Record]] = defaultdict(list)
    for r in train:
        if r.vid in held:
            by_vid[r.vid].append(r)
    query, gallery = [], []
    for vid in sorted(by_vid):
        images = sorted(by_vid[vid], key=lambda r: r.key)
        if all(r.camera < 0 for r in images):
            query.append(images[0])
            gallery.extend(images[1:])
        else:
            first = {}
            for r in images:
                first.setdefault(r.camera, r)
            query.extend(first.values())
            gallery.extend(images)
    return {**splits, "train": [r for r in train if r.vid not in held],
            "val_query": [dataclasses.replace(r, split="val_query") for r in query],
            "val_gallery": [dataclasses.replace(r, split="val_gallery") for r in gallery]}
