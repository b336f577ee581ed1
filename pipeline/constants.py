"""Names and numbers every layer shares, in one place (imports nothing).

Parsing labels (docs/method.md §1): one label per pixel, 0 background and the four
views of a vehicle. The renderer writes them, the parser predicts them, the ReID
model pools features over the four non-background ones (its "parts").
"""
from __future__ import annotations

VIEW_NAMES: tuple[str, ...] = ("background", "front", "back", "side", "top")
NUM_LABELS = len(VIEW_NAMES)          # classes of a label map: 0..4
PART_NAMES: tuple[str, ...] = VIEW_NAMES[1:]
NUM_PARTS = len(PART_NAMES)           # part features / visibilities per image: front, back, side, top

# ImageNet statistics per RGB channel on 0..1 pixels: what torchvision's and smp's
# pretrained encoders expect, used for the parser's and the ReID model's inputs.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Distance variants (docs/method.md §3): the paper's equations, or the authors' code.
VARIANTS: tuple[str, ...] = ("paper", "official")

# Official test lists. VERI-Wild: subset -> (queries = identities, gallery images);
# the query count is also the lists' file suffix (test_3000.txt, test_3000_query.txt).
VERIWILD_SUBSETS: dict[str, tuple[int, int]] = {
    "small": (3000, 38861), "medium": (5000, 64389), "large": (10000, 128517)}
# VehicleID: test_list_<N>.txt with N identities.
VEHICLEID_SUBSETS: tuple[str, ...] = ("800", "1600", "2400", "3200", "6000", "13164")
