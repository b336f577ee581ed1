"""Render a whole synthetic dataset in the VeRi-776 layout, in parallel, atomically.

Layout written under ``out_dir`` (see docs on datasets: VeRi-776):

- ``image_train/``, ``image_test/`` (the gallery), ``image_query/`` (each query is
  also in ``image_test/``, byte-identical), file names ``VVVV_cCCC_FFFFFFFF_0.jpg``;
- ``name_train.txt``, ``name_test.txt``, ``name_query.txt`` (sorted names);
- ``gt_index.txt`` / ``jk_index.txt``: per query (``name_query.txt`` order), the
  1-based positions in ``name_test.txt`` of same-id other-camera images / same-id
  same-camera images (the query itself included, as VeRi does);
- a label PNG (mode 'L', 0 background, 1 front, 2 back, 3 side, 4 top) beside the
  image with the same stem, for every test/query image and an exact
  ``label_fraction`` share of training images;
- ``views.csv``: ``folder,name,vid,camera,azimuth_deg,elevation_deg`` per written image.

Identities come in look-alike families that differ only in their marks
(:mod:`.families`); a family is wholly in train or wholly in test. While rendering,
each image's mark map (:func:`.scene.render`) tells which marks it shows: a mark
shows when at least :func:`mark_min_pixels` of its pixels are visible (12 at 128 px).
The summary :func:`render_dataset` returns reports, per split, the share of images
showing any mark, a front/back mark and a side/top mark, and per mark type how often
it shows; nothing of this is written into the dataset folder.

Determinism: every random choice comes from a numpy generator seeded by
``(seed, tag, vid[, camera[, index]])`` (families: by split or by the family's first
vid), so the bytes do not depend on the number of worker processes or on the order
in which workers finish.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import atomic
from pipeline.data.records import VIEWS_COLUMNS
from pipeline.progress import progress

from .families import MAX_FAMILY_SIZE, Identity, build_identity, identities
from .marks import MARK_FACE
from .scene import camera_fields, camera_spec, image_view, render

if TYPE_CHECKING:  # workers need not import the config module (PyYAML) at start-up
    from pipeline.config import SynthConfig

TRAIN, TEST, QUERY = "image_train", "image_test", "image_query"
MARK_MIN_PIXELS = 12   # visible pixels for a mark to count as shown, at 128 px (scaled by area)


def mark_min_pixels(size: int) -> int:
    """Visible pixels a mark needs to count as shown in a ``size`` px image.

    12 at 128 px (about a 3 x 4 px patch: enough to see a colour blob, still well under
    one 16 x 16 px cell of the 8 x 8 feature map), scaled with the image area and at
    least 1.
    """
    return max(1, round(MARK_MIN_PIXELS * (size / 128) ** 2))


@dataclass(frozen=True)
class _Task:
    """One rendered image and where its bytes go (a query goes to test and query)."""
    vid: int
    camera: int
    index: int
    name: str
    folders: tuple[str, ...]
    label: bool


def image_name(vid: int, camera: int, frame: int) -> str:
    """VeRi-776 file name: 4-digit id, 'c' + 3-digit camera, 8-digit frame, '_0.jpg'."""
    return f"{vid:04d}_c{camera:03d}_{frame:08d}_0.jpg"


def _check(cfg: SynthConfig) -> None:
    """The cross-field rules load_params enforces, again for configs built in code."""
    for name in ("cameras_per_id", "images_per_camera"):
        lo, hi = getattr(cfg, name)
        if lo > hi:
            raise ValueError(f"synth.{name}: got [{lo}, {hi}], expected [min, max] with min <= max")
    if cfg.cameras_per_id[0] < 2 or cfg.cameras_per_id[1] > cfg.cameras:
        raise ValueError(f"synth.cameras_per_id: got {list(cfg.cameras_per_id)}, expected 2 <= min "
                         f"and max <= synth.cameras={cfg.cameras} (every query needs a match "
                         f"from another camera)")
    if cfg.images_per_camera[0] < 1:
        raise ValueError(f"synth.images_per_camera: got {list(cfg.images_per_camera)}, expected min >= 1")
    if cfg.train_ids < 1 or cfg.test_ids < 1 or cfg.train_ids + cfg.test_ids > 9999:
        raise ValueError(f"synth.train_ids/test_ids: got {cfg.train_ids}/{cfg.test_ids}, expected "
                         f">= 1 each and at most 9999 in total (4-digit vehicle ids)")
    if cfg.cameras > 999:
        raise ValueError(f"synth.cameras: got {cfg.cameras}, expected at most 999 (3-digit camera ids)")
    if not 0.0 <= cfg.label_fraction <= 1.0:
        raise ValueError(f"synth.label_fraction: got {cfg.label_fraction}, expected 0..1")
    if cfg.workers < 1:
        raise ValueError(f"synth.workers: got {cfg.workers}, expected >= 1")
    lo, hi = cfg.family_size
    if not 1 <= lo <= hi <= MAX_FAMILY_SIZE:
        raise ValueError(f"synth.family_size: got [{lo}, {hi}], expected [min, max] with "
                         f"1 <= min <= max <= {MAX_FAMILY_SIZE} (members need different mark sets)")


def plan(cfg: SynthConfig, seed: int) -> list[list[_Task]]:
    """Every image to render, grouped per identity (a worker job), in id order.

    Identities 1..train_ids are training ids, the next test_ids are test ids (their
    families: :func:`.families.identities`). Each identity passes ``cameras_per_id``
    distinct cameras with ``images_per_camera`` frames each; for a test identity one
    frame per camera is the query.
    """
    _check(cfg)
    groups: list[list[_Task]] = []
    for vid in range(1, cfg.train_ids + cfg.test_ids + 1):
        rng = np.random.default_rng([seed, 0x91A7, vid])
        n_cams = int(rng.integers(cfg.cameras_per_id[0], cfg.cameras_per_id[1] + 1))
        cams = sorted(int(c) + 1 for c in rng.choice(cfg.cameras, n_cams, replace=False))
        test = vid > cfg.train_ids
        tasks = []
        for cam in cams:
            n_img = int(rng.integers(cfg.images_per_camera[0], cfg.images_per_camera[1] + 1))
            # increasing frame numbers of one pass; distinct names within (vid, camera)
            frames = int(rng.integers(0, 50_000_000)) + np.cumsum(rng.integers(3, 40, size=n_img))
            query = int(rng.integers(n_img))
            for i, frame in enumerate(frames):
                folders = ((TEST, QUERY) if i == query else (TEST,)) if test else (TRAIN,)
                tasks.append(_Task(vid, cam, i, image_name(vid, cam, int(frame)), folders, test))
        groups.append(tasks)
    # An exact label_fraction share of training images, drawn once for the whole split.
    train = [(g, t) for g, tasks in enumerate(groups) for t in range(len(tasks))
             if TRAIN in tasks[t].folders]
    n_label = int(round(cfg.label_fraction * len(train)))
    pick = np.random.default_rng([seed, 0x1ABE1]).permutation(len(train))[:n_label]
    for k in pick.tolist():
        g, t = train[k]
        task = groups[g][t]
        groups[g][t] = _Task(task.vid, task.camera, task.index, task.name, task.folders, True)
    return groups


def _render_group(job: tuple) -> tuple[list[tuple[str, str, int, int, float, float]], list[tuple[str, ...]]]:
    """Worker: render one identity's images into ``root``.

    Returns its views.csv rows and, per task, the names of the marks the image shows.
    """
    root, seed, size, quality, identity, tasks = job
    root = Path(root)
    model = build_identity(seed, identity)
    need = mark_min_pixels(size)
    rows, shown = [], []
    for task in tasks:
        spec = camera_spec(seed, task.camera)
        view = image_view(seed, task.vid, task.camera, task.index, spec, size)
        rgb, labels, marks = render(model, spec, view, size, camera_fields(seed, task.camera, size), marks=True)
        counts = np.bincount(marks.ravel(), minlength=len(model.marks) + 1)[1:]
        shown.append(tuple(name for name, n in zip(model.marks, counts.tolist()) if n >= need))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=quality)
        jpg = buf.getvalue()
        png = None
        if task.label:
            buf = io.BytesIO()
            labels.save(buf, "PNG", compress_level=3)
            png = buf.getvalue()
        for folder in task.folders:
            path = root / folder / task.name
            path.write_bytes(jpg)
            if png is not None:
                path.with_suffix(".png").write_bytes(png)
            rows.append((folder, task.name, task.vid, task.camera, view.azimuth, view.elevation))
    return rows, shown


def _share(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 0.0


def _mark_summary(groups: list[list[_Task]], people: list[Identity], shown: list[list[tuple[str, ...]]],
                  size: int) -> dict:
    """Mark visibility of the rendered images (see the module docstring)."""
    def tally(pairs: list[tuple[_Task, tuple[str, ...]]]) -> dict:
        faces = [{MARK_FACE[name] for name in names} for _, names in pairs]
        return dict(images=len(pairs), any=_share(sum(bool(f) for f in faces), len(pairs)),
                    front_back=_share(sum(bool(f & {"front", "back"}) for f in faces), len(pairs)),
                    side_top=_share(sum(bool(f & {"side", "top"}) for f in faces), len(pairs)))

    pairs = [(task, names) for tasks, seen in zip(groups, shown) for task, names in zip(tasks, seen)]
    splits = {split: tally([(t, n) for t, n in pairs if folder in t.folders])
              for split, folder in (("train", TRAIN), ("query", QUERY), ("test", TEST))}
    by_mark: dict[str, dict] = {}
    for person, tasks, seen in zip(people, groups, shown):
        for name in person.marks:
            entry = by_mark.setdefault(name, dict(face=MARK_FACE[name], identities=0, images=0, shown=0))
            entry["identities"] += 1
            entry["images"] += len(tasks)
            entry["shown"] += sum(name in names for names in seen)
    for entry in by_mark.values():
        entry["shown"] = _share(entry.pop("shown"), entry["images"])
    return dict(min_pixels=mark_min_pixels(size), all=tally(pairs), splits=splits,
                by_mark=dict(sorted(by_mark.items())))


def _write_lists(root: Path, groups: list[list[_Task]]) -> dict[str, list[_Task]]:
    by_folder: dict[str, list[_Task]] = {TRAIN: [], TEST: [], QUERY: []}
    for tasks in groups:
        for task in tasks:
            for folder in task.folders:
                by_folder[folder].append(task)
    for folder in by_folder:
        by_folder[folder].sort(key=lambda t: t.name)
    for folder, list_name in ((TRAIN, "name_train.txt"), (TEST, "name_test.txt"), (QUERY, "name_query.txt")):
        (root / list_name).write_text("".join(t.name + "\n" for t in by_folder[folder]))
    # VeRi's evaluation index files: 1-based positions in name_test.txt.
    positions: dict[int, list[tuple[int, int]]] = {}
    for pos, task in enumerate(by_folder[TEST], start=1):
        positions.setdefault(task.vid, []).append((pos, task.camera))
    gt, jk = [], []
    for q in by_folder[QUERY]:
        same = positions[q.vid]
        gt.append(" ".join(str(p) for p, c in same if c != q.camera))
        jk.append(" ".join(str(p) for p, c in same if c == q.camera))
    (root / "gt_index.txt").write_text("".join(line + "\n" for line in gt))
    (root / "jk_index.txt").write_text("".join(line + "\n" for line in jk))
    return by_folder


def _remove_stale(out_dir: Path) -> None:
    """Delete temp siblings of ``out_dir`` left by runs that were killed (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)$")
    for entry in out_dir.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir():
            continue
        pid = int(m.group(2))
        alive = pid != os.getpid()
        if alive:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)


def render_dataset(cfg: SynthConfig, out_dir: Path, seed: int, show_progress: bool = False, val_ids: int = 0) -> dict:
    """Render the dataset described by ``cfg`` into ``out_dir`` (replaced atomically).

    Uses ``cfg.workers`` processes (spawn context: safe whatever the parent has
    imported). The output is byte-identical for any number of workers. Rendering
    goes to a sibling temp folder that replaces ``out_dir`` only when complete, so an
    interrupted run never leaves a partial dataset at ``out_dir``.

    Returns a JSON-able summary: per split (train/query/test) the numbers of images,
    identities, families, cameras and label PNGs; ``marks``: the mark visibility (share
    of images showing any / a front or back / a side or top mark, overall under
    ``all`` (train + test), per split, and per mark type under ``by_mark``); images
    rendered (a query is rendered once and written twice), files written, seconds and
    rendered images per second.
    ``show_progress`` reports the images rendered so far (:mod:`pipeline.progress`).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"synth.out_dir: {out_dir} exists and is not a folder; expected a "
                         f"folder (or nothing) to write the dataset into")
    groups = plan(cfg, seed)
    people = identities(cfg, seed, val_ids)   # val_ids: see identities (families of their own)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    _remove_stale(out_dir)
    try:
        for folder in (TRAIN, TEST, QUERY):
            (tmp / folder).mkdir(parents=True)
        jobs = [(str(tmp), seed, cfg.image_size, cfg.jpeg_quality, person, tasks)
                for person, tasks in zip(people, groups)]
        rows: list[tuple] = []
        shown: list[list[tuple[str, ...]]] = []
        bar = progress(desc="synth", unit="img", total=sum(len(tasks) for tasks in groups), enabled=show_progress)
        if cfg.workers == 1:
            for job in jobs:
                part, seen = _render_group(job)
                rows.extend(part)
                shown.append(seen)
                bar.update(len(job[-1]))
        else:
            # spawn: safe whatever the parent imported (torch threads, open files);
            # ProcessPoolExecutor fails fast if a worker dies, where Pool would hang.
            try:
                with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
                    for job, (part, seen) in zip(jobs, pool.map(_render_group, jobs)):
                        rows.extend(part)
                        shown.append(seen)
                        bar.update(len(job[-1]))
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    f"synthetic renderer: a worker process died ({exc}). Workers are started "
                    f"with 'spawn', which re-imports the main module: run from a file or "
                    f"module (not stdin) with an `if __name__ == '__main__':` guard, or set "
                    f"synth.workers=1") from exc
        bar.close()
        rows.sort(key=lambda r: (r[0], r[1]))
        atomic.write_csv(tmp / "views.csv", [dict(zip(VIEWS_COLUMNS, (*row[:4], f"{row[4]:.2f}", f"{row[5]:.2f}")))
                                             for row in rows], list(VIEWS_COLUMNS))
        by_folder = _write_lists(tmp, groups)
        atomic.swap_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    rendered = len(by_folder[TRAIN]) + len(by_folder[TEST])
    splits = {}
    for split, folder in (("train", TRAIN), ("query", QUERY), ("test", TEST)):
        tasks = by_folder[folder]
        vids = {t.vid for t in tasks}
        splits[split] = dict(images=len(tasks), identities=len(vids),
                             families=len({p.family for p in people if p.vid in vids}),
                             cameras=len({t.camera for t in tasks}), labels=sum(t.label for t in tasks))
    return dict(out_dir=str(out_dir), seed=seed, image_size=cfg.image_size, workers=cfg.workers,
                family_size=list(cfg.family_size), splits=splits,
                marks=_mark_summary(groups, people, shown, cfg.image_size), images_rendered=rendered,
                # JPEGs + label PNGs + name_*.txt, gt/jk_index.txt, views.csv
                files_written=len(rows) + sum(s["labels"] for s in splits.values()) + 6,
                seconds=round(seconds, 3), images_per_s=round(rendered / max(seconds, 1e-9), 1))


def render_example(seed: int, vid: int, camera: int, azimuth_deg: float | None = None,
                   elevation_deg: float | None = None, size: int = 128, body: str | None = None,
                   cfg: SynthConfig | None = None, marks: bool = False):
    """Render identity ``vid`` under ``camera`` of dataset ``seed`` -> (RGB HxWx3, labels HxW) uint8.

    ``azimuth_deg`` (0 = front view, 90 = left side, 180 = back) and ``elevation_deg``
    override the camera's viewpoint; ``body`` forces a body type. ``cfg`` is the
    dataset's config (its ids and family sizes decide the families; default: the
    defaults of :class:`~pipeline.config.SynthConfig`). The same model, lighting and
    camera look as in :func:`render_dataset` (frame index 0). With ``marks``, a third
    array: the mark map (per pixel, the 1-based index of the identity mark seen there).
    """
    if cfg is None:
        from pipeline.config import SynthConfig
        cfg = SynthConfig()
    people = identities(cfg, seed)
    if not 1 <= vid <= len(people):
        raise ValueError(f"render_example: vid {vid}, expected 1..{len(people)} (train_ids + test_ids)")
    model = build_identity(seed, people[vid - 1], body)
    spec = camera_spec(seed, camera)
    view = image_view(seed, vid, camera, 0, spec, size)
    changes = {}
    if azimuth_deg is not None:
        changes["azimuth"] = float(azimuth_deg)
    if elevation_deg is not None:
        changes["elevation"] = float(elevation_deg)
    if changes:
        view = replace(view, **changes)
    rgb, labels, mark_map = render(model, spec, view, size, camera_fields(seed, camera, size), marks=True)
    if marks:
        return np.asarray(rgb), np.asarray(labels), mark_map
    return np.asarray(rgb), np.asarray(labels)
