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

Determinism: every random choice comes from a numpy generator seeded by
``(seed, tag, vid[, camera[, index]])``, so the bytes do not depend on the number of
worker processes or on the order in which workers finish.
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

from .scene import camera_fields, camera_spec, image_view, render
from .vehicles import build_vehicle

if TYPE_CHECKING:  # workers need not import the config module (PyYAML) at start-up
    from pipeline.config import SynthConfig

TRAIN, TEST, QUERY = "image_train", "image_test", "image_query"


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


def plan(cfg: SynthConfig, seed: int) -> list[list[_Task]]:
    """Every image to render, grouped per identity (a worker job), in id order.

    Identities 1..train_ids are training ids, the next test_ids are test ids. Each
    identity passes ``cameras_per_id`` distinct cameras with ``images_per_camera``
    frames each; for a test identity one frame per camera is the query.
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


def _render_group(job: tuple) -> list[tuple[str, str, int, int, float, float]]:
    """Worker: render one identity's images into ``root``; returns its views.csv rows."""
    root, seed, size, quality, tasks = job
    root = Path(root)
    model = build_vehicle(np.random.default_rng([seed, 0x40DE1, tasks[0].vid]))
    rows = []
    for task in tasks:
        spec = camera_spec(seed, task.camera)
        view = image_view(seed, task.vid, task.camera, task.index, spec, size)
        rgb, labels = render(model, spec, view, size, camera_fields(seed, task.camera, size))
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
    return rows


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


def render_dataset(cfg: SynthConfig, out_dir: Path, seed: int, show_progress: bool = False) -> dict:
    """Render the dataset described by ``cfg`` into ``out_dir`` (replaced atomically).

    Uses ``cfg.workers`` processes (spawn context: safe whatever the parent has
    imported). The output is byte-identical for any number of workers. Rendering
    goes to a sibling temp folder that replaces ``out_dir`` only when complete, so an
    interrupted run never leaves a partial dataset at ``out_dir``.

    Returns a JSON-able summary: per split (train/query/test) the numbers of images,
    identities, cameras and label PNGs; images rendered (a query is rendered once and
    written twice), files written, seconds and rendered images per second.
    ``show_progress`` reports the images rendered so far (:mod:`pipeline.progress`).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"synth.out_dir: {out_dir} exists and is not a folder; expected a "
                         f"folder (or nothing) to write the dataset into")
    groups = plan(cfg, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    _remove_stale(out_dir)
    try:
        for folder in (TRAIN, TEST, QUERY):
            (tmp / folder).mkdir(parents=True)
        jobs = [(str(tmp), seed, cfg.image_size, cfg.jpeg_quality, tasks) for tasks in groups]
        rows: list[tuple] = []
        bar = progress(desc="synth", unit="img", total=sum(len(tasks) for tasks in groups), enabled=show_progress)
        if cfg.workers == 1:
            for job in jobs:
                rows.extend(_render_group(job))
                bar.update(len(job[-1]))
        else:
            # spawn: safe whatever the parent imported (torch threads, open files);
            # ProcessPoolExecutor fails fast if a worker dies, where Pool would hang.
            try:
                with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
                    for job, part in zip(jobs, pool.map(_render_group, jobs)):
                        rows.extend(part)
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
        splits[split] = dict(images=len(tasks), identities=len({t.vid for t in tasks}),
                             cameras=len({t.camera for t in tasks}), labels=sum(t.label for t in tasks))
    return dict(out_dir=str(out_dir), seed=seed, image_size=cfg.image_size, workers=cfg.workers,
                splits=splits, images_rendered=rendered,
                # JPEGs + label PNGs + name_*.txt, gt/jk_index.txt, views.csv
                files_written=len(rows) + sum(s["labels"] for s in splits.values()) + 6,
                seconds=round(seconds, 3), images_per_s=round(rendered / max(seconds, 1e-9), 1))


def render_example(seed: int, vid: int, camera: int, azimuth_deg: float | None = None,
                   elevation_deg: float | None = None, size: int = 128,
                   body: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render identity ``vid`` under ``camera`` of dataset ``seed`` -> (RGB HxWx3, labels HxW) uint8.

    ``azimuth_deg`` (0 = front view, 90 = left side, 180 = back) and ``elevation_deg``
    override the camera's viewpoint; ``body`` forces a body type. The same model,
    lighting and camera look as in :func:`render_dataset` (frame index 0).
    """
    rng = np.random.default_rng([seed, 0x40DE1, vid])
    model = build_vehicle(rng, body)
    spec = camera_spec(seed, camera)
    view = image_view(seed, vid, camera, 0, spec, size)
    changes = {}
    if azimuth_deg is not None:
        changes["azimuth"] = float(azimuth_deg)
    if elevation_deg is not None:
        changes["elevation"] = float(elevation_deg)
    if changes:
        view = replace(view, **changes)
    rgb, labels = render(model, spec, view, size, camera_fields(seed, camera, size))
    return np.asarray(rgb), np.asarray(labels)
