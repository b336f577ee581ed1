"""Dataset readers: a dataset folder in its official release layout -> ``Record`` lists.

Every reader returns ``{split: [Record, ...]}`` with records in list-file order.
Nothing here opens or decodes an image (VERI-Wild has ~416k of them): images are
only checked for existence, by listing each image folder once with ``os.scandir``
(one directory read instead of one ``stat`` per image, which matters on network
storage). Corrupt images are found and reported by the shard stage, which decodes.

Layouts (see docs/datasets.md):

* ``veri776``  -- ``image_{train,query,test}/`` + ``name_{train,query,test}.txt``;
  vehicle id and camera from the file name (``0002_c002_00030600_0.jpg`` -> 2, 2);
  splits train / query / gallery (gallery = ``image_test``).
* ``vehicleid`` -- ``image/<name>.jpg``; ``train_test_split/train_list.txt`` and
  ``test_list_<subset>.txt`` with lines ``<name> <vehicle id>``; no cameras (-1);
  splits train / test (the evaluation protocol draws the gallery from ``test``).
* ``veriwild`` -- ``images/<vid>/<imgid>.jpg``; ``train_test_split/train_list.txt``,
  ``test_<N>_query.txt`` (query), ``test_<N>.txt`` (gallery), lines ``<vid>/<imgid>``;
  cameras from ``train_test_split/vehicle_info.txt``.
* ``synthetic`` -- the VeRi-776 layout plus ``views.csv`` (azimuth/elevation in
  degrees per image, carried in ``Record.meta``).

Parsing labels: for any dataset, a PNG next to an image with the same stem
(``image.with_suffix(".png")``) becomes ``Record.label``; otherwise ``label`` is None.

Every reading problem raises :class:`DatasetError` whose message names the file,
the 1-based line number where there is one, the offending text and what was expected.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.constants import VEHICLEID_SUBSETS, VERIWILD_SUBSETS
from pipeline.data.records import VIEWS_COLUMNS, Record

__all__ = [
    "DatasetError", "SOURCES",
    "read_dataset", "read_veri776", "read_synthetic", "read_vehicleid", "read_veriwild",
    "read_veri776_index",
]


class DatasetError(ValueError):
    """A dataset folder, list file or line does not match the dataset's official layout."""


SOURCES: tuple[str, ...] = ("synthetic", "veri776", "vehicleid", "veriwild")
VERIWILD_HEADER = "id/image;Camera ID;Time;Model;Type;Color"

# VeRi-776 split -> (image folder, list file)
VERI_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("image_train", "name_train.txt"),
    "query": ("image_query", "name_query.txt"),
    "gallery": ("image_test", "name_test.txt"),
}

_VERI_NAME = re.compile(r"^(\d+)_c(\d+)_")
# Images are JPEGs (the shard stage stores them as .jpg); a .png "image" would also be
# mistaken for its own parsing label.
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_VEHICLEID_NAME = re.compile(r"^[^\s./\\]+$")
_VERIWILD_LINE = re.compile(r"^(\d+)/(\d+)$")


# --------------------------------------------------------------------------- helpers

def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} not found (expected a directory)")
    return path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, stripped text)`` of every entry line of a list file.

    Trailing blank lines are tolerated (an editor's final newline(s)); a blank line
    followed by more entries is an error, since it means a list was damaged.
    Undecodable bytes become U+FFFD, so they fail the caller's line check with a
    line number instead of a bare UnicodeDecodeError.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: list file not found")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            raise DatasetError(f"{path}:{number}: blank line, expected an entry")
        yield number, line


def _folder_names(folder: Path) -> frozenset[str]:
    """Names in an image folder, read with one ``os.scandir`` (empty if it does not exist)."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name for entry in entries)
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()


def _make_record(names: frozenset[str], folder: Path, name: str, where: str, *, key: str,
                 vid: int, camera: int, split: str) -> Record:
    """Check ``folder/name`` exists (``names`` = the folder's listing), find its label PNG,
    build the Record. ``where`` is ``"<list file>:<line>"`` for error messages.

    String operations on ``name`` instead of pathlib calls: this runs ~400k times for
    VERI-Wild, where pathlib's parsing dominated the reading time.
    """
    if "." in key or "/" in key:  # checked before existence: the name itself is unusable
        raise DatasetError(f"{where}: key {key!r} (image {name!r}) must not contain '.' "
                           f"or '/', expected a name whose stem has no dots (WebDataset keys)")
    if name not in names:
        raise DatasetError(f"{where}: image {folder / name} does not exist")
    label_name = name.rpartition(".")[0] + ".png"  # == image.with_suffix(".png").name
    label = folder / label_name if label_name in names else None
    return Record(key=key, image=folder / name, vid=vid, camera=camera, split=split, label=label)


def _check_unique(seen: dict[str, int], key: str, path: Path, number: int, text: str) -> None:
    first = seen.setdefault(key, number)
    if first != number:
        raise DatasetError(f"{path}:{number}: duplicate key {key!r} (text {text!r}); "
                           f"already listed on line {first}, expected each image once per split")


# --------------------------------------------------------------------------- VeRi-776

def _read_veri_split(root: Path, split: str) -> list[Record]:
    folder_name, list_name = VERI_SPLITS[split]
    folder = _require_dir(root / folder_name, f"VeRi-776 {split} image folder")
    names = _folder_names(folder)
    list_path = root / list_name
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, name in _lines(list_path):
        match = _VERI_NAME.match(name)
        if (match is None or any(c in name for c in "/\\ \t")
                or not name.lower().endswith(_JPEG_SUFFIXES)):
            raise DatasetError(f"{list_path}:{number}: got {name!r}, expected a JPEG file name "
                               f"like '0002_c002_00030600_0.jpg' (pattern {_VERI_NAME.pattern})")
        key = name.rpartition(".")[0] or name  # the file stem
        _check_unique(seen, key, list_path, number, name)
        records.append(_make_record(
            names, folder, name, f"{list_path}:{number}", key=key,
            vid=int(match.group(1)), camera=int(match.group(2)), split=split))
    return records


def read_veri776(root: str | Path) -> dict[str, list[Record]]:
    """Read VeRi-776: ``{"train", "query", "gallery"} -> records``; vid/camera from names."""
    root = _require_dir(Path(root), "VeRi-776 root")
    return {split: _read_veri_split(root, split) for split in VERI_SPLITS}


def _read_index_file(path: Path, n_rows: int, n_gallery: int) -> list[list[int]]:
    """One row per query of space-separated 1-based gallery indices -> 0-based lists.

    An empty line means no entries; missing rows at the end of the file also mean
    no entries (the last row may be empty and the file may or may not end in a newline).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: index file not found")
    rows = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    result: list[list[int]] = []
    for number, raw in enumerate(rows, start=1):
        if number > n_rows:
            if raw.strip():
                raise DatasetError(f"{path}:{number}: got {raw.strip()!r}, expected at most "
                                   f"{n_rows} lines (one per line of name_query.txt)")
            continue
        indices = []
        for token in raw.split():
            if not token.isdigit() or not 1 <= int(token) <= n_gallery:
                raise DatasetError(f"{path}:{number}: got {token!r}, expected a 1-based index "
                                   f"into name_test.txt (1..{n_gallery})")
            indices.append(int(token) - 1)
        result.append(indices)
    result.extend([] for _ in range(n_rows - len(result)))
    return result


def read_veri776_index(root: str | Path) -> tuple[list[list[int]], list[list[int]]]:
    """Read VeRi-776's ``gt_index.txt`` and ``jk_index.txt``.

    Returns ``(gt, jk)``: for each line of ``name_query.txt``, the 0-based positions
    in ``name_test.txt`` of its true matches / junk images (same id, same camera).
    Raises DatasetError if either file is missing or an index is out of range.
    """
    root = _require_dir(Path(root), "VeRi-776 root")
    n_query = sum(1 for _ in _lines(root / "name_query.txt"))
    n_gallery = sum(1 for _ in _lines(root / "name_test.txt"))
    return (_read_index_file(root / "gt_index.txt", n_query, n_gallery),
            _read_index_file(root / "jk_index.txt", n_query, n_gallery))


# --------------------------------------------------------------------------- synthetic

def _read_views(path: Path) -> dict[tuple[str, str], tuple[int, int, float, float, int]]:
    """``views.csv`` -> {(folder, name): (vid, camera, azimuth_deg, elevation_deg, line)}."""
    if not path.is_file():
        raise DatasetError(f"{path}: views file not found")
    views: dict[tuple[str, str], tuple[int, int, float, float, int]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != VIEWS_COLUMNS:
            raise DatasetError(f"{path}:1: got header {header!r}, expected {','.join(VIEWS_COLUMNS)}")
        for row in reader:
            number = reader.line_num
            if not row:
                continue
            if len(row) != len(VIEWS_COLUMNS):
                raise DatasetError(f"{path}:{number}: got {row!r}, expected {len(VIEWS_COLUMNS)} "
                                   f"fields ({','.join(VIEWS_COLUMNS)})")
            folder, name = row[0].strip(), row[1].strip()
            try:
                vid, camera = int(row[2]), int(row[3])
                azimuth, elevation = float(row[4]), float(row[5])
            except ValueError:
                raise DatasetError(f"{path}:{number}: got {row!r}, expected integer vid/camera "
                                   f"and numeric azimuth_deg/elevation_deg") from None
            if not (math.isfinite(azimuth) and math.isfinite(elevation)):
                raise DatasetError(f"{path}:{number}: got {row!r}, expected finite angles")
            if (folder, name) in views:
                raise DatasetError(f"{path}:{number}: duplicate row for {folder}/{name}, first on "
                                   f"line {views[(folder, name)][4]}; expected one row per image")
            views[(folder, name)] = (vid, camera, azimuth, elevation, number)
    return views


def read_synthetic(root: str | Path) -> dict[str, list[Record]]:
    """Read the synthetic set: the VeRi-776 reader plus per-image view angles.

    Each record's ``meta`` is ``{"azimuth_deg": float, "elevation_deg": float}`` from
    ``views.csv``; a listed image without a row, or whose row disagrees with the
    vid/camera in its file name, is a DatasetError.
    """
    splits = read_veri776(root)
    views_path = Path(root) / "views.csv"
    views = _read_views(views_path)
    for split, records in splits.items():
        folder = VERI_SPLITS[split][0]
        for record in records:
            entry = views.get((folder, record.image.name))
            if entry is None:
                raise DatasetError(f"{views_path}: no row for folder {folder!r}, name "
                                   f"{record.image.name!r}; expected one row per listed image")
            vid, camera, azimuth, elevation, number = entry
            if (vid, camera) != (record.vid, record.camera):
                raise DatasetError(f"{views_path}:{number}: vid/camera {vid}/{camera} for "
                                   f"{record.image.name!r}, expected {record.vid}/{record.camera} "
                                   f"(from the file name)")
            # meta is excluded from Record equality/hash, so filling it in keeps records valid
            record.meta.update(azimuth_deg=azimuth, elevation_deg=elevation)
    return splits


# --------------------------------------------------------------------------- VehicleID

def _subset(source: str, test_subset: object, allowed: tuple[str, ...]) -> str:
    value = None if test_subset is None else str(test_subset).strip()
    if value not in allowed:
        raise DatasetError(f"{source}: test_subset got {test_subset!r}, expected one of "
                           f"{', '.join(allowed)}")
    return value


def _read_vehicleid_list(path: Path, images: Path, names: frozenset[str],
                         split: str) -> list[Record]:
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, line in _lines(path):
        fields = line.split()
        if (len(fields) != 2 or _VEHICLEID_NAME.match(fields[0]) is None
                or not fields[1].isdigit()):
            raise DatasetError(f"{path}:{number}: got {line!r}, expected '<image name> <vehicle id>' "
                               f"(e.g. '0001430 13': name without extension, integer id)")
        name, vid = fields[0], int(fields[1])
        _check_unique(seen, name, path, number, line)
        records.append(_make_record(names, images, f"{name}.jpg", f"{path}:{number}", key=name,
                                    vid=vid, camera=-1, split=split))
    return records


def read_vehicleid(root: str | Path, test_subset: str | int | None) -> dict[str, list[Record]]:
    """Read VehicleID: ``{"train", "test"} -> records`` (camera -1, key = image name).

    ``test_subset`` (800/1600/2400/3200/6000/13164) picks ``test_list_<subset>.txt``.
    """
    subset = _subset("vehicleid", test_subset, VEHICLEID_SUBSETS)
    root = _require_dir(Path(root), "VehicleID root")
    images = _require_dir(root / "image", "VehicleID image folder")
    lists = root / "train_test_split"
    names = _folder_names(images)
    return {
        "train": _read_vehicleid_list(lists / "train_list.txt", images, names, "train"),
        "test": _read_vehicleid_list(lists / f"test_list_{subset}.txt", images, names, "test"),
    }


# --------------------------------------------------------------------------- VERI-Wild

def _read_veriwild_list(path: Path) -> list[tuple[int, str, int, str]]:
    """``<vid>/<imgid>`` lines -> [(line number, entry text, vid, imgid)], duplicates rejected."""
    entries = []
    seen: dict[str, int] = {}
    for number, line in _lines(path):
        match = _VERIWILD_LINE.match(line)
        if match is None:
            raise DatasetError(f"{path}:{number}: got {line!r}, expected '<vid>/<imgid>' "
                               f"(digits, e.g. '00001/000001')")
        _check_unique(seen, line, path, number, line)
        entries.append((number, line, int(match.group(1)), match.group(2)))
    return entries


def _read_vehicle_info(path: Path, wanted: set[str]) -> dict[str, int]:
    """One streaming pass over ``vehicle_info.txt`` -> {"<vid>/<imgid>": camera} for ``wanted``.

    Only the first two ';'-separated fields are parsed, and only for wanted rows:
    the file has ~416k lines and the other columns (time, model, ...) are unused.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: VERI-Wild vehicle_info file not found")
    cameras: dict[str, int] = {}
    first_line: dict[str, int] = {}
    # errors="replace": model names may not be UTF-8; the two fields we use are ASCII.
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline().rstrip("\r\n")
        if header != VERIWILD_HEADER:
            raise DatasetError(f"{path}:1: got header {header!r}, expected {VERIWILD_HEADER!r}")
        for number, line in enumerate(handle, start=2):
            fields = line.split(";", 2)
            key = fields[0].strip()
            if key not in wanted:
                continue
            try:
                camera = int(fields[1])
            except (IndexError, ValueError):
                raise DatasetError(f"{path}:{number}: got {line.rstrip()!r}, expected "
                                   f"'<vid>/<imgid>;<integer camera id>;...'") from None
            if key in cameras and cameras[key] != camera:
                raise DatasetError(f"{path}:{number}: camera {camera} for {key!r} disagrees with "
                                   f"camera {cameras[key]} on line {first_line[key]}")
            cameras[key] = camera
            first_line.setdefault(key, number)
    return cameras


def read_veriwild(root: str | Path, test_subset: str | None) -> dict[str, list[Record]]:
    """Read VERI-Wild: ``{"train", "query", "gallery"} -> records``; key ``<vid>_<imgid>``.

    ``test_subset`` small/medium/large picks ``test_{3000,5000,10000}[_query].txt``.
    Cameras come from ``train_test_split/vehicle_info.txt`` (read once, streaming).
    """
    subset = _subset("veriwild", test_subset, tuple(VERIWILD_SUBSETS))
    n = VERIWILD_SUBSETS[subset][0]  # the lists are named by their query (= identity) count
    root = _require_dir(Path(root), "VERI-Wild root")
    images = _require_dir(root / "images", "VERI-Wild image folder")
    lists = root / "train_test_split"
    list_paths = {"train": lists / "train_list.txt",
                  "query": lists / f"test_{n}_query.txt",
                  "gallery": lists / f"test_{n}.txt"}
    entries = {split: _read_veriwild_list(path) for split, path in list_paths.items()}
    info_path = lists / "vehicle_info.txt"
    wanted = {text for rows in entries.values() for _, text, _, _ in rows}
    cameras = _read_vehicle_info(info_path, wanted)

    folders: dict[str, tuple[Path, frozenset[str]]] = {}  # vid folder -> (path, listing)
    result: dict[str, list[Record]] = {}
    for split, rows in entries.items():
        path = list_paths[split]
        records = []
        for number, text, vid, imgid in rows:
            camera = cameras.get(text)
            if camera is None:
                raise DatasetError(f"{path}:{number}: image {text!r} has no row in {info_path}; "
                                   f"expected a camera entry for every listed image")
            vid_folder = text.partition("/")[0]  # keep the release's zero padding
            if vid_folder not in folders:
                folder = images / vid_folder
                folders[vid_folder] = (folder, _folder_names(folder))
            folder, names = folders[vid_folder]
            records.append(_make_record(
                names, folder, f"{imgid}.jpg", f"{path}:{number}", key=f"{vid_folder}_{imgid}",
                vid=vid, camera=camera, split=split))
        result[split] = records
    return result


# --------------------------------------------------------------------------- dispatch

def read_dataset(source: str, root: str | Path,
                 test_subset: str | int | None = None) -> dict[str, list[Record]]:
    """Read ``root`` in the layout of ``source`` -> ``{split: records}`` (list-file order).

    ``test_subset`` is required for vehicleid (800/1600/2400/3200/6000/13164) and
    veriwild (small/medium/large) and ignored by veri776 and synthetic.
    """
    readers: dict[str, Callable[[Path], dict[str, list[Record]]]] = {
        "synthetic": read_synthetic,
        "veri776": read_veri776,
        "vehicleid": lambda r: read_vehicleid(r, test_subset),
        "veriwild": lambda r: read_veriwild(r, test_subset),
    }
    if source not in readers:
        raise DatasetError(f"unknown dataset {source!r}, expected one of {', '.join(SOURCES)}")
    return readers[source](Path(root))

