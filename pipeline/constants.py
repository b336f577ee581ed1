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

# Method variants (docs/method.md §3): the paper's equations, or the authors' code.
VARIANTS: tuple[str, ...] = ("paper", "official")

# What each variant sets when a key is left null (reid.* / reid.loss.* / the evaluation's
# DistanceSpec). The official column is silverbulletmdc/PVEN at 0b2e1a8 (docs/method.md §3):
# examples/parsing_reid/model.py (nearest masks, local BN neck, vis + 1, neck_feat after),
# math_tools.py (clck_dist: sqrt of the Euclidean distance per part; Clck_R1_mAP:
# normalised features, squared global distance, distmat + 0.5 * local ** 2), main.py (centre loss 5e-4,
# local triplet on normalised part features).
VARIANT_DEFAULTS: dict[str, dict[str, object]] = {
    "paper": {"mask_pool": "max", "local_neck": False, "vis_offset": 0.0, "part_distance": "euclidean",
              "normalize_local": False, "w_center": 0.0,
              "normalize": False, "global_squared": False, "local_squared": False, "lam": 1.0},
    "official": {"mask_pool": "nearest", "local_neck": True, "vis_offset": 1.0, "part_distance": "sqrt_euclidean",
                 "normalize_local": True, "w_center": 5e-4,
                 "normalize": True, "global_squared": True, "local_squared": True, "lam": 0.5},
}
PART_DISTANCES: tuple[str, ...] = ("euclidean", "sqrt_euclidean")   # per-part ||x - y|| or sqrt(||x - y||)
ATTENTIONS: tuple[str, ...] = ("common_visible", "uniform")        # eq. 3, or a_i = 1/4 (ablation)

# Official test lists. VERI-Wild: subset -> (queries = identities, gallery images);
# the query count is also the lists' file suffix (test_3000.txt, test_3000_query.txt).
VERIWILD_SUBSETS: dict[str, tuple[int, int]] = {
    "small": (3000, 38861), "medium": (5000, 64389), "large": (10000, 128517)}
# VehicleID: test_list_<N>.txt with N identities.
VEHICLEID_SUBSETS: tuple[str, ...] = ("800", "1600", "2400", "3200", "6000", "13164")

# What a Ray Tune trial reports after every epoch (pipeline.reid.train: the epoch's mean losses,
# and the in-loop validation of the PVEN distance and of D_g alone), so the names tune.metric
# may pick. tests/test_tune.py checks a real trial's reports hold every one of them.
TRIAL_METRICS: tuple[str, ...] = ("val_mAP", "val_rank1", "val_rank5", "val_mAP_global", "val_rank1_global",
                                  "loss", "id", "gtri", "ltri", "center")
