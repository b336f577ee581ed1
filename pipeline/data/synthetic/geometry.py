"""Geometry primitives for the procedural vehicles: convex parts, faces, decals.

Vehicle frame (metres): ``x`` forward (the front is +x), ``y`` to the vehicle's
left, ``z`` up; the origin is on the ground under the vehicle's centre.

A part is a convex polyhedron given by its faces; a face is a planar convex
polygon with a role (``"windshield"``, ``"roof"``, ``"left"`` ...), a material and a
base colour. Decals are polygons lying on a face (lamps, windows, marks): they
change the RGB image only, never the label.

Faces and decals carry a ``mark`` tag: 0 for the vehicle itself, ``k`` for a surface
that belongs to the identity's k-th mark (:mod:`.marks`). The builder stamps its
current tag on everything it adds, so a mark function needs no bookkeeping; the
renderer draws the tags into a mark map to measure which marks an image shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.constants import VIEW_NAMES

# Parsing labels of the four faces (pipeline.constants.VIEW_NAMES: 1 front, 2 back, 3 side, 4 top).
FRONT, BACK, SIDE, TOP = (VIEW_NAMES.index(name) for name in ("front", "back", "side", "top"))

# Materials: how a surface reacts to light (see scene.shade).
PAINT, GLASS, LAMP, MATTE = 0, 1, 2, 3


@dataclass
class Decal:
    pts: np.ndarray          # (k, 3) polygon on its face's plane
    material: int
    colour: tuple[float, float, float]
    mark: int = 0            # 0: not a mark; k: part of the identity's k-th mark


@dataclass
class Face:
    pts: np.ndarray          # (k, 3) planar convex polygon
    role: str
    material: int
    colour: tuple[float, float, float]
    decals: list[Decal] = field(default_factory=list)
    mark: int = 0            # as Decal.mark (a whole face that is a mark, e.g. a repainted roof)


@dataclass
class Part:
    name: str
    faces: dict[str, Face]  # role -> face


def frustum(bx0: float, bx1: float, by0: float, by1: float, z0: float,
            tx0: float, tx1: float, ty0: float, ty1: float, z1: float) -> dict[str, np.ndarray]:
    """Corners of a convex hexahedron with axis-aligned rectangles at z0 (bottom) and z1 (top).

    Any such shape has planar faces (each side face has two parallel edges). Returns
    role -> (4, 3) corners ordered (c00, c10, c11, c01) so that ``u`` runs along the
    first edge and ``v`` up (top face: u along +x, v along +y; sides: u along +x;
    front/back: u along +y). The bottom face is left out: cameras are always above
    the ground, so it is never visible.
    """
    b = [(bx0, by0, z0), (bx1, by0, z0), (bx1, by1, z0), (bx0, by1, z0)]
    t = [(tx0, ty0, z1), (tx1, ty0, z1), (tx1, ty1, z1), (tx0, ty1, z1)]
    quad = lambda *p: np.array(p, dtype=np.float64)  # noqa: E731
    return {"front": quad(b[1], b[2], t[2], t[1]), "back": quad(b[0], b[3], t[3], t[0]),
            "left": quad(b[3], b[2], t[2], t[3]), "right": quad(b[0], b[1], t[1], t[0]),
            "top": quad(t[0], t[1], t[2], t[3])}


def box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float,
        inset: float = 0.0) -> dict[str, np.ndarray]:
    """An axis-aligned box whose top is inset by ``inset`` on every side (rounded look)."""
    return frustum(x0, x1, y0, y1, z0, x0 + inset, x1 - inset, y0 + inset, y1 - inset, z1)


def uv_map(corners: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear map of (k, 2) face coordinates in [0, 1]^2 onto a (4, 3) quad -> (k, 3)."""
    u, v = uv[:, :1], uv[:, 1:]
    c00, c10, c11, c01 = corners
    return (1 - u) * (1 - v) * c00 + u * (1 - v) * c10 + u * v * c11 + (1 - u) * v * c01


def rect(u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return np.array([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], dtype=np.float64)


def ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 12) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cu + ru * np.cos(a), cv + rv * np.sin(a)], axis=1)


def face_size(corners: np.ndarray) -> tuple[float, float]:
    """Mean length of a quad face along u and along v (m)."""
    c00, c10, c11, c01 = corners
    return (float(np.linalg.norm(c10 - c00) + np.linalg.norm(c11 - c01)) / 2,
            float(np.linalg.norm(c01 - c00) + np.linalg.norm(c11 - c10)) / 2)


class Builder:
    """Collects parts and decals; everything added is tagged with the current ``mark``."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.mark = 0       # set by marks.add_marks around each mark function

    def part(self, name: str, corners: dict[str, np.ndarray], colour, material: int = PAINT,
             roles: dict[str, str] | None = None, materials: dict[str, int] | None = None) -> Part:
        """Add a convex part; ``roles`` renames faces, ``materials`` overrides per face."""
        roles = roles or {}
        materials = materials or {}
        faces = {}
        for key, pts in corners.items():
            role = roles.get(key, key)
            faces[role] = Face(pts, role, materials.get(key, material), tuple(map(float, colour)),
                               mark=self.mark)
        p = Part(name, faces)
        self.parts.append(p)
        return p

    def find(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def decal(self, face: Face, uv: np.ndarray, colour, material: int = PAINT) -> None:
        """Add a decal given in the face's (u, v) coordinates (see :func:`uv_map`)."""
        face.decals.append(Decal(uv_map(face.pts, uv), material, tuple(map(float, colour)), self.mark))
