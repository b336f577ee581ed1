"""The synthetic vehicle ReID dataset: procedural 3D vehicles with exact parsing labels.

The pipeline's embedded default dataset, written in the VeRi-776 layout plus label
PNGs and ``views.csv``. It is hard in the ways real vehicle ReID is hard: identities
come in look-alike families (same body, size, paint and fittings) that differ only in
2-3 identity marks on specific faces (subtle, view-dependent inter-instance
differences, as in PVEN's Figure 1), many families share body type and colour too,
and each camera has its own viewpoint, lighting, colour cast, background, blur and
noise (large intra-instance differences across cameras, small within one).

Modules: :mod:`.geometry` (convex parts, faces, decals), :mod:`.vehicles` (body
types, looks), :mod:`.marks` (identity marks and their rules), :mod:`.families`
(look-alike families, identities), :mod:`.scene` (cameras and the rasteriser, label
and mark maps), :mod:`.dataset` (planning, parallel writing, mark visibility),
:mod:`.sheet` (label colours, overlays, contact sheet).
"""
from .dataset import image_name, mark_min_pixels, plan, render_dataset, render_example
from .families import Identity, build_identity, identities
from .sheet import LABEL_COLOURS, overlay_labels, write_contact_sheet
from .vehicles import BODY_TYPES, build_vehicle

__all__ = ["render_dataset", "render_example", "write_contact_sheet", "overlay_labels",
           "LABEL_COLOURS", "BODY_TYPES", "build_vehicle", "image_name", "plan", "identities",
           "build_identity", "Identity", "mark_min_pixels"]
