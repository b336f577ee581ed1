"""Dataset readers: a dataset folder in its official release layout -> ``Record`` lists.

Every reader returns ``{split: [Record, ...]}`` with records in list-file order.
Nothing here opens or decodes an image (VERI-Wild has ~416k of them): each image
folder is listed once with ``os.scandir`` (one directory read instead of a lookup
per name, which matters on network storage), and each listed image that is there
gets one ``os.stat`` for its size in bytes, so a 0-byte file is named as such (about
3 us per image on a local disk: ~1.3 s of a ~9 s read of 400k VERI-Wild images; the
shard stage later reads every byte of every image, which costs far more).
Corrupt (non-empty but undecodable) images are found by the shard stage.

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

Problems. A reader checks every entry and collects each problem as a :class:`Problem`
(kind, file, 1-based line, message with the offending text and what was expected);
the kinds are :data:`PROBLEM_KINDS`. Two sorts:

* structural (``missing_file``, ``bad_header``): the dataset cannot be read at all,
  so the reader raises :class:`DatasetError` at once, whatever ``on_error`` says.
  Missing required paths of one dataset are reported together; a missing root or
  image folder, a missing list file, ``views.csv`` or ``vehicle_info.txt`` and a
  wrong header of ``views.csv`` / ``vehicle_info.txt`` are structural.
* entry-level (all other kinds): one list line, image or table row is unusable. The
  reader drops that entry, keeps going, and at the end either raises one
  :class:`DatasetError` listing them all (``on_error="raise"``, the default) or
  returns the remaining records and the problems (``on_error="skip"``, see
  :func:`read_dataset_checked`). Checks of one entry that do not depend on each
  other are all made (a VERI-Wild image can be both missing and without a camera).
"""
from __future__ import annotations

import csv
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import InputError
from pipeline.constants import VEHICLEID_SUBSETS, VERIWILD_SUBSETS
from pipeline.data.records import VIEWS_COLUMNS, Record

__all__ = [
    "DatasetError", "ON_ERROR", "PROBLEM_KINDS", "Problem", "SOURCES", "STRUCTURAL_KINDS",
    "read_dataset", "read_dataset_checked", "read_veri776", "read_synthetic", "read_vehicleid",
    "read_veriwild", "read_veri776_index", "summarize_problems",
]

SOURCES: tuple[str, ...] = ("synthetic", "veri776", "vehicleid", "veriwild")
VERIWILD_HEADER = "id/image;Camera ID;Time;Model;Type;Color"

PROBLEM_KINDS: dict[str, str] = {
    "missing_file": "a required folder or file (root, image folder, list file, views.csv, "
                    "vehicle_info.txt, index file) does not exist [structural]",
    "bad_header": "views.csv or vehicle_info.txt does not start with the release's header [structural]",
    "malformed_line": "a list line or table row does not match the layout (bad name or field, "
                      "blank line between entries, a key with '.', an index out of range)",
    "duplicate": "an image listed twice in one list, or two views.csv rows for one image",
    "missing_image": "a listed image is not in its folder, or is there but not a readable file",
    "empty_image": "a listed image is a file of 0 bytes",
    "missing_camera": "a listed VERI-Wild image has no row in vehicle_info.txt",
    "missing_view": "a listed synthetic image has no row in views.csv",
    "conflict": "two sources disagree: vehicle_info.txt rows with different cameras for one "
                "image, or a views.csv vid/camera that differs from the file name",
}
STRUCTURAL_KINDS: frozenset[str] = frozenset({"missing_file", "bad_header"})
ON_ERROR: tuple[str, ...] = ("raise", "skip")
MAX_LISTED = 50  # problems listed one per line in a DatasetError message; the rest are counted

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


# --------------------------------------------------------------------------- problems

@dataclass(frozen=True)
class Problem:
    """One reading problem.

    kind:     one of PROBLEM_KINDS
    file:     the file (or folder) the problem is in: the list file for list lines and
              images, views.csv / vehicle_info.txt for their rows
    line:     1-based line number in ``file``, None where there is none (a missing file)
    message:  the offending text and what was expected
    split:    the split whose entry was dropped; None for problems that drop no single
              listed entry (structural ones, a bad row of an image that no list names)
    image:    path of the image concerned, where known (not for malformed lines)
    key:      the record key the entry would have had, where known
    """
    kind: str
    file: str
    line: int | None
    message: str
    split: str | None = None
    image: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"problem kind {self.kind!r} is not one of {', '.join(PROBLEM_KINDS)}")

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class DatasetError(InputError):
    """A dataset folder, list file or line does not match the dataset's official layout.

    ``problems`` holds every :class:`Problem` found (empty for a bad ``source`` or
    ``test_subset``); the message is :func:`summarize_problems` of them.
    """

    def __init__(self, message: str, problems: Iterable[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems)


def summarize_problems(root: str | Path, problems: list[Problem], limit: int = MAX_LISTED) -> str:
    """A summary line, then one ``file:line: message`` line per problem (at most ``limit``).

    ``<root>: 7 problems in 3 files: 4 missing_image, 2 malformed_line, 1 missing_camera``;
    kinds by decreasing count (ties by name); past ``limit``: ``... and N more``.
    """
    counts = Counter(p.kind for p in problems)
    n, n_files = len(problems), len({p.file for p in problems})
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    lines = [f"{root}: {n} problem{'' if n == 1 else 's'} in {n_files} file{'' if n_files == 1 else 's'}: {kinds}"]
    lines += [str(p) for p in problems[:limit]]
    if n > limit:
        lines.append(f"... and {n - limit} more")
    return "\n".join(lines)


def _fail(root: Path, problems: list[Problem]) -> None:
    raise DatasetError(summarize_problems(root, problems), problems)


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    """Group by file (in order of first appearance), then by line; stable otherwise."""
    order: dict[str, int] = {}
    for p in problems:
        order.setdefault(p.file, len(order))
    return sorted(problems, key=lambda p: (order[p.file], p.line or 0))


# --------------------------------------------------------------------------- helpers

def _require_root(root: Path, what: str) -> None:
    if not root.is_dir():
        _fail(root, [Problem("missing_file", str(root), None, f"{what} not found (expected a directory)")])


def _require(root: Path, required: list[tuple[Path, str, bool]]) -> None:
    """Raise one DatasetError naming every missing ``(path, what, is_directory)``."""
    missing = [Problem("missing_file", str(path), None,
                       f"{what} not found (expected a {'directory' if is_dir else 'file'})")
               for path, what, is_dir in required if not (path.is_dir() if is_dir else path.is_file())]
    if missing:
        _fail(root, missing)


def _lines(path: Path, problems: list[Problem], split: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, stripped text)`` of every entry line of a list file.

    Trailing blank lines are tolerated (an editor's final newline(s)); a blank line
    followed by more entries is a ``malformed_line`` problem, since it means a list
    was damaged. Undecodable bytes become U+FFFD, so they fail the caller's line
    check with a line number instead of a bare UnicodeDecodeError.
    """
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            problems.append(Problem("malformed_line", str(path), number, "blank line, expected an entry", split))
            continue
        yield number, line


class _Folder:
    """One image folder, listed once with ``os.scandir`` (no names if it does not exist).

    String operations instead of pathlib calls where it runs per image: ~400k times
    for VERI-Wild, where pathlib's parsing dominated the reading time.
    """
    __slots__ = ("path", "prefix", "names")

    def __init__(self, path: Path) -> None:
        self.path, self.prefix = path, str(path) + os.sep
        try:
            with os.scandir(path) as entries:
                self.names = frozenset(entry.name for entry in entries)
        except (FileNotFoundError, NotADirectoryError):
            self.names = frozenset()

    def check(self, name: str, problems: list[Problem], file: str, line: int, split: str, key: str) -> bool:
        """True if ``name`` is a non-empty regular file here; else add a problem, return False.

        One ``os.stat`` per image that the listing has (size in bytes, file type).
        """
        image = self.prefix + name
        if name not in self.names:
            kind, message = "missing_image", f"image {image} does not exist"
        else:
            try:
                info = os.stat(image)
            except OSError as error:  # e.g. a dangling symlink, no permission
                kind, message = "missing_image", f"image {image} cannot be read ({error.strerror})"
            else:
                if not stat.S_ISREG(info.st_mode):
                    kind, message = "missing_image", f"image {image} is not a regular file, expected a JPEG"
                elif info.st_size == 0:
                    kind, message = "empty_image", f"image {image} is empty (0 bytes), expected a JPEG"
                else:
                    return True
        problems.append(Problem(kind, file, line, message, split, image, key))
        return False

    def record(self, name: str, *, key: str, vid: int, camera: int, split: str,
               meta: dict | None = None) -> Record:
        """The Record of image ``name`` (checked), with its label PNG if the listing has one."""
        label_name = name.rpartition(".")[0] + ".png"  # == image.with_suffix(".png").name
        label = self.path / label_name if label_name in self.names else None
        return Record(key=key, image=self.path / name, vid=vid, camera=camera, split=split, label=label,
                      meta=meta if meta is not None else {})


def _first(seen: dict[str, int], key: str, problems: list[Problem], file: str, number: int, text: str,
           split: str) -> bool:
    """True the first time ``key`` is listed; a repeat is a ``duplicate`` problem (first kept)."""
    first = seen.setdefault(key, number)
    if first == number:
        return True
    problems.append(Problem("duplicate", file, number, f"duplicate key {key!r} (text {text!r}); already listed "
                                                       f"on line {first}, expected each image once per split",
                            split, None, key))
    return False


class _Table:
    """Per-image rows of a side table (views.csv, vehicle_info.txt).

    ``values``: key -> (value, line) for images with good rows. A key with a bad row
    (malformed, duplicate, conflicting) moves to ``bad`` with that row's problem;
    :meth:`report_bad` adds it once per listed image that needed the row, so each
    dropped record has its own Problem naming the table's line. A further bad row of
    a key that is already bad is added to the problems directly (split None).
    """

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, str(path)
        self.values: dict = {}
        self.bad: dict = {}  # key -> (kind, line, message)
        self.used: set = set()  # bad keys that report_bad reported

    def reject(self, key: object, kind: str, line: int, message: str, problems: list[Problem]) -> None:
        if key in self.bad:
            problems.append(Problem(kind, self.file, line, message))
            return
        self.bad[key] = (kind, line, message)
        self.values.pop(key, None)

    def report_bad(self, key: object, problems: list[Problem], split: str, image: str, record_key: str) -> bool:
        """Add the bad row's problem for this listed image; False if ``key`` has no bad row."""
        if key not in self.bad:
            return False
        kind, line, message = self.bad[key]
        problems.append(Problem(kind, self.file, line, message, split, image, record_key))
        self.used.add(key)
        return True


# --------------------------------------------------------------------------- VeRi-776 and synthetic

def _read_veri_split(root: Path, split: str, problems: list[Problem], views: _Table | None) -> list[Record]:
    """One VeRi-776 split. Per line: a JPEG name matching ``_VERI_NAME`` whose stem has no
    '.', listed once, present and non-empty; with ``views``, a views.csv row agreeing with
    the name's vid/camera (its angles go into ``meta``)."""
    folder_name, list_name = VERI_SPLITS[split]
    folder = _Folder(root / folder_name)
    list_path = root / list_name
    file = str(list_path)
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, name in _lines(list_path, problems, split):
        match = _VERI_NAME.match(name)
        if (match is None or any(c in name for c in "/\\ \t")
                or not name.lower().endswith(_JPEG_SUFFIXES)):
            problems.append(Problem("malformed_line", file, number, f"got {name!r}, expected a JPEG file name like "
                                    f"'0002_c002_00030600_0.jpg' (pattern {_VERI_NAME.pattern})", split))
            continue
        key = name.rpartition(".")[0] or name  # the file stem
        if "." in key:  # the name itself is unusable as a WebDataset key
            problems.append(Problem("malformed_line", file, number, f"key {key!r} (image {name!r}) must not contain "
                                    f"'.' or '/', expected a name whose stem has no dots (WebDataset keys)", split))
            continue
        if not _first(seen, key, problems, file, number, name, split):
            continue
        vid, camera = int(match.group(1)), int(match.group(2))
        ok = folder.check(name, problems, file, number, split, key)
        meta = None
        if views is not None:
            meta = _view_meta(views, folder_name, name, folder.prefix + name, vid, camera, problems,
                              file, number, split, key)
        if ok and (views is None or meta is not None):
            records.append(folder.record(name, key=key, vid=vid, camera=camera, split=split, meta=meta))
    return records


def _view_meta(views: _Table, folder: str, name: str, image: str, vid: int, camera: int,
               problems: list[Problem], file: str, number: int, split: str, key: str) -> dict | None:
    """``{"azimuth_deg", "elevation_deg"}`` from the image's views.csv row, or None after adding
    a ``missing_view`` / ``conflict`` problem (or the row's own problem)."""
    entry = views.values.get((folder, name))
    if entry is None:
        if not views.report_bad((folder, name), problems, split, image, key):
            problems.append(Problem("missing_view", file, number, f"image {folder}/{name} has no row in "
                                    f"{views.path}; expected one row per listed image", split, image, key))
        return None
    (row_vid, row_camera, azimuth, elevation), line = entry
    if (row_vid, row_camera) != (vid, camera):
        problems.append(Problem("conflict", views.file, line, f"vid/camera {row_vid}/{row_camera} for {name!r}, "
                                f"expected {vid}/{camera} (from the file name)", split, image, key))
        return None
    return {"azimuth_deg": azimuth, "elevation_deg": elevation}


def _read_views(path: Path, problems: list[Problem]) -> _Table:
    """``views.csv`` -> a table {(folder, name): ((vid, camera, azimuth_deg, elevation_deg), line)}.

    Checked per row: 6 fields, integer vid/camera, finite angles (degrees), one row
    per image. A wrong header is structural (raises at once).
    """
    table = _Table(path)
    first_line: dict[tuple[str, str], int] = {}
    expected = f"expected {len(VIEWS_COLUMNS)} fields ({','.join(VIEWS_COLUMNS)})"
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != VIEWS_COLUMNS:
            _fail(path.parent, [Problem("bad_header", str(path), 1,
                                        f"got header {header!r}, expected {','.join(VIEWS_COLUMNS)}")])
        for row in reader:
            number = reader.line_num
            if not row:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():  # no image to attach it to
                problems.append(Problem("malformed_line", table.file, number, f"got {row!r}, {expected}"))
                continue
            folder, name = row[0].strip(), row[1].strip()
            first = first_line.setdefault((folder, name), number)
            if first != number:
                table.reject((folder, name), "duplicate", number, f"duplicate row for {folder}/{name}, first on "
                             f"line {first}; expected one row per image", problems)
                continue
            if len(row) != len(VIEWS_COLUMNS):
                table.reject((folder, name), "malformed_line", number, f"got {row!r}, {expected}", problems)
                continue
            try:
                vid, camera = int(row[2]), int(row[3])
                azimuth, elevation = float(row[4]), float(row[5])
            except ValueError:
                table.reject((folder, name), "malformed_line", number, f"got {row!r}, expected integer vid/camera "
                             f"and numeric azimuth_deg/elevation_deg", problems)
                continue
            if not (math.isfinite(azimuth) and math.isfinite(elevation)):
                table.reject((folder, name), "malformed_line", number, f"got {row!r}, expected finite angles",
                             problems)
                continue
            table.values[(folder, name)] = ((vid, camera, azimuth, elevation), number)
    return table


def _read_veri776(root: Path, problems: list[Problem], with_views: bool = False) -> dict[str, list[Record]]:
    _require_root(root, "synthetic set root" if with_views else "VeRi-776 root")
    required = [(root / folder, f"VeRi-776 {split} image folder", True) for split, (folder, _) in VERI_SPLITS.items()]
    required += [(root / list_name, "list file", False) for _, list_name in VERI_SPLITS.values()]
    if with_views:
        required.append((root / "views.csv", "views file", False))
    _require(root, required)
    views = _read_views(root / "views.csv", problems) if with_views else None
    splits = {split: _read_veri_split(root, split, problems, views) for split in VERI_SPLITS}
    if views is not None:  # bad rows of images that no list names: still damage in the file
        for (folder, name), (kind, line, message) in views.bad.items():
            if (folder, name) not in views.used:
                problems.append(Problem(kind, views.file, line, message, None, str(root / folder / name)))
    return splits


def _read_synthetic(root: Path, problems: list[Problem]) -> dict[str, list[Record]]:
    return _read_veri776(root, problems, with_views=True)


def read_veri776(root: str | Path) -> dict[str, list[Record]]:
    """Read VeRi-776: ``{"train", "query", "gallery"} -> records``; vid/camera from names.

    Raises one DatasetError listing every problem; see :func:`read_dataset_checked`.
    """
    return _run(_read_veri776, Path(root), "raise")[0]


def read_synthetic(root: str | Path) -> dict[str, list[Record]]:
    """Read the synthetic set: the VeRi-776 reader plus per-image view angles.

    Each record's ``meta`` is ``{"azimuth_deg": float, "elevation_deg": float}`` from
    ``views.csv``; a listed image without a row (``missing_view``), or whose row
    disagrees with the vid/camera in its file name (``conflict``), is a problem.
    """
    return _run(_read_synthetic, Path(root), "raise")[0]


def _read_index_file(path: Path, n_rows: int, n_gallery: int, problems: list[Problem]) -> list[list[int]]:
    """One row per query of space-separated 1-based gallery indices -> 0-based lists.

    An empty line means no entries; missing rows at the end of the file also mean
    no entries (the last row may be empty and the file may or may not end in a newline).
    """
    rows = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    file = str(path)
    result: list[list[int]] = []
    for number, raw in enumerate(rows, start=1):
        if number > n_rows:
            if raw.strip():
                problems.append(Problem("malformed_line", file, number, f"got {raw.strip()!r}, expected at most "
                                        f"{n_rows} lines (one per line of name_query.txt)"))
            continue
        indices = []
        for token in raw.split():
            if not token.isdigit() or not 1 <= int(token) <= n_gallery:
                problems.append(Problem("malformed_line", file, number, f"got {token!r}, expected a 1-based index "
                                        f"into name_test.txt (1..{n_gallery})"))
                continue
            indices.append(int(token) - 1)
        result.append(indices)
    result.extend([] for _ in range(n_rows - len(result)))
    return result


def read_veri776_index(root: str | Path) -> tuple[list[list[int]], list[list[int]]]:
    """Read VeRi-776's ``gt_index.txt`` and ``jk_index.txt``.

    Returns ``(gt, jk)``: for each line of ``name_query.txt``, the 0-based positions
    in ``name_test.txt`` of its true matches / junk images (same id, same camera).
    Raises one DatasetError if a file is missing or listing every bad index.
    """
    root = Path(root)
    _require_root(root, "VeRi-776 root")
    _require(root, [(root / "name_query.txt", "list file", False), (root / "name_test.txt", "list file", False),
                    (root / "gt_index.txt", "index file", False), (root / "jk_index.txt", "index file", False)])
    problems: list[Problem] = []
    n_query = sum(1 for _ in _lines(root / "name_query.txt", problems, "query"))
    n_gallery = sum(1 for _ in _lines(root / "name_test.txt", problems, "gallery"))
    gt = _read_index_file(root / "gt_index.txt", n_query, n_gallery, problems)
    jk = _read_index_file(root / "jk_index.txt", n_query, n_gallery, problems)
    if problems:
        _fail(root, _in_file_order(problems))
    return gt, jk


# --------------------------------------------------------------------------- VehicleID

def _subset(source: str, test_subset: object, allowed: tuple[str, ...]) -> str:
    value = None if test_subset is None else str(test_subset).strip()
    if value not in allowed:
        raise DatasetError(f"{source}: test_subset got {test_subset!r}, expected one of "
                           f"{', '.join(allowed)}")
    return value


def _read_vehicleid_list(path: Path, folder: _Folder, split: str, problems: list[Problem]) -> list[Record]:
    """Lines ``<name> <vehicle id>``: a name without extension, an integer id, listed once,
    ``image/<name>.jpg`` present and non-empty."""
    file = str(path)
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, line in _lines(path, problems, split):
        fields = line.split()
        if (len(fields) != 2 or _VEHICLEID_NAME.match(fields[0]) is None
                or not fields[1].isdigit()):
            problems.append(Problem("malformed_line", file, number, f"got {line!r}, expected '<image name> "
                                    f"<vehicle id>' (e.g. '0001430 13': name without extension, integer id)", split))
            continue
        name, vid = fields[0], int(fields[1])
        if _first(seen, name, problems, file, number, line, split) and folder.check(
                f"{name}.jpg", problems, file, number, split, name):
            records.append(folder.record(f"{name}.jpg", key=name, vid=vid, camera=-1, split=split))
    return records


def _read_vehicleid(root: Path, test_subset: str | int | None, problems: list[Problem]) -> dict[str, list[Record]]:
    subset = _subset("vehicleid", test_subset, VEHICLEID_SUBSETS)
    _require_root(root, "VehicleID root")
    lists = root / "train_test_split"
    paths = {"train": lists / "train_list.txt", "test": lists / f"test_list_{subset}.txt"}
    _require(root, [(root / "image", "VehicleID image folder", True),
                    *((path, "list file", False) for path in paths.values())])
    folder = _Folder(root / "image")
    return {split: _read_vehicleid_list(path, folder, split, problems) for split, path in paths.items()}


def read_vehicleid(root: str | Path, test_subset: str | int | None) -> dict[str, list[Record]]:
    """Read VehicleID: ``{"train", "test"} -> records`` (camera -1, key = image name).

    ``test_subset`` (800/1600/2400/3200/6000/13164) picks ``test_list_<subset>.txt``.
    Raises one DatasetError listing every problem; see :func:`read_dataset_checked`.
    """
    return _run(lambda r, p: _read_vehicleid(r, test_subset, p), Path(root), "raise")[0]


# --------------------------------------------------------------------------- VERI-Wild

def _read_veriwild_list(path: Path, split: str, problems: list[Problem]) -> list[tuple[int, str, int, str]]:
    """``<vid>/<imgid>`` lines (digits) -> [(line number, entry text, vid, imgid)], each listed once."""
    file = str(path)
    entries = []
    seen: dict[str, int] = {}
    for number, line in _lines(path, problems, split):
        match = _VERIWILD_LINE.match(line)
        if match is None:
            problems.append(Problem("malformed_line", file, number, f"got {line!r}, expected '<vid>/<imgid>' "
                                    f"(digits, e.g. '00001/000001')", split))
            continue
        if _first(seen, line, problems, file, number, line, split):
            entries.append((number, line, int(match.group(1)), match.group(2)))
    return entries


def _read_vehicle_info(path: Path, wanted: set[str], problems: list[Problem]) -> _Table:
    """One streaming pass over ``vehicle_info.txt`` -> a table {"<vid>/<imgid>": (camera, line)}.

    Only the first two ';'-separated fields are parsed, and only for wanted rows:
    the file has ~416k lines and the other columns (time, model, ...) are unused.
    A wanted row without an integer camera is ``malformed_line``; rows of one image
    with different cameras are a ``conflict``. A wrong header raises at once.
    """
    table = _Table(path)
    values = table.values
    # errors="replace": model names may not be UTF-8; the two fields we use are ASCII.
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline().rstrip("\r\n")
        if header != VERIWILD_HEADER:
            _fail(path.parent, [Problem("bad_header", table.file, 1,
                                        f"got header {header!r}, expected {VERIWILD_HEADER!r}")])
        for number, line in enumerate(handle, start=2):
            fields = line.split(";", 2)
            key = fields[0].strip()
            if key not in wanted:
                continue
            try:
                camera = int(fields[1])
            except (IndexError, ValueError):
                table.reject(key, "malformed_line", number, f"got {line.rstrip()!r}, expected "
                             f"'<vid>/<imgid>;<integer camera id>;...'", problems)
                continue
            known = values.get(key)
            if known is None:
                if key not in table.bad:
                    values[key] = (camera, number)
            elif known[0] != camera:
                table.reject(key, "conflict", number, f"camera {camera} for {key!r} disagrees with camera "
                             f"{known[0]} on line {known[1]}", problems)
    return table


def _read_veriwild(root: Path, test_subset: str | None, problems: list[Problem]) -> dict[str, list[Record]]:
    subset = _subset("veriwild", test_subset, tuple(VERIWILD_SUBSETS))
    n = VERIWILD_SUBSETS[subset][0]  # the lists are named by their query (= identity) count
    _require_root(root, "VERI-Wild root")
    images = root / "images"
    lists = root / "train_test_split"
    list_paths = {"train": lists / "train_list.txt",
                  "query": lists / f"test_{n}_query.txt",
                  "gallery": lists / f"test_{n}.txt"}
    info_path = lists / "vehicle_info.txt"
    _require(root, [(images, "VERI-Wild image folder", True),
                    *((path, "list file", False) for path in list_paths.values()),
                    (info_path, "VERI-Wild vehicle_info file", False)])
    entries = {split: _read_veriwild_list(path, split, problems) for split, path in list_paths.items()}
    wanted = {text for rows in entries.values() for _, text, _, _ in rows}
    cameras = _read_vehicle_info(info_path, wanted, problems)

    folders: dict[str, _Folder] = {}  # vid folder name -> its listing
    result: dict[str, list[Record]] = {}
    for split, rows in entries.items():
        file = str(list_paths[split])
        records = []
        for number, text, vid, imgid in rows:
            vid_folder = text.partition("/")[0]  # keep the release's zero padding
            folder = folders.get(vid_folder)
            if folder is None:
                folder = folders[vid_folder] = _Folder(images / vid_folder)
            key, name = f"{vid_folder}_{imgid}", f"{imgid}.jpg"
            ok = folder.check(name, problems, file, number, split, key)
            camera = cameras.values.get(text)
            if camera is None:
                ok = False
                if not cameras.report_bad(text, problems, split, folder.prefix + name, key):
                    problems.append(Problem("missing_camera", file, number, f"image {text!r} has no row in "
                                            f"{info_path}; expected a camera entry for every listed image",
                                            split, folder.prefix + name, key))
            if ok:
                records.append(folder.record(name, key=key, vid=vid, camera=camera[0], split=split))
        result[split] = records
    return result


def read_veriwild(root: str | Path, test_subset: str | None) -> dict[str, list[Record]]:
    """Read VERI-Wild: ``{"train", "query", "gallery"} -> records``; key ``<vid>_<imgid>``.

    ``test_subset`` small/medium/large picks ``test_{3000,5000,10000}[_query].txt``.
    Cameras come from ``train_test_split/vehicle_info.txt`` (read once, streaming).
    Raises one DatasetError listing every problem; see :func:`read_dataset_checked`.
    """
    return _run(lambda r, p: _read_veriwild(r, test_subset, p), Path(root), "raise")[0]


# --------------------------------------------------------------------------- dispatch

_Reader = Callable[[Path, list[Problem]], dict[str, list[Record]]]


def _check_on_error(on_error: object) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error got {on_error!r}, expected one of {', '.join(map(repr, ON_ERROR))}")


def _run(read: _Reader, root: Path, on_error: str) -> tuple[dict[str, list[Record]], list[Problem]]:
    _check_on_error(on_error)
    problems: list[Problem] = []
    splits = read(root, problems)
    problems = _in_file_order(problems)
    if problems and on_error == "raise":
        _fail(root, problems)
    return splits, problems


def read_dataset_checked(source: str, root: str | Path, test_subset: str | int | None = None,
                         on_error: str = "raise") -> tuple[dict[str, list[Record]], list[Problem]]:
    """Read ``root`` in the layout of ``source`` -> ``({split: records}, problems)``.

    Every entry is checked (see :data:`PROBLEM_KINDS`). ``on_error="raise"``: if any
    entry-level problem was found, raise one DatasetError whose message is
    :func:`summarize_problems` and whose ``.problems`` is the full list; else
    problems is ``[]``. ``on_error="skip"``: return the records without the bad
    entries (of a list line listed twice, the first is kept) and every problem,
    grouped by file then line; a problem with a ``split`` dropped that split's entry.
    Structural problems (``missing_file``, ``bad_header``) raise in either mode.
    Any other ``on_error`` is a ValueError.
    """
    _check_on_error(on_error)
    readers: dict[str, _Reader] = {
        "synthetic": _read_synthetic,
        "veri776": _read_veri776,
        "vehicleid": lambda r, p: _read_vehicleid(r, test_subset, p),
        "veriwild": lambda r, p: _read_veriwild(r, test_subset, p),
    }
    if source not in readers:
        raise DatasetError(f"unknown dataset {source!r}, expected one of {', '.join(SOURCES)}")
    return _run(readers[source], Path(root), on_error)


def read_dataset(source: str, root: str | Path, test_subset: str | int | None = None,
                 on_error: str = "raise") -> dict[str, list[Record]]:
    """Read ``root`` in the layout of ``source`` -> ``{split: records}`` (list-file order).

    ``test_subset`` is required for vehicleid (800/1600/2400/3200/6000/13164) and
    veriwild (small/medium/large) and ignored by veri776 and synthetic. ``on_error``
    as in :func:`read_dataset_checked` (use that to get the skipped problems).
    """
    return read_dataset_checked(source, root, test_subset, on_error)[0]


def skipped_entry(problem: Problem) -> dict:
    """A problem as an entry of the shard manifest's ``skipped`` list (``shard.bad_entries: skip``)."""
    return {"split": problem.split, "key": problem.key, "image": problem.image, "reason": f"{problem.kind}: {problem}"}
