"""The synthetic renderer: determinism, the VeRi-776 layout, exact labels, families, marks, helpers."""
from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, SynthConfig, load_params
from pipeline.data.synthetic import (
    BODY_TYPES,
    LABEL_COLOURS,
    build_identity,
    build_vehicle,
    identities,
    mark_min_pixels,
    overlay_labels,
    plan,
    render_dataset,
    render_example,
    write_contact_sheet,
)
from pipeline.data.synthetic.families import MAX_FAMILY_SIZE, family_sizes
from pipeline.data.synthetic.marks import _MARK_COLOURS, MARK_FACE, MARKS_BY_TYPE, _contrast, _luma, mark_sets
from pipeline.data.synthetic.scene import camera_fields, camera_spec, frame, image_view, render
from pipeline.data.synthetic.vehicles import PAINTS

TINY = SynthConfig(train_ids=4, test_ids=3, cameras=4, cameras_per_id=(2, 3),
                   images_per_camera=(1, 2), image_size=64, label_fraction=0.5, workers=1)
NAME = re.compile(r"^(\d{4})_c(\d{3})_(\d{8})_0\.jpg$")
FOLDERS = ("image_train", "image_query", "image_test")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _names(root: Path, split: str) -> list[str]:
    return (root / f"name_{split}.txt").read_text().splitlines()


def _parse(name: str) -> tuple[int, int]:
    m = re.match(r"(\d+)_c(\d\d\d)", name)
    assert m, name
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = render_dataset(TINY, root, seed=7)
    return root, summary


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_for_one_or_two_workers(dataset, tmp_path):
    root, _ = dataset
    two = render_dataset(dataclasses.replace(TINY, workers=2), tmp_path / "two", seed=7)
    assert two["workers"] == 2
    assert _files(root) == _files(tmp_path / "two")


def test_different_seed_gives_different_data(dataset, tmp_path):
    root, _ = dataset
    render_dataset(TINY, tmp_path / "other", seed=8)
    a, b = _files(root), _files(tmp_path / "other")
    jpg_a = {v for k, v in a.items() if k.endswith(".jpg")}
    jpg_b = {v for k, v in b.items() if k.endswith(".jpg")}
    assert not jpg_a & jpg_b


# --------------------------------------------------------------------------- layout

def test_veri776_layout(dataset):
    root, summary = dataset
    lists = {split: _names(root, split) for split in ("train", "query", "test")}
    for split, folder in (("train", "image_train"), ("query", "image_query"), ("test", "image_test")):
        names = lists[split]
        assert names == sorted(names) and len(set(names)) == len(names)
        on_disk = {p.name for p in (root / folder).glob("*.jpg")}
        assert on_disk == set(names)
        for name in names:
            m = NAME.match(name)
            assert m, name
            assert int(m.group(2)) >= 1
        assert summary["splits"][split]["images"] == len(names)
    train_ids = {_parse(n)[0] for n in lists["train"]}
    test_ids = {_parse(n)[0] for n in lists["test"]}
    assert train_ids == set(range(1, TINY.train_ids + 1))
    assert test_ids == set(range(TINY.train_ids + 1, TINY.train_ids + TINY.test_ids + 1))
    # queries: also in the gallery, byte for byte, one per (test id, camera)
    assert set(lists["query"]) <= set(lists["test"])
    for name in lists["query"]:
        assert (root / "image_query" / name).read_bytes() == (root / "image_test" / name).read_bytes()
    pairs = [_parse(n) for n in lists["query"]]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {_parse(n) for n in lists["test"]}
    # every identity passes >= 2 cameras, so every query has a true match
    for vid in test_ids:
        assert len({c for v, c in map(_parse, lists["test"]) if v == vid}) >= 2


def test_gt_and_junk_index_match_names(dataset):
    root, _ = dataset
    query, test = _names(root, "query"), _names(root, "test")
    gt = (root / "gt_index.txt").read_text().splitlines()
    jk = (root / "jk_index.txt").read_text().splitlines()
    assert len(gt) == len(jk) == len(query)
    for q, g, j in zip(query, gt, jk):
        vid, cam = _parse(q)
        want_g = [i + 1 for i, n in enumerate(test) if _parse(n)[0] == vid and _parse(n)[1] != cam]
        want_j = [i + 1 for i, n in enumerate(test) if _parse(n) == (vid, cam)]
        assert [int(x) for x in g.split()] == want_g and want_g
        assert [int(x) for x in j.split()] == want_j
        assert test.index(q) + 1 in want_j      # the query itself is junk, as in VeRi


def test_views_csv_has_one_row_per_written_image(dataset):
    root, _ = dataset
    with (root / "views.csv").open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["folder", "name", "vid", "camera", "azimuth_deg", "elevation_deg"]
        rows = list(reader)
    written = {(f, p.name) for f in FOLDERS for p in (root / f).glob("*.jpg")}
    assert {(r[0], r[1]) for r in rows} == written and len(rows) == len(written)
    for _folder, name, vid, cam, az, el in rows:
        assert (int(vid), int(cam)) == _parse(name)
        assert -180.0 <= float(az) <= 180.0 and 0.0 < float(el) < 90.0


def test_rerender_replaces_the_folder_and_leaves_no_temp(tmp_path):
    import subprocess
    import sys

    small = dataclasses.replace(TINY, train_ids=2, test_ids=2)
    out = tmp_path / "data"
    out.mkdir()
    (out / "stale.txt").write_text("from an older dataset")
    # the temp folder of a killed run (its process is gone) is cleaned up
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".data.tmp-{dead}" / "image_train").mkdir(parents=True)
    render_dataset(small, out, seed=1)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_config_is_rejected_with_the_key(tmp_path):
    bad = dataclasses.replace(TINY, cameras_per_id=(2, 9))
    with pytest.raises(ValueError, match="cameras_per_id"):
        render_dataset(bad, tmp_path / "x", seed=0)
    for sizes in ((5, 4), (0, 3), (2, MAX_FAMILY_SIZE + 1)):
        with pytest.raises(ValueError, match="family_size"):
            render_dataset(dataclasses.replace(TINY, family_size=sizes), tmp_path / "x", seed=0)
    assert not (tmp_path / "x").exists()
    root = Path(__file__).resolve().parents[1]
    assert load_params(root / "params.yaml").synth.family_size == (4, 6)
    with pytest.raises(ConfigError, match=r"synth\.family_size"):
        load_params(root / "params.yaml", ["synth.family_size=[0, 3]"])


# --------------------------------------------------------------------------- labels

def _enclosed_background(labels: np.ndarray) -> int:
    """Background pixels not connected (4-neighbour) to the border through background."""
    free = labels == 0
    reach = np.zeros_like(free)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= free
        if (grown == reach).all():
            return int((free & ~reach).sum())
        reach = grown


def test_label_maps_are_exact_and_complete(dataset):
    root, summary = dataset
    seen = set()
    n_train_labels = 0
    for folder in FOLDERS:
        for image_path in sorted((root / folder).glob("*.jpg")):
            label_path = image_path.with_suffix(".png")
            if folder == "image_train":
                if not label_path.exists():
                    continue
                n_train_labels += 1
            assert label_path.exists(), f"{label_path} missing (every test/query image has one)"
            label_img = Image.open(label_path)
            assert label_img.mode == "L"
            assert label_img.size == Image.open(image_path).size == (TINY.image_size,) * 2
            labels = np.asarray(label_img)
            assert labels.max() <= 4
            border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
            assert (border == 0).all(), f"{label_path}: vehicle touches the border"
            assert (labels > 0).mean() > 0.2, f"{label_path}: vehicle too small"
            assert _enclosed_background(labels) == 0, f"{label_path}: holes in the vehicle"
            seen |= set(np.unique(labels).tolist())
    n_train = len(_names(root, "train"))
    assert n_train_labels == round(TINY.label_fraction * n_train) == summary["splits"]["train"]["labels"]
    assert seen == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("body", ["sedan", "suv", "bus"])
def test_view_decides_which_parts_are_visible(body):
    def counts(az, el):
        _, labels = render_example(3, 5, 2, azimuth_deg=az, elevation_deg=el, size=64, body=body)
        return np.bincount(labels.ravel(), minlength=5)

    front = counts(5, 15)
    assert front[1] > 0 and front[2] == 0
    back = counts(178, 15)
    assert back[2] > 0 and back[1] == 0
    side = counts(90, 10)
    assert side[3] > side[1] + side[2] and side[3] > side[4]
    top = counts(40, 55)
    assert top[4] > 0 and top[1] > 0 and top[3] > 0


def _raycast(model, view, size: int) -> np.ndarray:
    """Reference labels: per pixel, the first convex part face hit by the ray (no painter's order)."""
    eye, cam, scale, offset, _ = frame(model, view, size)
    rows, cols = np.mgrid[0:size, 0:size]
    pix = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float)   # PIL: (x, y) = centre
    d = np.column_stack([(pix - offset) / scale, np.ones(len(pix))]) @ cam.rot   # world directions
    best = np.full(len(pix), np.inf)
    out = np.zeros(len(pix), dtype=np.uint8)
    for p, faces in enumerate(model.parts):
        sids = [sid for sid, _ in faces]
        normals, points = model.normal[sids], model.point[sids]
        a, b = model.part_rows[p]
        if len(sids) == 1:                          # a flat disc: plane hit inside the polygon
            n = normals[0]
            t = ((points[0] - eye) @ n) / (d @ n)
            hit = eye + t[:, None] * d
            s0, s1 = model.spans[sids[0]]
            poly = model.verts[s0:s1]
            centre = poly.mean(0)
            inside = t > 0
            for v, w in zip(poly, np.roll(poly, -1, axis=0)):
                inward = np.cross(n, w - v)
                inward *= np.sign(inward @ (centre - v))
                inside &= (hit - v) @ inward >= 0
            t_hit, lab = np.where(inside, t, np.inf), np.full(len(pix), model.label[sids[0]])
        else:                                       # convex solid: faces plus its flat bottom
            zmin = model.verts[a:b, 2].min()
            normals = np.vstack([normals, [0, 0, -1.0]])
            h = np.append(np.einsum("ij,ij->i", normals[:-1], points), -zmin)
            nd, ne = d @ normals.T, normals @ eye                   # (N, F), (F,)
            t = (h - ne) / np.where(nd == 0, 1e-12, nd)
            t_in = np.where(nd < 0, t, -np.inf)
            t_out = np.where(nd > 0, t, np.inf)
            near, far = t_in.max(1), t_out.min(1)
            ok = (near <= far) & (near > 0) & ~((nd == 0) & (ne > h)).any(1)
            face = t_in.argmax(1)
            labels = np.append(model.label[sids], 0)
            t_hit, lab = np.where(ok, near, np.inf), labels[face]
        closer = t_hit < best
        best[closer], out[closer] = t_hit[closer], lab[closer]
    return out.reshape(size, size)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a differently labelled 8-neighbour."""
    pad = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    out = np.zeros(labels.shape, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= pad[dy:dy + h, dx:dx + w] != labels
    return out


@pytest.mark.parametrize("body", BODY_TYPES)
def test_painter_order_matches_a_ray_cast(body):
    """The rendered label map agrees with a per-pixel ray cast of the same 3D parts.

    Only pixels next to a boundary may differ (PIL fills pixels whose centre lies on
    a polygon's edge), so a wrong occlusion order, a missing face or a wrong label
    shows as disagreement away from the boundaries.
    """
    from pipeline.data.synthetic.scene import camera_fields, render

    size, seed = 96, 11
    for k, (az, el) in enumerate([(0, 20), (35, 12), (90, 30), (140, 8), (180, 25), (-60, 45)]):
        model = build_vehicle(np.random.default_rng([seed, k, BODY_TYPES.index(body)]), body)
        spec = camera_spec(seed, 1)
        view = image_view(seed, 1, 1, k, spec, size)
        view = dataclasses.replace(view, azimuth=float(az), elevation=float(el))
        _, labels = render(model, spec, view, size, camera_fields(seed, 1, size))
        labels = np.asarray(labels)
        ref = _raycast(model, view, size)
        vehicle = (labels > 0) | (ref > 0)
        wrong = (labels != ref) & vehicle & ~_edges(ref)
        assert wrong.sum() <= 0.01 * vehicle.sum(), (body, az, el, wrong.sum(), vehicle.sum())


# --------------------------------------------------------------------------- helpers

def test_overlay_labels_blends_only_vehicle_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    labels = np.zeros((8, 10), dtype=np.uint8)
    labels[2:5, 3:7] = np.arange(1, 5)
    full = overlay_labels(rgb, labels, alpha=1.0)
    assert (full[labels == 0] == rgb[labels == 0]).all()
    assert (full[labels > 0] == LABEL_COLOURS[labels[labels > 0]]).all()
    half = overlay_labels(rgb, labels, alpha=0.5)
    expect = np.rint((rgb[3, 4].astype(float) + LABEL_COLOURS[labels[3, 4]]) / 2)
    assert np.abs(half[3, 4].astype(float) - expect).max() <= 1
    assert (overlay_labels(rgb, labels, alpha=0.0) == rgb).all()
    assert LABEL_COLOURS.shape == (5, 3) and LABEL_COLOURS.dtype == np.uint8
    assert len({tuple(c) for c in LABEL_COLOURS.tolist()}) == 5
    with pytest.raises(ValueError, match="labels shape"):
        overlay_labels(rgb, labels[:4])
    with pytest.raises(ValueError, match="label values"):
        overlay_labels(rgb, labels + 5)


def test_contact_sheet_is_a_png_with_overlays(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "sheet" / "contact.png"
    write_contact_sheet(root, out, n_ids=3, n_cams=2)
    with Image.open(out) as img:
        img.verify()
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[0] >= 3 * TINY.image_size and sheet.shape[1] >= 2 * 2 * TINY.image_size
    # the legend swatches are drawn in the exact label colours
    for colour in LABEL_COLOURS[1:]:
        assert (sheet == colour).all(axis=2).any()
    # A title band heads the sheet (text above the first image) and the legend at the bottom
    # names each colour (text beside the swatches, below the last image).
    ink = sheet.astype(int).sum(axis=2) < 200
    image_rows = np.nonzero((sheet.astype(int).std(axis=2) > 12).sum(axis=1) > TINY.image_size)[0]
    top, bottom = image_rows.min() - 16, image_rows.max() + 1  # 16: the first row's captions
    assert top >= 30 and sheet.shape[0] - bottom >= 18
    title, legend = sheet[:top], sheet[bottom:]
    assert ink[:top].sum() > 300 and title.std() > 20
    assert ink[bottom:].sum() > 150 and legend.std() > 30
    for colour in LABEL_COLOURS[1:]:
        assert (legend == colour).all(axis=2).sum() > 50, colour
    assert not list(out.parent.glob(".*tmp*"))
    with pytest.raises(FileNotFoundError, match="name_test.txt"):
        write_contact_sheet(tmp_path / "missing", out)


# --------------------------------------------------------------------------- families

FAMILIES = SynthConfig(train_ids=23, test_ids=13, family_size=(4, 6))


def _surfaces(model) -> tuple[dict[bytes, tuple], set[bytes]]:
    """The model's surfaces keyed by their vertices: (non-mark ones -> their look, mark ones)."""
    plain, marked = {}, set()
    for sid, (a, b) in enumerate(model.spans.tolist()):
        key = np.round(model.verts[a:b], 9).tobytes()
        if model.mark[sid]:
            marked.add(key)
        else:
            plain[key] = (tuple(model.colour[sid]), int(model.material[sid]), int(model.label[sid]))
    return plain, marked


def test_family_members_share_the_look_and_differ_only_in_marks():
    people = identities(FAMILIES, seed=5)
    families: dict[int, list] = {}
    for person in people:
        families.setdefault(person.family, []).append(person)
    assert len(families) >= 6
    for members in families.values():
        models = [build_identity(5, p) for p in members]
        assert len({m.body for m in models}) == len({m.paint for m in models}) == 1
        assert len({m.size for m in models}) == 1                        # the same size jitter, no per-member one
        assert len({p.marks for p in members}) == len(members)           # no two identical identities
        assert [m.marks for m in models] == [p.marks for p in members]
        first, first_marked = _surfaces(models[0])
        for model in models[1:]:
            plain, marked = _surfaces(model)
            # Same geometry, colours and materials everywhere but on marks: a surface may only be
            # missing where the other member turned it into a mark (a repainted roof).
            assert set(first) - set(plain) <= marked and set(plain) - set(first) <= first_marked
            for key in set(first) & set(plain):
                assert first[key] == plain[key]
    # ... while different families do differ in their look (not all the same vehicle)
    looks = {(m.body, m.paint, m.size) for m in (build_identity(5, ms[0]) for ms in families.values())}
    assert len(looks) == len(families)


@pytest.mark.parametrize("train_ids,test_ids,sizes", [(23, 13, (4, 6)), (150, 30, (4, 6)), (6, 4, (4, 6)),
                                                      (4, 3, (4, 6)), (7, 2, (4, 6)), (12, 12, (5, 5)),
                                                      (9, 5, (1, 1))])
def test_families_never_straddle_train_and_test_and_counts_stay_exact(train_ids, test_ids, sizes):
    cfg = SynthConfig(train_ids=train_ids, test_ids=test_ids, family_size=sizes)
    people = identities(cfg, seed=2)
    assert [p.vid for p in people] == list(range(1, train_ids + test_ids + 1))
    assert [p.split for p in people] == ["train"] * train_ids + ["test"] * test_ids
    families: dict[int, list] = {}
    for person in people:
        families.setdefault(person.family, []).append(person)
    lo, hi = sizes
    for number, members in families.items():
        assert len({p.split for p in members}) == 1, f"family {number} straddles train and test"
        assert [p.member for p in members] == list(range(len(members))) == list(range(members[0].size))
        assert [p.vid for p in members] == list(range(members[0].first_vid, members[0].first_vid + len(members)))
        assert len({p.body for p in members}) == 1
        assert len(members) <= hi
    for split, count in (("train", train_ids), ("test", test_ids)):
        got = [len(ms) for ms in families.values() if ms[0].split == split]
        assert sum(got) == count
        if any(k * lo <= count <= k * hi for k in range(1, count + 1)):   # reachable: every size in range
            assert all(lo <= n <= hi for n in got), (split, got)
    # the train families do not depend on the test split's size
    other = identities(dataclasses.replace(cfg, test_ids=test_ids + 7), seed=2)
    assert other[:train_ids] == people[:train_ids]


def test_family_sizes_rule():
    rng = np.random.default_rng(0)
    assert family_sizes(0, 4, 6, rng) == []
    assert family_sizes(3, 4, 6, rng) == [3]             # fewer ids than min: one smaller family
    assert family_sizes(7, 4, 6, rng) == [4, 3]          # no sum of 4..6 makes 7: ceil(7 / 6) near-equal families
    assert family_sizes(12, 5, 5, rng) == [4, 4, 4]
    seen = set()
    for k in range(40):
        sizes = family_sizes(30, 4, 6, np.random.default_rng(k))
        assert sum(sizes) == 30 and all(4 <= n <= 6 for n in sizes)
        seen.add(tuple(sizes))
    assert len(seen) > 5                                 # sizes are drawn, not a fixed pattern


# --------------------------------------------------------------------------- marks

def _faces(marks: tuple[str, ...]) -> list[str]:
    return [MARK_FACE[m] for m in marks]


def test_every_identity_has_2_or_3_marks_on_different_faces():
    for body in BODY_TYPES:
        sets = mark_sets(body)
        assert len(sets) >= MAX_FAMILY_SIZE and len(set(sets)) == len(sets)
        for marks in sets:
            faces = _faces(marks)
            assert 2 <= len(marks) <= 3 and len(set(faces)) == len(faces), (body, marks)
            assert {"front", "back"} & set(faces) and {"side", "top"} & set(faces), (body, marks)
            assert set(marks) <= set(MARKS_BY_TYPE[body])
    people = identities(SynthConfig(train_ids=150, test_ids=60), seed=0)
    assert {len(p.marks) for p in people} == {2, 3}
    assert {p.body for p in people} == set(BODY_TYPES)
    for person in people:
        faces = _faces(person.marks)
        assert 2 <= len(person.marks) <= 3 and len(set(faces)) == len(faces)
        assert {"front", "back"} & set(faces) and {"side", "top"} & set(faces)
    # every mark of a built model really adds surfaces, tagged with its index
    for person in people[::9]:
        model = build_identity(0, person)
        assert set(np.unique(model.mark).tolist()) == set(range(len(person.marks) + 1))
    with pytest.raises(ValueError, match="mark_sets"):
        build_vehicle(np.random.default_rng(0), "sedan", marks=("side_logo", "door_panel"))


def _view(seed: int, az: float, el: float, size: int):
    spec = camera_spec(seed, 1)
    view = dataclasses.replace(image_view(seed, 1, 1, 0, spec, size), azimuth=float(az), elevation=float(el))
    return spec, view


def _mark_pixels(model, az: float, el: float, size: int = 128, seed: int = 4) -> np.ndarray:
    """Visible pixels of each mark (index 0: no mark) seen from (az, el)."""
    spec, view = _view(seed, az, el, size)
    _, labels, marks = render(model, spec, view, size, camera_fields(seed, 1, size), marks=True)
    assert marks.shape == np.asarray(labels).shape and marks.dtype == np.uint8
    return np.bincount(marks.ravel(), minlength=len(model.marks) + 1)


def _two_mark_set(body: str, mark: str) -> tuple[str, ...]:
    return next(s for s in mark_sets(body) if mark in s and len(s) == 2)


def test_side_marks_show_from_the_left_and_from_the_right():
    need = mark_min_pixels(128)
    for body in BODY_TYPES:
        for mark in (m for m in MARKS_BY_TYPE[body] if MARK_FACE[m] == "side"):
            marks = _two_mark_set(body, mark)
            model = build_vehicle(np.random.default_rng([3, BODY_TYPES.index(body)]), body, marks)
            k = marks.index(mark) + 1
            left, right = _mark_pixels(model, 90, 12), _mark_pixels(model, -90, 12)
            assert left[k] >= 4 * need and right[k] >= 4 * need, (body, mark, left[k], right[k])


# The view that faces each mark's face squarely (azimuth, elevation).
_FACING = {"front": (0, 12), "back": (180, 12), "side": (90, 12), "top": (30, 50)}


def test_every_mark_is_large_enough_to_see_at_128_px():
    """From a view facing its face, every mark covers at least ~10 x 10 px at 128 px (no specks)."""
    for body in BODY_TYPES:
        for mark in MARKS_BY_TYPE[body]:
            marks = _two_mark_set(body, mark)
            model = build_vehicle(np.random.default_rng([8, BODY_TYPES.index(body)]), body, marks)
            counts = _mark_pixels(model, *_FACING[MARK_FACE[mark]])
            assert counts[marks.index(mark) + 1] >= 100, (body, mark, counts)
    assert mark_min_pixels(128) == 12 and mark_min_pixels(64) == 3 and mark_min_pixels(256) == 48


def test_mark_decals_span_a_quarter_of_their_face():
    """Each mark's decals on a face reach >= 1/4 of the face's extent along both face axes.

    The hood patch is the exception by construction: it covers most of the hood, which is
    only the front 20-30 % of the deck face it is drawn on.
    """
    for body in BODY_TYPES:
        for mark in MARKS_BY_TYPE[body]:
            for seed in range(3):
                marks = _two_mark_set(body, mark)
                model = build_vehicle(np.random.default_rng([seed, 21]), body, marks)
                k = marks.index(mark) + 1
                found = 0
                for part in model.parts:
                    for sid, decals in part:
                        mine = [d for d in decals if model.mark[d] == k and model.mark[sid] != k]
                        if not mine:
                            continue
                        found += 1
                        face = model.verts[slice(*model.spans[sid])]
                        eu = face[1] - face[0]
                        eu /= np.linalg.norm(eu)
                        ev = face[3] - face[0] - (face[3] - face[0]) @ eu * eu
                        ev /= np.linalg.norm(ev)
                        pts = np.concatenate([model.verts[slice(*model.spans[d])] for d in mine])
                        share_u = np.ptp(pts @ eu) / np.ptp(face @ eu)
                        share_v = np.ptp(pts @ ev) / np.ptp(face @ ev)
                        least_u = 0.15 if mark == "hood_patch" else 0.25
                        assert share_u >= least_u and share_v >= 0.25, (body, mark, share_u, share_v)
                if MARK_FACE[mark] == "side":
                    assert found == 2, (body, mark, found)          # drawn on both sides


def test_mark_colours_contrast_with_every_paint():
    rng = np.random.default_rng(0)
    for name, paint in PAINTS.items():
        options = {_contrast(rng, paint) for _ in range(60)}
        assert len(options) >= 2, name
        for colour in options:
            assert np.linalg.norm(np.subtract(colour, paint)) > 120 and abs(_luma(colour) - _luma(paint)) > 70
    assert set().union(*({_contrast(rng, p) for _ in range(60)} for p in PAINTS.values())) <= set(_MARK_COLOURS)


def test_mark_map_matches_the_rgb_image():
    """Where the mark map says 'mark', the image shows the mark's colour, not the paint's."""
    model = build_vehicle(np.random.default_rng(12), "sedan", ("rear_decal", "door_panel"))
    spec, view = _view(4, 120, 15, 128)
    rgb, labels, marks = render(model, spec, view, 128, camera_fields(4, 1, 128), marks=True)
    rgb, labels = np.asarray(rgb).astype(float), np.asarray(labels)
    for k in (1, 2):
        inside = marks == k
        assert inside.sum() >= 50 and (labels[inside] > 0).all()       # marks lie on the vehicle
        same_face = (labels == np.bincount(labels[inside]).argmax()) & (marks == 0)
        gap = np.abs(rgb[inside].mean(0) - rgb[same_face].mean(0)).sum()
        assert gap > 60, (k, gap)
    # the label map does not change when marks are measured
    _, plain = render(model, spec, view, 128, camera_fields(4, 1, 128))
    assert (np.asarray(plain) == labels).all()


# --------------------------------------------------------------------------- mark visibility summary

def test_mark_visibility_summary_is_sane_and_matches_a_recount(dataset):
    root, summary = dataset
    marks = summary["marks"]
    assert marks["min_pixels"] == mark_min_pixels(TINY.image_size)
    for split in ("train", "query", "test"):
        entry = marks["splits"][split]
        assert entry["images"] == summary["splits"][split]["images"]
        for key in ("any", "front_back", "side_top"):
            assert 0.0 <= entry[key] <= 1.0
        assert max(entry["front_back"], entry["side_top"]) <= entry["any"] <= entry["front_back"] + entry["side_top"]
    assert marks["all"]["images"] == summary["images_rendered"]
    assert marks["all"]["any"] >= 0.8                                   # most images show a mark
    people = identities(TINY, 7)
    assert sum(e["identities"] for e in marks["by_mark"].values()) == sum(len(p.marks) for p in people)
    assert summary["splits"]["train"]["families"] + summary["splits"]["test"]["families"] == len(
        {p.family for p in people})
    # Recount the test split from the renderer itself.
    need, size, seed = mark_min_pixels(TINY.image_size), TINY.image_size, 7
    hits = {"any": 0, "front_back": 0, "side_top": 0}
    n = 0
    for person, tasks in zip(people, plan(TINY, seed)):
        model = build_identity(seed, person)
        for task in tasks:
            if "image_test" not in task.folders:
                continue
            spec = camera_spec(seed, task.camera)
            view = image_view(seed, task.vid, task.camera, task.index, spec, size)
            _, _, mark_map = render(model, spec, view, size, camera_fields(seed, task.camera, size), marks=True)
            counts = np.bincount(mark_map.ravel(), minlength=len(model.marks) + 1)[1:]
            faces = {MARK_FACE[m] for m, c in zip(model.marks, counts) if c >= need}
            n += 1
            hits["any"] += bool(faces)
            hits["front_back"] += bool(faces & {"front", "back"})
            hits["side_top"] += bool(faces & {"side", "top"})
    assert n == marks["splits"]["test"]["images"]
    for key, count in hits.items():
        assert marks["splits"]["test"][key] == round(count / n, 4), key


def test_contact_sheet_of_whole_families(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "families.png"
    people = identities(TINY, 7)
    test_family = [p for p in people if p.split == "test"]
    write_contact_sheet(root, out, n_ids=1, n_cams=2, identities=people)    # one row asked, a whole family shown
    plain = tmp_path / "plain.png"
    write_contact_sheet(root, plain, n_ids=1, n_cams=2)
    rows = len(test_family)
    with Image.open(out) as img, Image.open(plain) as one:
        assert img.height - one.height >= (rows - 1) * TINY.image_size
    with pytest.raises(ValueError, match="none of the given identities"):
        write_contact_sheet(root, out, identities=[p for p in people if p.split == "train"])
