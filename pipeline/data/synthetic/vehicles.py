"""Procedural 3D vehicle identities built from a few convex parts.

Vehicle frame (metres): ``x`` forward (the front is +x), ``y`` to the vehicle's
left, ``z`` up; the origin is on the ground under the vehicle's centre.

An identity is a look and a mark set. The look is a body type (sedan, hatchback,
SUV, van, pickup, bus, truck) with size jitter, a body colour from a small palette
of common car colours (so many looks share type and colour) and the fittings' styles
(lamp shape, grille, tail lamps, rims, window layout, axles): everything drawn from
the ``rng`` given to :func:`build_vehicle`. Identities of one look-alike family
(:mod:`.families`) are built from the same seed, so they share all of that to the
bit; only their 2-3 marks (:mod:`.marks`: stickers, roof box, stripes, spare wheel,
bull bar, ...) differ, and each mark is visible only from some views.

Every part is a convex polyhedron; each face is a planar convex polygon with a
parsing label (0 background is never used here; 1 front, 2 back, 3 side, 4 top),
a material and a base colour. Decals (lamps, windows, marks) are polygons lying on
a face: they change the RGB image only, never the label. Wheels are a flat tyre
disc just outside each side (label side) plus a tyre block under the body (label
by its normals, so tyres seen under a bumper are front/back). For painter's-order
rendering, :func:`build_vehicle` also stores one separating plane per pair of parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import (
    BACK,
    FRONT,
    GLASS,
    LAMP,
    MATTE,
    PAINT,
    SIDE,
    TOP,
    Builder,
    Decal,
    Face,
    Part,
    box,
    ellipse,
    frustum,
    rect,
)
from .marks import add_marks, draw_mark_sets

BODY_TYPES: tuple[str, ...] = ("sedan", "hatchback", "suv", "van", "pickup", "bus", "truck")
_BODY_WEIGHTS = (0.27, 0.16, 0.22, 0.10, 0.08, 0.07, 0.10)

# Common car colours (RGB) and how often they occur: white/black/silver/grey dominate,
# as on real roads, so many identities share type and colour.
PAINTS: dict[str, tuple[int, int, int]] = {
    "white": (232, 233, 230), "black": (28, 29, 31), "silver": (180, 184, 188),
    "grey": (104, 107, 111), "red": (165, 30, 34), "blue": (34, 64, 142),
    "dark blue": (26, 36, 72), "beige": (196, 178, 146), "green": (42, 96, 62),
    "yellow": (226, 186, 34), "brown": (96, 62, 42),
}
_PAINT_WEIGHTS = (0.24, 0.17, 0.14, 0.13, 0.08, 0.08, 0.04, 0.04, 0.03, 0.03, 0.02)

_GLASS = (48, 60, 72)
_TYRE = (24, 24, 26)
_RIMS = ((166, 169, 173), (56, 57, 59), (208, 208, 202))
_HEADLAMP = (232, 232, 214)
_TAILLAMP = (172, 26, 26)
_GRILLES = ((30, 31, 33), (148, 150, 154))
_PLATE_CAR = (30, 70, 170)
_PLATE_HEAVY = (214, 176, 36)

# Base dimensions (m). L/W/H: length/width/height; clr: ground clearance of the
# lower body; belt: height of the lower body (hood and trunk level); r: wheel
# radius; nose/tail: how far the top edge of the lower body's front/back is set
# back; hood/trunk: horizontal length of hood and trunk deck; ws/rw: horizontal run
# of the windshield / rear window; tumble: how much narrower the roof is than the body.
_SPECS: dict[str, dict[str, float]] = {
    "sedan": dict(L=4.70, W=1.82, H=1.45, clr=0.20, belt=0.82, r=0.32, nose=0.14, tail=0.10,
                  hood=1.25, trunk=0.95, ws=0.75, rw=0.60, tumble=0.15, front_axle=0.95, rear_axle=1.05),
    "hatchback": dict(L=4.10, W=1.76, H=1.50, clr=0.18, belt=0.84, r=0.31, nose=0.14, tail=0.06,
                      hood=1.05, trunk=0.0, ws=0.70, rw=0.30, tumble=0.14, front_axle=0.85, rear_axle=0.75),
    "suv": dict(L=4.70, W=1.92, H=1.78, clr=0.30, belt=1.05, r=0.38, nose=0.10, tail=0.05,
                hood=1.15, trunk=0.0, ws=0.58, rw=0.18, tumble=0.12, front_axle=0.95, rear_axle=0.95),
    "van": dict(L=5.10, W=1.98, H=2.30, clr=0.22, belt=1.00, r=0.35, nose=0.12, tail=0.02,
                hood=0.55, trunk=0.0, ws=0.62, rw=0.04, tumble=0.06, front_axle=0.85, rear_axle=1.0),
    "pickup": dict(L=5.40, W=1.92, H=1.85, clr=0.32, belt=1.05, r=0.39, nose=0.08, tail=0.02,
                   hood=1.30, cab=1.70, ws=0.52, rw=0.06, tumble=0.10, bed_h=0.45,
                   front_axle=1.0, rear_axle=1.2),
    "bus": dict(L=11.0, W=2.50, H=3.10, clr=0.35, belt=1.15, r=0.50, nose=0.05, tail=0.05,
                hood=0.0, trunk=0.0, ws=0.22, rw=0.06, tumble=0.05, front_axle=2.3, rear_axle=2.8),
    "truck": dict(L=7.80, W=2.40, H=2.90, clr=0.60, belt=1.45, r=0.50, nose=0.03, cab=2.10,
                  box_h=3.50, floor=1.05, tumble=0.08, front_axle=1.1, rear_axle=1.5),
}

_CAR_TYPES = ("sedan", "hatchback", "suv", "van", "pickup")


def _jitter(rng: np.random.Generator, spec: dict[str, float], scale: float = 0.05) -> dict[str, float]:
    """Size jitter of a look (a family): every dimension scaled by its own factor in 1 +- scale."""
    return {k: v * float(1 + rng.uniform(-scale, scale)) for k, v in spec.items()}


def _paint(rng: np.random.Generator) -> tuple[str, tuple[float, ...]]:
    names = list(PAINTS)
    name = names[int(rng.choice(len(names), p=np.asarray(_PAINT_WEIGHTS) / sum(_PAINT_WEIGHTS)))]
    # A few levels of shade jitter: the same colour name from different makers.
    colour = tuple(float(np.clip(c + rng.uniform(-4, 4), 0, 255)) for c in PAINTS[name])
    return name, colour



# --------------------------------------------------------------------------- body types

def _front_fittings(b: Builder, face: Face, rng: np.random.Generator, heavy: bool) -> None:
    """Headlamps, grille and plate on a front face (lamp style varies per identity)."""
    style = int(rng.integers(3))
    if style == 0:      # wide rectangles
        lamps = [rect(0.05, 0.27, 0.62, 0.88), rect(0.73, 0.95, 0.62, 0.88)]
    elif style == 1:    # thin slits
        lamps = [rect(0.03, 0.30, 0.76, 0.90), rect(0.70, 0.97, 0.76, 0.90)]
    else:               # round-ish
        lamps = [ellipse(0.15, 0.72, 0.09, 0.15, 8), ellipse(0.85, 0.72, 0.09, 0.15, 8)]
    for lamp in lamps:
        b.decal(face, lamp, _HEADLAMP, LAMP)
    gw = float(rng.uniform(0.14, 0.22))
    b.decal(face, rect(0.5 - gw, 0.5 + gw, 0.42, 0.80), _GRILLES[int(rng.integers(2))], MATTE)
    b.decal(face, rect(0.40, 0.60, 0.10, 0.30), _PLATE_HEAVY if heavy else _PLATE_CAR, MATTE)


def _rear_fittings(b: Builder, face: Face, rng: np.random.Generator, heavy: bool,
                   v0: float = 0.58, v1: float = 0.86, plate_v: tuple[float, float] = (0.18, 0.40)) -> None:
    w = float(rng.uniform(0.14, 0.24))
    b.decal(face, rect(0.03, 0.03 + w, v0, v1), _TAILLAMP, LAMP)
    b.decal(face, rect(0.97 - w, 0.97, v0, v1), _TAILLAMP, LAMP)
    b.decal(face, rect(0.40, 0.60, *plate_v), _PLATE_HEAVY if heavy else _PLATE_CAR, MATTE)


def _windows(b: Builder, face: Face, spans: list[tuple[float, float]], v0: float, v1: float,
             glass) -> None:
    for u0, u1 in spans:
        b.decal(face, rect(u0, u1, v0, v1), glass, GLASS)


def _wheels(b: Builder, xs: list[float], hw: float, r: float, block_top: list[float],
            tyre_w: float, rim) -> None:
    """A 12-gon tyre disc just outside each body side (+ hub), plus a tyre block under the body.

    The disc is a flat polygon 1 cm outside the side plane, so a plane separates it
    from the body and painter's order stays exact; the block (below the body, seen
    from the front and back) gives the tyres their width.
    """
    ring = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    for i, (x, top) in enumerate(zip(xs, block_top)):
        for side, sign in (("left", 1.0), ("right", -1.0)):
            y = sign * (hw + 0.01)
            disc = np.stack([x + r * np.cos(ring), np.full(12, y), r + r * np.sin(ring)], axis=1)
            part = Part(f"wheel{i}_{side}", {side: Face(disc, side, MATTE, _TYRE)})
            hub = np.stack([x + 0.58 * r * np.cos(ring), np.full(12, y), r + 0.58 * r * np.sin(ring)], axis=1)
            part.faces[side].decals.append(Decal(hub, PAINT, tuple(map(float, rim))))
            b.parts.append(part)
            y_in, y_out = sign * (hw - tyre_w), sign * (hw - 0.02)
            b.part(f"tyre{i}_{side}", box(x - 0.55 * r, x + 0.55 * r, min(y_in, y_out),
                                          max(y_in, y_out), 0.0, top), _TYRE, MATTE)


def _car(b: Builder, kind: str, p: dict[str, float], paint, glass, rng: np.random.Generator) -> dict:
    """Sedan, hatchback, SUV, van and pickup: a lower body, a cabin, wheels (pickup: a bed)."""
    L, W, H, clr, belt = p["L"], p["W"], p["H"], p["clr"], p["belt"]
    hw = W / 2
    xb, xf = -L / 2 + p["tail"], L / 2 - p["nose"]          # top edge of the lower body
    body = b.part("body", frustum(-L / 2, L / 2, -hw, hw, clr, xb, xf, -hw, hw, belt), paint,
                  roles={"left": "body_left", "right": "body_right", "top": "deck"})
    x1 = xf - p["hood"]                                       # windshield base
    if kind == "pickup":
        x0 = x1 - p["cab"]
    else:
        x0 = xb + p["trunk"]
    cw, tw = hw - 0.03, hw - p["tumble"]
    tx0, tx1 = x0 + p["rw"], x1 - p["ws"]
    if tx1 - tx0 < 0.4:                                       # keep a roof after jitter
        mid = (tx0 + tx1) / 2
        tx0, tx1 = mid - 0.2, mid + 0.2
    van = kind == "van"
    cabin = b.part("cabin", frustum(x0, x1, -cw, cw, belt, tx0, tx1, -tw, tw, H), paint,
                   roles={"front": "windshield", "back": "rear_window", "left": "cabin_left",
                          "right": "cabin_right", "top": "roof"},
                   materials={"front": GLASS, "back": PAINT if van else GLASS})
    cabin.faces["windshield"].colour = glass
    if not van:
        cabin.faces["rear_window"].colour = glass
    else:   # van rear doors: paint with two windows
        _windows(b, cabin.faces["rear_window"], [(0.06, 0.48), (0.52, 0.94)], 0.40, 0.90, glass)
    for side in ("cabin_left", "cabin_right"):
        face = cabin.faces[side]
        if kind == "van" and rng.random() < 0.5:              # delivery van: front door window only
            spans = [(0.80, 0.95)]
        elif kind == "van":
            spans = [(0.05, 0.30), (0.34, 0.62), (0.66, 0.95)]
        elif kind == "suv":
            spans = [(0.05, 0.30), (0.34, 0.62), (0.66, 0.94)]
        elif kind == "pickup":
            spans = [(0.06, 0.46), (0.52, 0.94)]
        else:
            spans = [(0.06, 0.48), (0.52, 0.94)]
        _windows(b, face, spans, 0.08 if not van else 0.45, 0.90, glass)
    heavy = False
    _front_fittings(b, body.faces["front"], rng, heavy)
    _rear_fittings(b, body.faces["back"], rng, heavy)
    if kind == "pickup":                                      # open bed: four thin walls
        bx0, bx1, top, t = xb + 0.02, x0 - 0.06, belt + p["bed_h"], 0.07
        walls = {"bed_left": (bx0, bx1, hw - t, hw), "bed_right": (bx0, bx1, -hw, -hw + t),
                 "tailgate": (bx0, bx0 + t, -hw + t, hw - t), "bulkhead": (bx1 - t, bx1, -hw + t, hw - t)}
        for name, (a0, a1, c0, c1) in walls.items():
            b.part(name, box(a0, a1, c0, c1, belt, top), paint)
        deck = body.faces["deck"]
        u0, u1 = (bx0 - xb) / (xf - xb), (bx1 - xb) / (xf - xb)
        b.decal(deck, rect(u0, u1, 0.04, 0.96), (38, 38, 40), MATTE)
    xs = [L / 2 - p["front_axle"], -L / 2 + p["rear_axle"]]
    _wheels(b, xs, hw, p["r"], [clr, clr], 0.22, _RIMS[int(rng.integers(3))])
    roof = cabin.faces["roof"]
    return dict(roof=roof, roof_x=(tx0, tx1), roof_hw=tw, roof_z=H, hood=body.faces["deck"],
                hood_u=((x1 - xb) / (xf - xb), 1.0), sides=[body.faces["body_left"], body.faces["body_right"]],
                side_band=(0.1, 0.9), back=body.faces["back"], front_x=L / 2, front_z=(clr, belt), hw=hw,
                windshield=cabin.faces["windshield"], rear_window=cabin.faces["rear_window"])


def _bus(b: Builder, p: dict[str, float], paint, glass, rng: np.random.Generator) -> dict:
    L, W, H, clr, belt = p["L"], p["W"], p["H"], p["clr"], p["belt"]
    hw = W / 2
    xb, xf = -L / 2 + p["tail"], L / 2 - p["nose"]
    body = b.part("body", frustum(-L / 2, L / 2, -hw, hw, clr, xb, xf, -hw, hw, belt), paint,
                  roles={"left": "body_left", "right": "body_right", "top": "deck"})
    cw, tw = hw - 0.02, hw - p["tumble"]
    tx0, tx1 = xb + p["rw"], xf - p["ws"]
    cabin = b.part("cabin", frustum(xb, xf, -cw, cw, belt, tx0, tx1, -tw, tw, H), paint,
                   roles={"front": "windshield", "back": "rear_window", "left": "cabin_left",
                          "right": "cabin_right", "top": "roof"}, materials={"front": GLASS})
    cabin.faces["windshield"].colour = glass
    b.decal(cabin.faces["rear_window"], rect(0.12, 0.88, 0.45, 0.85), glass, GLASS)
    n = int(rng.integers(6, 9))
    edges = np.linspace(0.03, 0.90, n + 1)
    spans = [(float(a) + 0.008, float(c) - 0.008) for a, c in zip(edges[:-1], edges[1:])]
    for side in ("cabin_left", "cabin_right"):
        _windows(b, cabin.faces[side], spans, 0.32, 0.86, glass)
    # passenger door on the kerb (right) side near the front, through both layers
    b.decal(cabin.faces["cabin_right"], rect(0.91, 0.97, 0.0, 0.86), glass, GLASS)
    b.decal(body.faces["body_right"], rect(0.91, 0.97, 0.0, 1.0), glass, GLASS)
    _front_fittings(b, body.faces["front"], rng, True)
    _rear_fittings(b, body.faces["back"], rng, True)
    _wheels(b, [L / 2 - p["front_axle"], -L / 2 + p["rear_axle"]], hw, p["r"], [clr, clr], 0.30,
            _RIMS[int(rng.integers(3))])
    return dict(roof=cabin.faces["roof"], roof_x=(tx0, tx1), roof_hw=tw, roof_z=H, hood=None,
                sides=[cabin.faces["cabin_left"], cabin.faces["cabin_right"]], side_band=(0.02, 0.30),
                back=body.faces["back"], front_x=L / 2, front_z=(clr, belt), hw=hw,
                windshield=cabin.faces["windshield"], rear_window=None)


def _truck(b: Builder, p: dict[str, float], paint, glass, rng: np.random.Generator) -> dict:
    """A cab (lower body + cabin) in front of a taller cargo box on a narrow frame."""
    L, W, H, clr, belt = p["L"], p["W"], p["H"], p["clr"], p["belt"]
    hw = W / 2
    xc = L / 2 - p["cab"]                                     # back of the cab
    body = b.part("body", frustum(xc, L / 2, -hw, hw, clr, xc, L / 2 - p["nose"], -hw, hw, belt),
                  paint, roles={"left": "body_left", "right": "body_right", "top": "deck"})
    cw, tw = hw - 0.02, hw - p["tumble"]
    cabin = b.part("cabin", frustum(xc, L / 2 - p["nose"], -cw, cw, belt, xc, L / 2 - 0.38, -tw, tw, H),
                   paint, roles={"front": "windshield", "back": "cab_back", "left": "cabin_left",
                                 "right": "cabin_right", "top": "roof"}, materials={"front": GLASS})
    cabin.faces["windshield"].colour = glass
    for side in ("cabin_left", "cabin_right"):
        _windows(b, cabin.faces[side], [(0.50, 0.90)], 0.40, 0.88, glass)
    _, cargo_colour = _paint(rng)
    floor, top = p["floor"], p["box_h"]
    cargo = b.part("cargo", box(-L / 2, xc - 0.12, -hw, hw, floor, top), cargo_colour,
                   roles={"left": "cargo_left", "right": "cargo_right", "top": "cargo_top",
                          "back": "cargo_back", "front": "cargo_front"})
    b.part("frame", box(-L / 2 + 0.4, xc, -hw + 0.45, hw - 0.45, clr, floor), (40, 40, 42), MATTE)
    _front_fittings(b, body.faces["front"], rng, True)
    back = cargo.faces["cargo_back"]
    b.decal(back, rect(0.497, 0.503, 0.06, 0.98), (60, 60, 62), MATTE)   # door seam
    _rear_fittings(b, back, rng, True, v0=0.02, v1=0.09, plate_v=(0.02, 0.10))
    rear = [-L / 2 + p["rear_axle"]]
    if rng.random() < 0.5:                                    # tandem rear axle
        rear.append(rear[0] + 1.1)
    xs = [L / 2 - p["front_axle"]] + rear
    _wheels(b, xs, hw, p["r"], [clr] + [2 * p["r"]] * len(rear), 0.38, _RIMS[int(rng.integers(3))])
    return dict(roof=cabin.faces["roof"], roof_x=(xc + 0.1, L / 2 - 0.5), roof_hw=tw, roof_z=H, hood=None,
                sides=[cargo.faces["cargo_left"], cargo.faces["cargo_right"]], side_band=(0.1, 0.9), back=back,
                front_x=L / 2, front_z=(clr, belt), hw=hw, windshield=cabin.faces["windshield"],
                rear_window=None)


# --------------------------------------------------------------------------- compiled model

@dataclass(frozen=True)
class VehicleModel:
    """A rendered-ready identity: flat arrays for vectorised projection and shading.

    verts:       (V, 3) float64, every face and decal polygon, back to back
    spans:       (S, 2) int, [start, stop) rows of ``verts`` for surface s (faces and decals)
    normal:      (S, 3) outward unit normal (a decal has its face's normal)
    point:       (S, 3) a point on the surface's plane
    material:    (S,) PAINT/GLASS/LAMP/MATTE
    colour:      (S, 3) float base colour (RGB 0..255)
    label:       (S,) uint8 parsing label of faces (decals: their face's label)
    mark:        (S,) uint8, 0 or k: the surface belongs to mark ``marks[k - 1]``
    parts:       per part, a tuple of (face surface, (decal surfaces...))
    part_rows:   (P, 2) int, [start, stop) rows of ``verts`` holding part p (faces and decals)
    pair_lo/pair_hi/pair_normal/pair_offset: one separating plane per pair of parts;
                 ``pair_lo`` lies on the side ``normal . x < offset``
    body, paint: body type and paint colour name; marks: the identity's mark names
    size:        (L, W, H) in metres, of the vehicle without its marks (a family's is the same)
    """
    verts: np.ndarray
    spans: np.ndarray
    normal: np.ndarray
    point: np.ndarray
    material: np.ndarray
    colour: np.ndarray
    label: np.ndarray
    mark: np.ndarray
    parts: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...]
    part_rows: np.ndarray
    pair_lo: np.ndarray
    pair_hi: np.ndarray
    pair_normal: np.ndarray
    pair_offset: np.ndarray
    body: str
    paint: str
    marks: tuple[str, ...]
    size: tuple[float, float, float]


def face_label(normal: np.ndarray, role: str) -> int:
    """Parsing label of a face: windshield/rear window/roof by role, else the dominant normal."""
    if role == "windshield":
        return FRONT
    if role == "rear_window":
        return BACK
    if role == "roof":
        return TOP
    axis = int(np.argmax(np.abs(normal)))
    if axis == 0:
        return FRONT if normal[0] > 0 else BACK
    if axis == 1:
        return SIDE
    return TOP  # downward faces are never built (cameras are above the ground)


def _newell(pts: np.ndarray) -> np.ndarray:
    """Unit normal of a planar polygon (Newell's method; sign follows the vertex order)."""
    n = np.cross(pts, np.roll(pts, -1, axis=0)).sum(0)
    return n / np.linalg.norm(n)


def _separating_planes(part_verts: list[np.ndarray], normals: np.ndarray):
    """One plane per pair of parts: the candidate direction along which they overlap least.

    For parts i < j returns (lo, hi, n, offset): plane ``n . x = offset`` lies midway
    between the two parts along n, with part ``lo`` on its negative side. Parts that
    touch (a cabin on its lower body) get the touching plane. Candidates are all face
    normals of the model plus the axes; any direction that separates is a valid
    painter's-order plane, and the largest gap is the most robust one.
    """
    proj = [v @ normals.T for v in part_verts]                  # (n_i, K) each
    pmin = np.stack([p.min(0) for p in proj])                   # (P, K)
    pmax = np.stack([p.max(0) for p in proj])
    i, j = np.triu_indices(len(part_verts), k=1)
    gap_ij = pmin[j] - pmax[i]                                  # > 0: i entirely below j along n
    gap_ji = pmin[i] - pmax[j]
    # Prefer the axes (by 0.1 m of gap): axis planes of box-like parts order them
    # consistently with each other, oblique ones can make the order cyclic.
    bonus = 0.1 * (np.abs(normals).max(1) > 1 - 1e-9)
    score_ij, score_ji = gap_ij + bonus, gap_ji + bonus
    i_low = score_ij.max(1) >= score_ji.max(1)
    k = np.where(i_low, score_ij.argmax(1), score_ji.argmax(1))
    offset = np.where(i_low, pmin[j, k] + pmax[i, k], pmin[i, k] + pmax[j, k]) / 2
    return np.where(i_low, i, j), np.where(i_low, j, i), normals[k], offset


def _compile(parts: list[Part], body: str, paint: str, marks: tuple[str, ...],
             size: tuple[float, float, float]) -> VehicleModel:
    verts, spans, normal, point, material, colour, label, mark = [], [], [], [], [], [], [], []
    compiled, part_verts, part_rows = [], [], []
    n_rows = 0

    def add(pts, n, mat, col, lab, tag) -> int:
        nonlocal n_rows
        verts.append(pts)
        spans.append((n_rows, n_rows + len(pts)))
        n_rows += len(pts)
        normal.append(n)
        point.append(pts[0])
        material.append(mat)
        colour.append(col)
        label.append(lab)
        mark.append(tag)
        return len(spans) - 1

    for part in parts:
        centre = np.concatenate([f.pts for f in part.faces.values()]).mean(0)
        first_row = n_rows
        entries = []
        for face in part.faces.values():
            n = _newell(face.pts)
            if len(part.faces) == 1:        # a wheel disc: outward = away from the body (y sign)
                if np.dot(n, [0, np.sign(face.pts[0, 1]), 0]) < 0:
                    n = -n
            elif np.dot(n, face.pts.mean(0) - centre) < 0:
                n = -n
            lab = face_label(n, face.role)
            sid = add(face.pts, n, face.material, face.colour, lab, face.mark)
            decals = tuple(add(d.pts, n, d.material, d.colour, lab, d.mark) for d in face.decals)
            entries.append((sid, decals))
        compiled.append(tuple(entries))
        part_rows.append((first_row, n_rows))
        part_verts.append(np.concatenate([f.pts for f in part.faces.values()]))

    cand = np.unique(np.round(np.concatenate([np.asarray(normal), np.eye(3)]), 9), axis=0)
    lo, hi, pn, po = _separating_planes(part_verts, cand)
    return VehicleModel(
        verts=np.concatenate(verts), spans=np.asarray(spans, dtype=np.int64),
        normal=np.asarray(normal), point=np.asarray(point), material=np.asarray(material, dtype=np.int8),
        colour=np.asarray(colour, dtype=np.float64), label=np.asarray(label, dtype=np.uint8),
        mark=np.asarray(mark, dtype=np.uint8), parts=tuple(compiled), part_rows=np.asarray(part_rows, dtype=np.int64),
        pair_lo=np.asarray(lo, dtype=np.int64), pair_hi=np.asarray(hi, dtype=np.int64),
        pair_normal=np.asarray(pn).reshape(-1, 3), pair_offset=np.asarray(po),
        body=body, paint=paint, marks=marks, size=size)


def draw_body(rng: np.random.Generator) -> str:
    """A body type, drawn with the road-like frequencies of ``_BODY_WEIGHTS``."""
    return BODY_TYPES[int(rng.choice(len(BODY_TYPES), p=np.asarray(_BODY_WEIGHTS) / sum(_BODY_WEIGHTS)))]


def build_vehicle(rng: np.random.Generator, body: str | None = None, marks: tuple[str, ...] | None = None,
                  mark_rng: np.random.Generator | None = None) -> VehicleModel:
    """Build one identity: the look drawn from ``rng``, then the marks ``marks``.

    ``rng`` draws the body type (unless ``body`` is given), size jitter, paint and
    every fitting's style, and nothing else, so two calls with equally seeded
    generators give the same look (a family). ``marks`` are mark names forming one
    of :func:`.marks.mark_sets`; ``None`` draws a set from ``rng``. ``mark_rng``
    draws the marks' placement and colours (default: ``rng``, after the look).
    """
    if body is None:
        body = draw_body(rng)
    elif body not in _SPECS:
        raise ValueError(f"body type {body!r}: expected one of {', '.join(BODY_TYPES)}")
    spec = _jitter(rng, _SPECS[body])
    paint_name, paint = _paint(rng)
    b = Builder()
    glass = _GLASS
    if body in _CAR_TYPES:
        ctx = _car(b, body, spec, paint, glass, rng)
    elif body == "bus":
        ctx = _bus(b, spec, paint, glass, rng)
    else:
        ctx = _truck(b, spec, paint, glass, rng)
    height = max(float(p.faces[r].pts[:, 2].max()) for p in b.parts for r in p.faces)   # before marks
    if marks is None:
        marks = draw_mark_sets(rng, body, 1)[0]
    names = add_marks(b, ctx, rng if mark_rng is None else mark_rng, paint, body, tuple(marks))
    return _compile(b.parts, body, paint_name, names, (spec["L"], spec["W"], height))
