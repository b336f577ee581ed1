"""Tiny dataset trees in the exact official layouts (docs/datasets.md), for tests.

Each builder writes real (small) JPEGs, optional parsing-label PNGs and the list
files of one dataset release under ``root``, and returns a :class:`WrittenTree`
holding the records a correct reader must produce (in list-file order). Builders
are plain, deterministic functions so any test can call them with ``tmp_path``.

Label PNGs: every ``label_every``-th image written (counting from the first) gets a
``<stem>.png`` next to it with values 0..4 (0 = none, 1 = every image).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.records import Record

VERIWILD_HEADER = "id/image;Camera ID;Time;Model;Type;Color"
VERIWILD_QUERIES = {"small": 3000, "medium": 5000, "large": 10000}


@dataclass
class WrittenTree:
    """What a builder wrote.

    root:     the dataset root
    records:  split -> expected records in list-file order (synthetic: with meta)
    files:    every file written (images, labels, lists), in write order
    gt_index, jk_index: VeRi-776 only: per query, 0-based positions in name_test.txt of
              the true matches (same id, other camera) / junk (same id, same camera)
    """
    root: Path
    records: dict[str, list[Record]]
    files: list[Path] = field(default_factory=list)
    gt_index: list[list[int]] | None = None
    jk_index: list[list[int]] | None = None


class _Writer:
    """Writes images and labels, numbering them so label placement is deterministic."""

    def __init__(self, size: tuple[int, int], label_every: int, files: list[Path]) -> None:
        self.size, self.label_every, self.files, self.count = size, label_every, files, 0

    def image(self, path: Path, vid: int) -> Path | None:
        """Write a JPEG (colour from vid and count) and maybe its label; return the label path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        width, height = self.size
        rng = np.random.default_rng(self.count)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        pixels[..., 0] = (vid * 37) % 256  # red channel encodes the id: images differ per vehicle
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        self.files.append(path)
        label = None
        if self.label_every and self.count % self.label_every == 0:
            label = path.with_suffix(".png")
            values = (np.arange(width * height, dtype=np.uint8) % 5).reshape(height, width)
            Image.fromarray(values).save(label, format="PNG")
            self.files.append(label)
        self.count += 1
        return label


def _write_text(path: Path, lines: list[str], files: list[Path], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    files.append(path)


def _subset_ids(ids: tuple[int, ...], subsets: tuple[str, ...], subset: str) -> tuple[int, ...]:
    """Nested test lists: the j-th subset holds the first (j+1)/len(subsets) of the ids."""
    j = subsets.index(subset)
    return ids[:max(1, len(ids) * (j + 1) // len(subsets))]


# --------------------------------------------------------------------------- VeRi-776

def make_veri776(root: str | Path, *, train_ids: tuple[int, ...] = (1, 2, 3),
                 test_ids: tuple[int, ...] = (4, 5, 6), cameras: tuple[int, ...] = (1, 2, 3),
                 per_camera: int = 2, image_size: tuple[int, int] = (16, 12),
                 label_every: int = 2, with_index: bool = True, views: bool = False,
                 newline: str = "\n") -> WrittenTree:
    """Write a VeRi-776 tree (``views=True``: plus the synthetic set's ``views.csv``).

    Names ``<vid:04>_c<cam:03>_<frame:08>_<k>.jpg``. Every train and test id is seen by
    every camera, except the last test id, seen by ``cameras[0]`` only (so its query
    has an empty gt_index line). Queries are the first image of each (test id,
    camera) and, as in the release, also appear in ``image_test``.
    """
    root = Path(root)
    files: list[Path] = []
    writer = _Writer(image_size, label_every, files)
    views_rows: list[str] = []

    def names_for(vid: int, cams: tuple[int, ...]) -> list[tuple[str, int]]:
        return [(f"{vid:04d}_c{cam:03d}_{(vid * 100 + cam) * 100 + k:08d}_{k % 2}.jpg", cam)
                for cam in cams for k in range(per_camera)]

    def write_split(split: str, folder: str, entries: list[tuple[str, int, int]]) -> list[Record]:
        records = []
        for name, vid, cam in entries:
            image = root / folder / name
            label = writer.image(image, vid)
            meta = {}
            if views:
                index = len(views_rows)
                meta = {"azimuth_deg": float((index * 37) % 360), "elevation_deg": 5.0 + index % 20}
                views_rows.append(f"{folder},{name},{vid},{cam},{meta['azimuth_deg']},"
                                  f"{meta['elevation_deg']}")
            records.append(Record(key=Path(name).stem, image=image, vid=vid, camera=cam,
                                  split=split, label=label, meta=meta))
        return records

    train = [(n, vid, cam) for vid in train_ids for n, cam in names_for(vid, cameras)]
    gallery, query = [], []
    for vid in test_ids:
        cams = cameras[:1] if vid == test_ids[-1] else cameras
        names = names_for(vid, cams)
        gallery += [(n, vid, cam) for n, cam in names]
        query += [(n, vid, cam) for n, cam in names[::per_camera]]

    records = {"train": write_split("train", "image_train", train),
               "query": write_split("query", "image_query", query),
               "gallery": write_split("gallery", "image_test", gallery)}
    for split, list_name in (("train", "name_train.txt"), ("query", "name_query.txt"),
                             ("gallery", "name_test.txt")):
        _write_text(root / list_name, [r.image.name for r in records[split]], files, newline)

    tree = WrittenTree(root=root, records=records, files=files)
    if with_index:
        tree.gt_index, tree.jk_index = [], []
        for _, vid, cam in query:
            tree.gt_index.append([i for i, (_, v, c) in enumerate(gallery) if v == vid and c != cam])
            tree.jk_index.append([i for i, (_, v, c) in enumerate(gallery) if v == vid and c == cam])
        for name, rows in (("gt_index.txt", tree.gt_index), ("jk_index.txt", tree.jk_index)):
            _write_text(root / name, [" ".join(str(i + 1) for i in row) for row in rows],
                        files, newline)
    if views:
        _write_text(root / "views.csv",
                    ["folder,name,vid,camera,azimuth_deg,elevation_deg"] + views_rows, files)
    return tree


# --------------------------------------------------------------------------- VehicleID

def make_vehicleid(root: str | Path, *, train_ids: tuple[int, ...] = (1, 2, 3),
                   test_ids: tuple[int, ...] = (4, 5, 6, 7), per_id: int = 3,
                   subsets: tuple[str, ...] = ("800", "1600"),
                   image_size: tuple[int, int] = (16, 12), label_every: int = 2,
                   newline: str = "\n") -> WrittenTree:
    """Write a VehicleID tree: ``image/<7 digits>.jpg``, ``train_test_split/*.txt``,
    ``attribute/img2vid.txt``. Test lists are nested: ``test_list_<subsets[j]>.txt``
    holds the first (j+1)/len(subsets) of ``test_ids``; ``records["test"]`` is the
    largest (last) subset's list, ``records["test_<subset>"]`` each one.
    """
    root = Path(root)
    files: list[Path] = []
    writer = _Writer(image_size, label_every, files)
    number = 1
    by_id: dict[int, list[tuple[str, Path, Path | None]]] = {}
    for vid in train_ids + test_ids:
        for _ in range(per_id):
            name = f"{number * 7:07d}"  # not consecutive, like the release's numbering
            image = root / "image" / f"{name}.jpg"
            by_id.setdefault(vid, []).append((name, image, writer.image(image, vid)))
            number += 1

    def listed(split: str, ids: tuple[int, ...]) -> list[Record]:
        return [Record(key=name, image=image, vid=vid, camera=-1, split=split, label=label)
                for vid in ids for name, image, label in by_id[vid]]

    split_dir = root / "train_test_split"
    records = {"train": listed("train", train_ids)}
    _write_text(split_dir / "train_list.txt", [f"{r.key} {r.vid}" for r in records["train"]],
                files, newline)
    for subset in subsets:
        recs = listed("test", _subset_ids(test_ids, subsets, subset))
        records[f"test_{subset}"] = recs
        _write_text(split_dir / f"test_list_{subset}.txt", [f"{r.key} {r.vid}" for r in recs],
                    files, newline)
    records["test"] = records[f"test_{subsets[-1]}"]
    _write_text(root / "attribute" / "img2vid.txt",
                [f"{name} {vid}" for vid, rows in by_id.items() for name, _, _ in rows], files)
    return WrittenTree(root=root, records=records, files=files)


# --------------------------------------------------------------------------- VERI-Wild

def make_veriwild(root: str | Path, *, train_ids: tuple[int, ...] = (1, 2, 3),
                  test_ids: tuple[int, ...] = (4, 5, 6, 7), per_id: int = 3,
                  cameras: tuple[int, ...] = (3, 17, 42), subsets: tuple[str, ...] = ("small",),
                  image_size: tuple[int, int] = (16, 12), label_every: int = 2,
                  unlisted_rows: int = 2) -> WrittenTree:
    """Write a VERI-Wild tree: ``images/<vid:05>/<imgid:06>.jpg``, the train/test lists
    and ``vehicle_info.txt`` (plus ``unlisted_rows`` rows for images in no list, as the
    real file covers more than one subset). Image ids are global; cameras cycle
    through ``cameras``. Per test subset: the first image of each id is the query,
    the rest the gallery; ``records["query"]``/``["gallery"]`` are for ``subsets[-1]``,
    ``records["query_<subset>"]``/``["gallery_<subset>"]`` for each.
    """
    root = Path(root)
    files: list[Path] = []
    writer = _Writer(image_size, label_every, files)
    info = [VERIWILD_HEADER]
    by_id: dict[int, list[tuple[str, Path, int, Path | None]]] = {}
    imgid = 1
    for vid in train_ids + test_ids:
        for k in range(per_id):
            camera = cameras[(vid + k) % len(cameras)]
            entry = f"{vid:05d}/{imgid:06d}"
            image = root / "images" / f"{vid:05d}" / f"{imgid:06d}.jpg"
            by_id.setdefault(vid, []).append((entry, image, camera, writer.image(image, vid)))
            info.append(f"{entry};{camera};2018-03-{1 + imgid % 28:02d} 12:00:00;Audi;SUV;white")
            imgid += 1
    for extra in range(unlisted_rows):
        info.append(f"99999/{900000 + extra:06d};1;2018-03-01 00:00:00;BMW;sedan;black")

    def record(row: tuple[str, Path, int, Path | None], vid: int, split: str) -> Record:
        entry, image, camera, label = row
        return Record(key=entry.replace("/", "_"), image=image, vid=vid, camera=camera,
                      split=split, label=label)

    split_dir = root / "train_test_split"
    records = {"train": [record(row, vid, "train") for vid in train_ids for row in by_id[vid]]}
    for subset in subsets:
        ids = _subset_ids(test_ids, subsets, subset)
        n = VERIWILD_QUERIES[subset]
        records[f"query_{subset}"] = [record(by_id[vid][0], vid, "query") for vid in ids]
        records[f"gallery_{subset}"] = [record(row, vid, "gallery") for vid in ids
                                        for row in by_id[vid][1:]]
        for name, split in ((f"test_{n}_query.txt", "query"), (f"test_{n}.txt", "gallery")):
            _write_text(split_dir / name, [r.key.replace("_", "/") for r in
                                           records[f"{split}_{subset}"]], files)
    records["query"] = records[f"query_{subsets[-1]}"]
    records["gallery"] = records[f"gallery_{subsets[-1]}"]
    _write_text(split_dir / "train_list.txt", [r.key.replace("_", "/") for r in records["train"]],
                files)
    _write_text(split_dir / "vehicle_info.txt", info, files)
    return WrittenTree(root=root, records=records, files=files)


# --------------------------------------------------------------------------- faults

def edit_lines(path: str | Path, edit) -> None:
    """Rewrite a text file through ``edit(lines) -> lines`` (written back with ``\\n``)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def insert_line(path: str | Path, number: int, text: str) -> None:
    """Insert ``text`` so that it becomes 1-based line ``number`` of the file."""
    edit_lines(path, lambda lines: lines[:number - 1] + [text] + lines[number - 1:])


def drop_rows(path: str | Path, prefix: str) -> int:
    """Remove every line starting with ``prefix``; return how many were removed."""
    path = Path(path)
    before = len(path.read_text().splitlines())
    edit_lines(path, lambda lines: [line for line in lines if not line.startswith(prefix)])
    return before - len(path.read_text().splitlines())


def empty_file(path: str | Path) -> None:
    """Truncate a file to 0 bytes (a download that stopped before any data arrived)."""
    Path(path).write_bytes(b"")
