"""Identity marks: 1-3 per vehicle, each on specific faces, so each is seen only from some views.

A mark is a function ``(builder, ctx, rng, paint)`` that adds decals or small parts;
``ctx`` names the body's faces and dimensions (see the body builders in
:mod:`.vehicles`). Marks are what tells apart two identities of the same body type
and colour, as stickers, roof boxes and scratches do in real vehicle ReID.
"""
from __future__ import annotations

import numpy as np

from .geometry import GLASS, LAMP, MATTE, PAINT, Builder, box, ellipse, face_size, rect

_MARK_COLOURS = ((240, 240, 236), (24, 24, 26), (200, 30, 30), (240, 200, 30),
                 (235, 120, 20), (30, 150, 60), (30, 90, 200), (150, 152, 156))
_TINTED_GLASS = (15, 17, 20)
_TYRE = (24, 24, 26)


def _contrast(rng: np.random.Generator, paint: tuple[float, ...]) -> tuple[int, int, int]:
    """A mark colour that stands out from the paint (distance > 120 in RGB)."""
    options = [c for c in _MARK_COLOURS if np.linalg.norm(np.subtract(c, paint)) > 120]
    return options[int(rng.integers(len(options)))]


def _mark_sticker(b, ctx, rng, paint):
    face = ctx["glass_faces"][int(rng.integers(len(ctx["glass_faces"])))]
    w, h = face_size(face.pts)
    su, sv = min(0.3, 0.28 / w), min(0.35, 0.22 / h)
    u0 = 0.08 if rng.random() < 0.5 else 0.92 - su
    v0 = 0.06 if rng.random() < 0.6 else 0.90 - sv
    b.decal(face, rect(u0, u0 + su, v0, v0 + sv), _MARK_COLOURS[int(rng.integers(len(_MARK_COLOURS)))])


def _roof_thing(b, ctx, rng, name, length, width, height, x_centre, colour, material=PAINT):
    hw = min(width / 2, ctx["roof_hw"] - 0.05)
    z = ctx["roof_z"]
    b.part(name, box(x_centre - length / 2, x_centre + length / 2, -hw, hw, z, z + height,
                     inset=min(0.04, height / 3)), colour, material)


def _mark_roof_box(b, ctx, rng, paint):
    rx0, rx1 = ctx["roof_x"]
    rl = rx1 - rx0
    length = float(rng.uniform(0.55, 0.8)) * rl
    cx = (rx0 + rx1) / 2 + float(rng.uniform(-0.1, 0.1)) * rl
    cx = float(np.clip(cx, rx0 + length / 2, rx1 - length / 2))
    colours = ((24, 24, 26), (200, 202, 205), (235, 235, 232), (70, 72, 76))
    _roof_thing(b, ctx, rng, "roof_box", length, 2 * ctx["roof_hw"] * float(rng.uniform(0.5, 0.75)),
                float(rng.uniform(0.18, 0.34)), cx, colours[int(rng.integers(4))])


def _mark_roof_rack(b, ctx, rng, paint):
    rx0, rx1 = ctx["roof_x"]
    z, hw = ctx["roof_z"], ctx["roof_hw"] - 0.08
    colour = (30, 30, 32) if rng.random() < 0.6 else (170, 172, 176)
    for name, y in (("rack_left", hw), ("rack_right", -hw)):
        b.part(name, box(rx0 + 0.05, rx1 - 0.05, y - 0.03, y + 0.03, z, z + 0.07), colour, MATTE)


def _mark_light_bar(b, ctx, rng, paint):
    _, rx1 = ctx["roof_x"]
    colours = ((240, 200, 30), (240, 240, 236), (210, 40, 40))
    _roof_thing(b, ctx, rng, "light_bar", 0.28, 0.7, 0.16, rx1 - 0.35, colours[int(rng.integers(3))], LAMP)


def _mark_side_stripe(b, ctx, rng, paint):
    colour = _contrast(rng, paint)
    v0 = float(rng.uniform(0.25, 0.6))
    h = float(rng.uniform(0.08, 0.18))
    sides = ctx["sides"] if rng.random() < 0.6 else [ctx["sides"][int(rng.integers(2))]]
    for face in sides:
        b.decal(face, rect(0.02, 0.98, v0, v0 + h), colour)


def _mark_top_stripe(b, ctx, rng, paint):
    colour = _contrast(rng, paint)
    for face in (ctx["hood"], ctx["roof"]):
        for lo, hi in ((0.36, 0.45), (0.55, 0.64)):
            b.decal(face, rect(0.0, 1.0, lo, hi), colour)


def _mark_spare_wheel(b, ctx, rng, paint):
    face = ctx["back"]
    w, h = face_size(face.pts)
    r = min(0.34, 0.42 * h)
    cover = (_TYRE, (170, 172, 176), paint)[int(rng.integers(3))]
    b.decal(face, ellipse(0.5, 0.56, r / w, r / h), _TYRE, MATTE)
    b.decal(face, ellipse(0.5, 0.56, 0.62 * r / w, 0.62 * r / h), cover)


def _mark_bull_bar(b, ctx, rng, paint):
    x, (z0, z1), hw = ctx["front_x"], ctx["front_z"], ctx["hw"]
    colour = (26, 26, 28) if rng.random() < 0.6 else (175, 178, 182)
    b.part("bull_bar", box(x + 0.03, x + 0.13, -hw + 0.22, hw - 0.22, z0 + 0.02,
                           z0 + 0.6 * (z1 - z0)), colour)


def _mark_tint(b, ctx, rng, paint):
    for part in b.parts:
        for face in part.faces.values():
            if face.material == GLASS:
                face.colour = _TINTED_GLASS
            for d in face.decals:
                if d.material == GLASS:
                    d.colour = _TINTED_GLASS


def _mark_roof_colour(b, ctx, rng, paint):
    ctx["roof"].colour = (28, 29, 31) if np.mean(paint) > 110 else (232, 233, 230)


def _mark_side_logo(b, ctx, rng, paint):
    face = ctx["sides"][int(rng.integers(2))]
    w, h = face_size(face.pts)
    size = float(rng.uniform(0.45, 0.8)) * min(h, 0.25 * w)
    cu, cv = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.4, 0.6))
    ru, rv = size / 2 / w, size / 2 / h
    shape = int(rng.integers(3))
    if shape == 0:
        poly = ellipse(cu, cv, ru, rv, 12)
    elif shape == 1:
        poly = np.array([(cu - ru, cv), (cu, cv - rv), (cu + ru, cv), (cu, cv + rv)])
    else:
        poly = rect(cu - 1.6 * ru, cu + 1.6 * ru, cv - 0.6 * rv, cv + 0.6 * rv)
    b.decal(face, poly, _contrast(rng, paint))


def _mark_rear_decal(b, ctx, rng, paint):
    face = ctx["back"]
    colour = _contrast(rng, paint)
    u0 = float(rng.uniform(0.55, 0.7))
    if rng.random() < 0.5:
        b.decal(face, rect(u0, u0 + 0.22, 0.45, 0.56), colour)
    else:   # "text": three short lines
        for k in range(3):
            b.decal(face, rect(u0, u0 + 0.2 - 0.05 * k, 0.44 + 0.05 * k, 0.47 + 0.05 * k), colour)


def _mark_hood_patch(b, ctx, rng, paint):
    u0, u1 = ctx["hood_u"]
    colour = (22, 22, 24) if np.mean(paint) > 90 else _contrast(rng, paint)
    b.decal(ctx["hood"], rect(u0 + 0.15 * (u1 - u0), u1 - 0.03, 0.3, 0.7), colour, MATTE)


def _mark_door_panel(b, ctx, rng, paint):
    face = ctx["sides"][int(rng.integers(2))]
    colour = (150, 150, 144) if np.linalg.norm(np.subtract(paint, (150, 150, 144))) > 60 else (60, 62, 66)
    u0 = float(rng.uniform(0.3, 0.45))
    b.decal(face, rect(u0, u0 + 0.2, 0.04, 0.96), colour)


def _mark_bed_cover(b, ctx, rng, paint):
    bed = [b.find(n) for n in ("bed_left", "bed_right", "tailgate", "bulkhead")]
    x0 = min(p.faces["top"].pts[:, 0].min() for p in bed)
    x1 = max(p.faces["top"].pts[:, 0].max() for p in bed)
    z = float(bed[0].faces["top"].pts[0, 2])
    b.part("bed_cover", box(x0, x1, -ctx["hw"], ctx["hw"], z, z + 0.04), (30, 30, 32), MATTE)


MARKS = {
    "sticker": _mark_sticker, "roof_box": _mark_roof_box, "roof_rack": _mark_roof_rack,
    "light_bar": _mark_light_bar, "side_stripe": _mark_side_stripe, "top_stripe": _mark_top_stripe,
    "spare_wheel": _mark_spare_wheel, "bull_bar": _mark_bull_bar, "tint": _mark_tint,
    "roof_colour": _mark_roof_colour, "side_logo": _mark_side_logo, "rear_decal": _mark_rear_decal,
    "hood_patch": _mark_hood_patch, "door_panel": _mark_door_panel, "bed_cover": _mark_bed_cover,
}
_CAR_MARKS = ("sticker", "roof_box", "roof_rack", "light_bar", "side_stripe", "top_stripe",
              "spare_wheel", "bull_bar", "tint", "roof_colour", "side_logo", "rear_decal",
              "hood_patch", "door_panel")
MARKS_BY_TYPE = {
    **dict.fromkeys(("sedan", "hatchback", "suv"), _CAR_MARKS),
    "van": tuple(m for m in _CAR_MARKS if m not in ("hood_patch", "top_stripe")),
    "pickup": tuple(m for m in _CAR_MARKS if m != "spare_wheel") + ("bed_cover",),
    "bus": ("sticker", "roof_box", "side_stripe", "side_logo", "rear_decal", "tint", "roof_colour"),
    "truck": ("sticker", "roof_box", "side_stripe", "side_logo", "rear_decal", "tint", "roof_colour",
              "bull_bar"),
}


def add_marks(b: Builder, ctx: dict, rng: np.random.Generator, paint, body: str) -> tuple[str, ...]:
    """Draw 1-3 distinct marks allowed for ``body`` and add them; returns their names."""
    options = MARKS_BY_TYPE[body]
    n_marks = int(rng.integers(1, 4))
    names = tuple(options[i] for i in sorted(rng.choice(len(options), n_marks, replace=False)))
    for name in names:
        MARKS[name](b, ctx, rng, paint)
    return names
