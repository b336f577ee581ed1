"""The synthetic vehicle ReID dataset: procedural 3D vehicles with exact parsing labels.

The pipeline's embedded default dataset, written in the VeRi-776 layout plus label
PNGs and ``views.csv``. It is hard in the ways real vehicle ReID is hard: many
identities share body type and colour (subtle inter-instance differences), identity
marks sit on specific faces (view-dependent cues), and each camera has its own
viewpoint, lighting, colour cast, background, blur and noise (large intra-instance
differences across cameras, small within one).

Modules: :mod:`.geometry` (convex parts, faces, decals), :mod:`.vehicles` (body
types, identities), :mod:`.marks` (identity marks), :mod:`.scene` (cameras and the
rasteriser), :mod:`.dataset` (planning, parallel writing), :mod:`.sheet` (label
colours, overlays, contact sheet).
"""
from .dataset import image_name, plan, render_dataset, render_example
from .sheet import LABEL_COLOURS, overlay_labels, write_contact_sheet
from .vehicles import BODY_TYPES, build_vehicle

__all__ = ["render_dataset", "render_example", "write_contact_sheet", "overlay_labels",
           "LABEL_COLOURS", "BODY_TYPES", "build_vehicle", "image_name", "plan"]
