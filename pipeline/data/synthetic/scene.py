"""Cameras, per-image views and the rasteriser: one vehicle -> (RGB image, label map).

Geometry: the vehicle frame of :mod:`.vehicles` is the world frame; the road runs
along x. A camera is a pinhole at azimuth ``az`` (degrees, 0 = in front of the
vehicle, 90 = on its left, 180 = behind), elevation ``el`` (degrees above the
ground) and distance ``d`` (m; times length / 6 m for vehicles longer than 6 m)
from a point at 45 % of the vehicle's height. The projection is then cropped like
a detector box: the vehicle's projected extent is fitted into the square image
with a margin, each axis stretched at most 1.5x (real ReID crops are resized to a
square regardless of aspect).

Rasterisation is PIL polygon filling with back-face culling and painter's order
between convex parts (one separating plane per pair of parts). Every visible face
is drawn with the same coordinates into the RGB image and into an 'L' label image,
so labels are pixel-exact; decals go into the RGB image only. The 'L' image holds
``label + 8 * mark`` (mark: the 1-based index of the identity mark a surface belongs
to, 0 for none); decals whose mark differs from their face's are drawn into it too.
Its low 3 bits are the label map and its high bits the mark map, which tells, pixel
for pixel, which mark (if any) the image shows there, at the cost of one extra
polygon per mark decal.

Per camera (fixed for all identities passing it): viewpoint range, distance,
light direction relative to the view, colour cast, road/verge/far colours, lanes,
texture strength, blur and sensor noise. Per identity and camera: direction of
travel (front or back seen), lane, viewpoint offset. Per image: small jitter of
viewpoint, distance, crop and exposure, and the lane-dash phase (the vehicle moves).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .vehicles import GLASS, LAMP, MATTE, PAINT, VehicleModel

_NEAR = 0.5          # m: ground polygons are clipped to this depth in front of the camera
_LANE = 3.5          # m: lane width
_ASPECT_MAX = 1.5    # how much a crop may stretch one axis relative to the other


@dataclass(frozen=True)
class CameraSpec:
    """Everything that stays the same for one camera (angles in degrees, lengths in m)."""
    camera: int
    az_center: float          # azimuth seen when a vehicle drives toward the camera
    elevation: float
    distance: float
    light_az: float           # light azimuth relative to the view direction
    light_el: float
    ambient: float
    diffuse: float
    cast: tuple[float, float, float]   # per-channel gain (colour cast x exposure)
    sky: tuple[float, float, float]    # colour reflected by glass
    road: tuple[float, float, float]
    verge: tuple[float, float, float]
    far: tuple[float, float, float]
    line: tuple[float, float, float]
    lanes: int
    texture: float            # road texture amplitude (0..255 levels)
    noise: float              # sensor noise sigma (0..255 levels)
    blur: float               # optical blur sigma in pixels at 128 px (scaled with size)


@dataclass(frozen=True)
class View:
    """One image's viewpoint and jitter."""
    azimuth: float            # degrees in (-180, 180]
    elevation: float          # degrees
    distance: float           # m
    lane_offset: float        # m: the vehicle's lateral position in its lane
    lane_index: int
    dash_phase: float         # m
    margin: float             # share of the image left around the vehicle
    shift: tuple[float, float]  # crop offset, share of the image
    exposure: float
    tex_offset: tuple[int, int]
    noise_offset: tuple[int, int]


@lru_cache(maxsize=4096)
def camera_spec(seed: int, camera: int) -> CameraSpec:
    """The fixed look of camera ``camera`` (1-based) for dataset seed ``seed``."""
    rng = np.random.default_rng([seed, 0xCA, camera])
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    grey = u(70, 130)
    road = (grey + u(-6, 6), grey + u(-6, 6), grey + u(-4, 8))
    verges = ((70, 110, 55), (150, 148, 140), (120, 100, 75), (95, 95, 98))
    fars = ((140, 150, 160), (110, 100, 90), (70, 95, 70), (170, 170, 165), (60, 62, 70))
    tint = np.array([u(0.9, 1.1), u(0.92, 1.08), u(0.88, 1.12)])
    exposure = u(0.78, 1.12)
    return CameraSpec(
        camera=camera, az_center=u(-90, 90), elevation=u(6, 38), distance=u(9, 30),
        light_az=u(-180, 180), light_el=u(20, 70), ambient=u(0.38, 0.55), diffuse=u(0.45, 0.7),
        cast=tuple(float(x) for x in tint / tint.mean() * exposure),
        sky=(u(140, 200), u(150, 205), u(165, 220)),
        road=road, verge=tuple(float(c) + u(-10, 10) for c in verges[int(rng.integers(4))]),
        far=tuple(float(c) + u(-15, 15) for c in fars[int(rng.integers(5))]),
        line=(235.0, 235.0, 228.0) if rng.random() < 0.75 else (225.0, 185.0, 40.0),
        lanes=int(rng.integers(2, 5)), texture=u(4, 16), noise=u(1.5, 7.0), blur=u(0.0, 0.9))


def pass_view_base(seed: int, vid: int, camera: int, spec: CameraSpec) -> dict:
    """What one identity's pass under one camera shares: direction of travel, lane, offsets."""
    rng = np.random.default_rng([seed, 0x9A55, vid, camera])
    toward = rng.random() < 0.5      # driving toward the camera (front seen) or away (back seen)
    return dict(azimuth=spec.az_center + (0.0 if toward else 180.0) + float(rng.uniform(-10, 10)),
                elevation=spec.elevation + float(rng.uniform(-3, 3)),
                distance=spec.distance * float(rng.uniform(0.85, 1.15)),
                lane_offset=float(rng.uniform(-0.4, 0.4)),
                lane_index=int(rng.integers(spec.lanes)))


def image_view(seed: int, vid: int, camera: int, index: int, spec: CameraSpec, size: int) -> View:
    """The view of image ``index`` of identity ``vid`` under ``camera`` (small jitter per frame)."""
    base = pass_view_base(seed, vid, camera, spec)
    rng = np.random.default_rng([seed, 0x1A6E, vid, camera, index])
    az = base["azimuth"] + float(rng.uniform(-5, 5))
    margin = float(rng.uniform(0.06, 0.16))
    room = max(0.0, margin / 2 - 2.0 / size)   # the vehicle stays >= 2 px from the border
    pad = _pad(size)
    return View(
        azimuth=180.0 - (180.0 - az) % 360.0,          # in (-180, 180]
        elevation=float(np.clip(base["elevation"] + rng.uniform(-1.5, 1.5), 3.0, 60.0)),
        distance=base["distance"] * float(rng.uniform(0.95, 1.05)),
        lane_offset=base["lane_offset"], lane_index=base["lane_index"],
        dash_phase=float(rng.uniform(0, 9)), margin=margin,
        shift=(float(rng.uniform(-room, room)), float(rng.uniform(-room, room))),
        exposure=float(rng.uniform(0.94, 1.06)),
        tex_offset=(int(rng.integers(pad)), int(rng.integers(pad))),
        noise_offset=(int(rng.integers(pad)), int(rng.integers(pad))))


def _pad(size: int) -> int:
    """Extra rows/columns of the per-camera fields, i.e. the range of random crop offsets."""
    return max(16, min(64, size // 2))


@lru_cache(maxsize=32)
def camera_fields(seed: int, camera: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-camera road texture (H, W) and sensor noise (H, W, 3), int8, padded for random crops.

    Precomputed once per camera (per process) and cropped at a per-image offset, so
    per-image cost is a slice and an add rather than fresh random numbers.
    """
    spec = camera_spec(seed, camera)
    rng = np.random.default_rng([seed, 0x7E47, camera, size])
    n = size + _pad(size)
    coarse = rng.standard_normal((n // 8 + 2, n // 8 + 2))
    blotches = np.kron(coarse, np.ones((8, 8)))[:n, :n]   # patchy asphalt
    grain = rng.standard_normal((n, n))
    texture = spec.texture * (0.6 * blotches + 0.5 * grain)
    noise = spec.noise * rng.standard_normal((n, n, 3))
    return (np.clip(texture, -120, 120).astype(np.int8), np.clip(noise, -120, 120).astype(np.int8))


# --------------------------------------------------------------------------- geometry

def _sph(az_deg: float, el_deg: float) -> np.ndarray:
    a, e = math.radians(az_deg), math.radians(el_deg)
    return np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


class _Camera:
    """Pinhole at ``eye`` looking at ``target``; ``to_cam`` gives (right, down, depth) coords."""

    def __init__(self, eye: np.ndarray, target: np.ndarray) -> None:
        f = target - eye
        f /= np.linalg.norm(f)
        r = np.array([f[1], -f[0], 0.0])          # f x (0, 0, 1): horizontal, to the right
        r /= np.linalg.norm(r)
        d = np.array([f[1] * r[2] - f[2] * r[1],  # f x r: image "down" (right-handed frame)
                      f[2] * r[0] - f[0] * r[2],
                      f[0] * r[1] - f[1] * r[0]])
        self.eye = eye
        self.rot = np.stack([r, d, f])

    def to_cam(self, pts: np.ndarray) -> np.ndarray:
        return (pts - self.eye) @ self.rot.T


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a (k, 3) camera-space polygon to depth >= _NEAR."""
    out = []
    for a, b in zip(poly, poly[list(range(1, len(poly))) + [0]]):
        ina, inb = a[2] >= _NEAR, b[2] >= _NEAR
        if ina:
            out.append(a)
        if ina != inb:
            t = (_NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.asarray(out).reshape(-1, 3)


def _convex_hull(pts: np.ndarray) -> np.ndarray:
    """Monotone-chain convex hull of (k, 2) points."""
    pts = sorted(map(tuple, pts))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])  # noqa: E731
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1])


# --------------------------------------------------------------------------- shading

def shade(model: VehicleModel, eye: np.ndarray, light: np.ndarray, spec: CameraSpec,
          gain: np.ndarray) -> np.ndarray:
    """Flat-shaded colour of every surface, (S, 3) float 0..255 (before clipping)."""
    n = model.normal
    ndl = np.clip(n @ light, 0.0, None)[:, None]
    view = eye - model.point
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    half = light + view
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec_term = np.clip(np.einsum("ij,ij->i", n, half), 0.0, None)[:, None] ** 24
    base = model.colour
    lit = base * (spec.ambient + spec.diffuse * ndl)
    mat = model.material[:, None]
    up = np.clip(n[:, 2:3], 0.0, None)
    sky = np.asarray(spec.sky)
    out = np.where(mat == PAINT, lit + 90.0 * spec_term, lit)
    out = np.where(mat == GLASS, base * (0.7 + 0.3 * ndl) + sky * (0.12 + 0.3 * up) + 120.0 * spec_term, out)
    out = np.where(mat == LAMP, base * (0.8 + 0.3 * ndl), out)
    out = np.where(mat == MATTE, lit, out)
    return out * gain


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian-like blur with repeated 3-tap [w, 1-2w, w] passes (edges clamped).

    One pass has variance 2w; passes add variances. Much cheaper than PIL's blur at
    these sizes, which matters at hundreds of images per second.
    """
    var = sigma * sigma
    passes = max(1, math.ceil(var / 0.6))
    w = var / (2 * passes)
    out = img.astype(np.float32)
    for _ in range(passes):
        for axis in (0, 1):
            src = out if axis == 0 else out.swapaxes(0, 1)
            res = (1 - 2 * w) * src
            res[1:] += w * src[:-1]
            res[:-1] += w * src[1:]
            res[0] += w * src[0]
            res[-1] += w * src[-1]
            out = res if axis == 0 else res.swapaxes(0, 1)
    return out


def _paint_order(model: VehicleModel, eye: np.ndarray, screen: np.ndarray) -> list[int]:
    """Back-to-front order of the model's parts as seen from ``eye``.

    Each pair of parts has a separating plane: the part on the camera's side is in
    front. Only pairs whose screen boxes overlap constrain the order (the others
    cannot hide each other, and keeping them could make the relation cyclic); a
    topological sort with lowest-index tie-break then gives the order. Should a
    cycle remain, the part with the fewest unmet constraints goes next.
    """
    n = len(model.parts)
    rows = model.part_rows
    lo_xy = np.minimum.reduceat(screen, rows[:, 0], axis=0)
    hi_xy = np.maximum.reduceat(screen, rows[:, 0], axis=0)
    overlap = ((lo_xy[:, None, :] < hi_xy[None, :, :]) & (lo_xy[None, :, :] < hi_xy[:, None, :])).all(2)
    hi_side = model.pair_normal @ eye > model.pair_offset       # camera on the hi side: lo first
    before = np.zeros((n, n), dtype=bool)                        # before[a, b]: a drawn before b
    before[model.pair_lo[hi_side], model.pair_hi[hi_side]] = True
    before[model.pair_hi[~hi_side], model.pair_lo[~hi_side]] = True
    before &= overlap
    waiting = before.sum(0)
    done = np.zeros(n, dtype=bool)
    order = []
    for _ in range(n):
        pending = np.where(done, n + 1, waiting)
        p = int(np.argmin(pending))                              # 0 unmet if acyclic
        order.append(p)
        done[p] = True
        waiting = waiting - before[p]
    return order


# --------------------------------------------------------------------------- render

def frame(model: VehicleModel, view: View, size: int):
    """Camera and crop of one image.

    Returns (eye (3,), camera, scale (2,), offset (2,), screen (V, 2)): a point with
    camera coordinates (x, y, z) lands at pixel ``(x, y) / z * scale + offset``
    (PIL convention: integer coordinates are pixel centres); ``screen`` holds the
    pixel positions of all the model's vertices.
    """
    L, _, H = model.size
    target = np.array([0.0, 0.0, 0.45 * H])
    # Long vehicles are seen from further away (else a bus 9 m from the camera shows
    # extreme perspective): distance grows with length above 6 m.
    eye = target + view.distance * max(1.0, L / 6.0) * _sph(view.azimuth, view.elevation)
    cam = _Camera(eye, target)
    # Crop: fit the projected vehicle into the square like a detection box.
    pc = cam.to_cam(model.verts)
    proj = pc[:, :2] / pc[:, 2:3]
    lo, hi = proj.min(0), proj.max(0)
    extent = np.maximum(hi - lo, 1e-6)
    avail = size * (1.0 - view.margin)
    iso = min(avail / extent[0], avail / extent[1])
    scale = np.minimum(avail / extent, iso * _ASPECT_MAX)
    offset = size / 2 + np.asarray(view.shift) * size - (lo + hi) / 2 * scale
    return eye, cam, scale, offset, proj * scale + offset


def render(model: VehicleModel, spec: CameraSpec, view: View, size: int,
           fields: tuple[np.ndarray, np.ndarray], marks: bool = False):
    """Render one image: returns (RGB PIL image, 'L' PIL label image), both size x size.

    With ``marks``, also the mark map: (size, size) uint8, per pixel the 1-based index
    into ``model.marks`` of the mark seen there, 0 for none.
    """
    L, W, H = model.size
    eye, cam, scale, offset, screen = frame(model, view, size)
    light = _sph(view.azimuth + spec.light_az, spec.light_el)
    gain = np.asarray(spec.cast) * view.exposure

    # Background: far fill, verge, road, lane lines, shadows (ground plane z = 0),
    # as (Q, 4) ground quads projected in one go; only polygons crossing the near
    # plane (rare: the huge verge and road quads) are clipped one by one.
    ground_l = spec.ambient + spec.diffuse * max(0.0, light[2])
    tones = np.array([spec.verge, spec.road, spec.line, spec.road, spec.road, spec.far])
    tones *= np.array([ground_l] * 3 + [0.6 * ground_l, 0.35 * ground_l, 1.0])[:, None] * gain
    verge, road, line, shadow, contact, far = map(tuple, np.clip(np.rint(tones), 0, 255).astype(int).tolist())
    rgb = Image.new("RGB", (size, size), far)
    draw = ImageDraw.Draw(rgb)
    R = 80.0
    y_right = -(view.lane_index + 0.5) * _LANE + view.lane_offset
    y_left = y_right + spec.lanes * _LANE
    rects = [(-R, R, -R, R), (-R, R, y_right - 0.3, y_left + 0.3),
             (-R, R, y_right - 0.08, y_right + 0.08), (-R, R, y_left - 0.08, y_left + 0.08)]
    fills = [verge, road, line, line]
    for k in range(1, spec.lanes):
        y = y_right + k * _LANE
        for x in np.arange(-36.0, 36.0, 9.0) + view.dash_phase:
            rects.append((x, x + 3.0, y - 0.07, y + 0.07))
            fills.append(line)
    rects.append((-L / 2, L / 2, -W / 2, W / 2))        # contact shadow (drawn last)
    r = np.asarray(rects)
    quads = np.zeros((len(r), 4, 3))
    quads[:, :, 0] = r[:, [0, 1, 1, 0]]
    quads[:, :, 1] = r[:, [2, 2, 3, 3]]
    cq = cam.to_cam(quads.reshape(-1, 3)).reshape(-1, 4, 3)
    # Soft shadow cast away from the light, drawn just before the contact patch.
    hl = 0.5 * H / max(light[2], 0.25)
    foot = np.array([(-L / 2 - 0.1, -W / 2 - 0.1), (L / 2 + 0.1, -W / 2 - 0.1),
                     (L / 2 + 0.1, W / 2 + 0.1), (-L / 2 - 0.1, W / 2 + 0.1)])
    cast = _convex_hull(np.concatenate([foot, foot - hl * light[:2]]))
    cast_c = cam.to_cam(np.column_stack([cast, np.zeros(len(cast))]))
    polys = list(cq[:-1]) + [cast_c, cq[-1]]
    fills = fills + [shadow, contact]
    for c, colour in zip(polys, fills):
        if (c[:, 2] < _NEAR).any():
            c = _clip_near(c)
            if len(c) < 3:
                continue
        s = c[:, :2] / c[:, 2:3] * scale + offset
        draw.polygon(list(map(tuple, s.tolist())), fill=colour)

    tex, noise = fields
    ty, tx = view.tex_offset
    bg = np.asarray(rgb, dtype=np.int16) + tex[ty:ty + size, tx:tx + size, None]
    rgb = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(rgb)
    labels = Image.new("L", (size, size), 0)
    ldraw = ImageDraw.Draw(labels)

    # Vehicle: back-face culling per surface, painter's order between parts.
    visible = np.einsum("ij,ij->i", model.normal, eye - model.point) > 1e-9
    colours = shade(model, eye, light, spec, gain)
    colours = np.clip(np.rint(colours), 0, 255).astype(np.int64).tolist()
    order = _paint_order(model, eye, screen)
    spans = (model.spans * 2).tolist()       # PIL takes flat [x0, y0, x1, y1, ...] lists
    flat = screen.ravel().tolist()
    labs = (model.label + 8 * model.mark).tolist()    # label in bits 0-2, mark index above
    visible = visible.tolist()
    for p in order:
        for sid, decals in model.parts[p]:
            if not visible[sid]:
                continue
            a, b = spans[sid]
            pts = flat[a:b]
            draw.polygon(pts, fill=tuple(colours[sid]))
            ldraw.polygon(pts, fill=labs[sid])
            for did in decals:
                a, b = spans[did]
                draw.polygon(flat[a:b], fill=tuple(colours[did]))
                if labs[did] != labs[sid]:               # a mark decal (or a plain one on a mark face)
                    ldraw.polygon(flat[a:b], fill=labs[did])
    both = np.asarray(labels)
    mark_map = both >> 3
    if model.mark.any():
        labels = Image.fromarray(both & 7)

    # Camera: optical blur, then sensor noise.
    sigma = spec.blur * size / 128.0
    img = np.asarray(rgb)
    if sigma > 0.3:   # below this a blur would barely change a pixel
        img = _blur(img, sigma)
    ny, nx = view.noise_offset
    img = img + noise[ny:ny + size, nx:nx + size]
    rgb = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    if marks:
        return rgb, labels, mark_map
    return rgb, labels
