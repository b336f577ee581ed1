"""Identity marks: what tells apart the look-alike members of one family.

Members of a family (:mod:`.families`) share everything but their marks, so the marks
are the only identity cue inside a family, as stickers, roof boxes and repaired panels
are for two same-model, same-colour cars in real vehicle ReID (PVEN's Figure 1).

Rules every identity follows (:func:`mark_sets` lists the sets that obey them):

- 2 or 3 marks, each on a different face: ``front``, ``back``, ``side`` or ``top``
  (:data:`MARK_FACE`); at least one on the front or back and at least one on a
  side or the top, so most views show one.
- A side mark is put on both sides (at the same place along the vehicle), so it
  shows from the left and from the right.
- Every mark covers at least about a quarter of its face in each direction (a
  windshield sticker is a quarter of the windshield wide and a third of it high)
  and has a colour far from the surface under it (:func:`_contrast`): at the
  128 px training size a mark is several pixels across, never a speck.

A mark is a function ``(builder, ctx, rng, paint)`` that adds decals or small parts;
``ctx`` names the body's faces and dimensions (see the body builders in
:mod:`.vehicles`). :func:`add_marks` tags each mark's surfaces with its 1-based
index (:attr:`.geometry.Builder.mark`) so the renderer can tell which marks an
image shows.
"""
from __future__ import annotations

from itertools import combinations, product

import numpy as np

from .geometry import GLASS, LAMP, MATTE, PAINT, Builder, box, ellipse, face_size, rect

_MARK_COLOURS = ((240, 240, 236), (24, 24, 26), (200, 30, 30), (240, 200, 30),
                 (235, 120, 20), (30, 150, 60), (30, 90, 200), (150, 152, 156))
# Glass looks anywhere from dark grey to bright sky-blue-grey, depending on the
# camera's sky and the glass's slope, so no brightness stands out on every windshield:
# marks on glass take saturated warm colours instead, whose hue always does.
_GLASS_MARK_COLOURS = ((240, 200, 30), (235, 120, 20), (210, 35, 30), (70, 200, 70))
_TYRE = (24, 24, 26)

FACES: tuple[str, ...] = ("front", "back", "side", "top")


def _luma(colour) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _contrast(rng: np.random.Generator, base, options=_MARK_COLOURS) -> tuple[int, int, int]:
    """A colour of ``options`` that stands out from ``base``.

    Far in RGB (distance > 120) and in brightness (luma differs by > 70), so a mark
    shows in colour and in grey alike, also in shade; if no option passes, the one
    whose brightness differs most. Every paint has at least two of ``_MARK_COLOURS``.
    """
    good = [c for c in options
            if np.linalg.norm(np.subtract(c, base)) > 120 and abs(_luma(c) - _luma(base)) > 70]
    if not good:
        return max(options, key=lambda c: abs(_luma(c) - _luma(base)))
    return good[int(rng.integers(len(good)))]


def _mark_colour(rng: np.random.Generator, face) -> tuple[int, int, int]:
    """A colour for a mark on ``face``: saturated and warm on glass, else contrasting with the face.

    The face's own colour, not the paint: a truck's cargo box has a colour of its own.
    """
    if face.material == GLASS:
        return _GLASS_MARK_COLOURS[int(rng.integers(len(_GLASS_MARK_COLOURS)))]
    return _contrast(rng, face.colour)


# --------------------------------------------------------------------------- front

def _sticker(b: Builder, face, rng: np.random.Generator, v_choices: tuple[float, ...]) -> None:
    """A sticker in a corner of ``face``: 28-38 % of its width, 32-45 % of its height."""
    su, sv = float(rng.uniform(0.28, 0.38)), float(rng.uniform(0.32, 0.45))
    u0 = 0.05 if rng.random() < 0.5 else 0.95 - su
    v0 = v_choices[int(rng.integers(len(v_choices)))]
    v0 = min(v0, 0.95 - sv)
    b.decal(face, rect(u0, u0 + su, v0, v0 + sv), _mark_colour(rng, face))


def _mark_windshield_sticker(b, ctx, rng, paint):
    _sticker(b, ctx["windshield"], rng, (0.05, 1.0))


def _mark_sun_strip(b, ctx, rng, paint):
    """A coloured band across the top of the windshield."""
    h = float(rng.uniform(0.26, 0.34))
    b.decal(ctx["windshield"], rect(0.0, 1.0, 0.98 - h, 0.98), _mark_colour(rng, ctx["windshield"]))


def _mark_bull_bar(b, ctx, rng, paint):
    x, (z0, z1), hw = ctx["front_x"], ctx["front_z"], ctx["hw"]
    colour = _contrast(rng, paint, ((26, 26, 28), (175, 178, 182)))   # the front face is painted
    b.part("bull_bar", box(x + 0.03, x + 0.13, -hw + 0.22, hw - 0.22, z0 + 0.02,
                           z0 + 0.6 * (z1 - z0)), colour)


# --------------------------------------------------------------------------- back

def _mark_rear_sticker(b, ctx, rng, paint):
    # upper half: the lower part of a pickup's rear window hides behind the bed
    _sticker(b, ctx["rear_window"], rng, (0.5, 1.0))


def _mark_spare_wheel(b, ctx, rng, paint):
    face = ctx["back"]
    w, h = face_size(face.pts)
    r = min(0.34, 0.42 * h)
    b.decal(face, ellipse(0.5, 0.56, r / w, r / h), _TYRE, MATTE)
    b.decal(face, ellipse(0.5, 0.56, 0.62 * r / w, 0.62 * r / h), _contrast(rng, _TYRE))


def _mark_rear_decal(b, ctx, rng, paint):
    """A block (bumper sticker, dealer plate) beside the number plate, below the lamps."""
    w, h = float(rng.uniform(0.28, 0.34)), float(rng.uniform(0.30, 0.40))
    u0 = float(rng.uniform(0.04, 0.38 - w))
    if rng.random() < 0.5:
        u0 = 1.0 - u0 - w
    v0 = float(rng.uniform(0.12, 0.55 - h))
    b.decal(ctx["back"], rect(u0, u0 + w, v0, v0 + h), _mark_colour(rng, ctx["back"]))


# --------------------------------------------------------------------------- sides (both)

def _mark_side_stripe(b, ctx, rng, paint):
    lo, hi = ctx["side_band"]            # where on the side a stripe may go (a bus: below the windows)
    h = min(float(rng.uniform(0.25, 0.35)), hi - lo)
    v0 = float(rng.uniform(lo, hi - h))
    colour = _mark_colour(rng, ctx["sides"][0])
    for face in ctx["sides"]:
        b.decal(face, rect(0.03, 0.97, v0, v0 + h), colour)


def _mark_side_logo(b, ctx, rng, paint):
    ru, rv = float(rng.uniform(0.13, 0.18)), float(rng.uniform(0.22, 0.32))
    cu, cv = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.42, 0.58))
    shape = int(rng.integers(3))
    if shape == 0:
        poly = ellipse(cu, cv, ru, rv, 12)
    elif shape == 1:
        poly = np.array([(cu - ru, cv), (cu, cv - rv), (cu + ru, cv), (cu, cv + rv)])
    else:
        poly = rect(cu - 1.3 * ru, cu + 1.3 * ru, cv - 0.7 * rv, cv + 0.7 * rv)
    colour = _mark_colour(rng, ctx["sides"][0])
    for face in ctx["sides"]:
        b.decal(face, poly, colour)


def _mark_door_panel(b, ctx, rng, paint):
    """A door in another colour (a repair), the full height of the lower body."""
    w = float(rng.uniform(0.25, 0.3))
    u0 = float(rng.uniform(0.3, 0.7 - w))
    colour = _mark_colour(rng, ctx["sides"][0])
    for face in ctx["sides"]:
        b.decal(face, rect(u0, u0 + w, 0.04, 0.96), colour)


# --------------------------------------------------------------------------- top

def _roof_thing(b, ctx, name, length, width, height, x_centre, colour, material=PAINT):
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
    colour = _contrast(rng, ctx["roof"].colour, ((24, 24, 26), (200, 202, 205), (235, 235, 232), (70, 72, 76)))
    _roof_thing(b, ctx, "roof_box", length, 2 * ctx["roof_hw"] * float(rng.uniform(0.5, 0.75)),
                float(rng.uniform(0.18, 0.34)), cx, colour)


def _mark_light_bar(b, ctx, rng, paint):
    rx0, rx1 = ctx["roof_x"]
    length = max(0.3, 0.3 * (rx1 - rx0))
    colour = _contrast(rng, ctx["roof"].colour, ((240, 200, 30), (240, 240, 236), (210, 40, 40), (40, 90, 220)))
    _roof_thing(b, ctx, "light_bar", length, 1.6 * ctx["roof_hw"], float(rng.uniform(0.14, 0.18)),
                rx1 - length / 2 - 0.05, colour, LAMP)


def _mark_roof_colour(b, ctx, rng, paint):
    roof = ctx["roof"]
    roof.colour = (28.0, 29.0, 31.0) if _luma(roof.colour) > 110 else (232.0, 233.0, 230.0)
    roof.mark = b.mark


def _mark_top_stripe(b, ctx, rng, paint):
    """One wide band along the middle of the hood and the roof."""
    w = float(rng.uniform(0.26, 0.34))
    colour = _mark_colour(rng, ctx["hood"])
    for face in (ctx["hood"], ctx["roof"]):
        b.decal(face, rect(0.0, 1.0, 0.5 - w / 2, 0.5 + w / 2), colour)


def _mark_hood_patch(b, ctx, rng, paint):
    u0, u1 = ctx["hood_u"]
    colour = (22, 22, 24) if _luma(ctx["hood"].colour) > 100 else _mark_colour(rng, ctx["hood"])
    b.decal(ctx["hood"], rect(u0 + 0.15 * (u1 - u0), u1 - 0.03, 0.28, 0.72), colour, MATTE)


def _mark_bed_cover(b, ctx, rng, paint):
    bed = [b.find(n) for n in ("bed_left", "bed_right", "tailgate", "bulkhead")]
    x0 = min(p.faces["top"].pts[:, 0].min() for p in bed)
    x1 = max(p.faces["top"].pts[:, 0].max() for p in bed)
    z = float(bed[0].faces["top"].pts[0, 2])
    colour = _contrast(rng, paint, ((30, 30, 32), (205, 207, 210), (235, 235, 232)))   # the bed walls' paint
    b.part("bed_cover", box(x0, x1, -ctx["hw"], ctx["hw"], z, z + 0.04), colour, MATTE)


# --------------------------------------------------------------------------- tables

# name -> (face it is on, function), in the order marks are applied.
_MARKS = {
    "windshield_sticker": ("front", _mark_windshield_sticker),
    "sun_strip": ("front", _mark_sun_strip),
    "bull_bar": ("front", _mark_bull_bar),
    "rear_sticker": ("back", _mark_rear_sticker),
    "spare_wheel": ("back", _mark_spare_wheel),
    "rear_decal": ("back", _mark_rear_decal),
    "side_stripe": ("side", _mark_side_stripe),
    "side_logo": ("side", _mark_side_logo),
    "door_panel": ("side", _mark_door_panel),
    "roof_box": ("top", _mark_roof_box),
    "light_bar": ("top", _mark_light_bar),
    "roof_colour": ("top", _mark_roof_colour),
    "top_stripe": ("top", _mark_top_stripe),
    "hood_patch": ("top", _mark_hood_patch),
    "bed_cover": ("top", _mark_bed_cover),
}
MARKS = {name: fn for name, (_, fn) in _MARKS.items()}
MARK_FACE: dict[str, str] = {name: face for name, (face, _) in _MARKS.items()}

_CAR_MARKS = ("windshield_sticker", "sun_strip", "bull_bar", "rear_sticker", "spare_wheel", "rear_decal",
              "side_stripe", "side_logo", "door_panel", "roof_box", "light_bar", "roof_colour",
              "top_stripe", "hood_patch")
MARKS_BY_TYPE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("sedan", "hatchback", "suv"), _CAR_MARKS),
    "van": tuple(m for m in _CAR_MARKS if m not in ("hood_patch", "top_stripe")),
    "pickup": tuple(m for m in _CAR_MARKS if m != "spare_wheel") + ("bed_cover",),
    "bus": ("windshield_sticker", "sun_strip", "rear_decal", "side_stripe", "side_logo", "roof_box",
            "roof_colour"),
    "truck": ("windshield_sticker", "sun_strip", "bull_bar", "rear_decal", "side_stripe", "side_logo",
              "roof_box", "light_bar", "roof_colour"),
}


def mark_sets(body: str) -> list[tuple[str, ...]]:
    """Every mark set allowed for ``body`` (see the module rules), marks in application order."""
    options = MARKS_BY_TYPE[body]
    by_face = {f: [m for m in options if MARK_FACE[m] == f] for f in FACES}
    order = {name: i for i, name in enumerate(_MARKS)}
    sets = []
    for n in (2, 3):
        for faces in combinations(FACES, n):
            if not {"front", "back"} & set(faces) or not {"side", "top"} & set(faces):
                continue
            for names in product(*(by_face[f] for f in faces)):
                sets.append(tuple(sorted(names, key=order.__getitem__)))
    return sets


def draw_mark_sets(rng: np.random.Generator, body: str, n: int) -> list[tuple[str, ...]]:
    """``n`` different mark sets for ``body`` (one family): 2 or 3 marks with equal odds."""
    sets = mark_sets(body)
    if n > len(sets):
        raise ValueError(f"a {body} family of {n}: only {len(sets)} different mark sets exist")
    three = np.array([len(s) == 3 for s in sets])
    p = np.where(three, 0.5 / three.sum(), 0.5 / (~three).sum())
    return [sets[i] for i in rng.choice(len(sets), n, replace=False, p=p).tolist()]


def add_marks(b: Builder, ctx: dict, rng: np.random.Generator, paint, body: str,
              names: tuple[str, ...]) -> tuple[str, ...]:
    """Add the marks ``names`` (in order; the k-th is tagged k); returns ``names``."""
    if tuple(names) not in mark_sets(body):
        raise ValueError(f"marks {list(names)} on a {body}: expected one of marks.mark_sets({body!r}) "
                         f"(2-3 marks allowed for the body, on different faces, one on front/back "
                         f"and one on side/top, in application order)")
    for k, name in enumerate(names, start=1):
        b.mark = k
        MARKS[name](b, ctx, rng, paint)
    b.mark = 0
    return tuple(names)
