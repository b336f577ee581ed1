"""Dataset readers against tiny trees written in each release's exact layout."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sources import (
    MAX_LISTED,
    PROBLEM_KINDS,
    DatasetError,
    Problem,
    read_dataset,
    read_dataset_checked,
    read_synthetic,
    read_vehicleid,
    read_veri776,
    read_veri776_index,
    read_veriwild,
)
from tests.fixtures_datasets import (
    drop_rows,
    edit_lines,
    empty_file,
    insert_line,
    make_vehicleid,
    make_veri776,
    make_veriwild,
)


def _raises(match_parts: list[str], fn, *args, **kwargs) -> str:
    """Call fn, expect a DatasetError whose message contains every part; return it."""
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def _problems(match_parts: list[str], fn, *args, **kwargs) -> list[Problem]:
    """Like _raises; return the error's problems (every one also in its message)."""
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert info.value.problems and all(str(p) in message for p in info.value.problems)
    return info.value.problems


# --------------------------------------------------------------------------- VeRi-776

def test_veri776_records_match_layout(tmp_path):
    tree = make_veri776(tmp_path)
    got = read_dataset("veri776", tmp_path)
    assert list(got) == ["train", "query", "gallery"]
    assert got == tree.records  # keys, paths, vids, cameras, splits, labels, order
    for split, records in got.items():
        for r in records:
            # Independent of the reader's regex: the name is <vid:04>_c<cam:03>_...
            assert (r.vid, r.camera) == (int(r.key[:4]), int(r.key[6:9]))
            assert r.image.name == r.key + ".jpg" and r.split == split
            assert (r.label is not None) == r.image.with_suffix(".png").is_file()
    labels = [r.label for rs in got.values() for r in rs]
    assert any(labels) and None in labels
    # the release's rule: every query image is also in the gallery
    assert {r.key for r in got["query"]} <= {r.key for r in got["gallery"]}


def test_veri776_release_name_example(tmp_path):
    name = "0002_c002_00030600_0.jpg"
    for folder, list_name in (("image_train", "name_train.txt"), ("image_query", "name_query.txt"),
                              ("image_test", "name_test.txt")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / name)
        (tmp_path / list_name).write_text(name + "\r\n")  # release lists may be CRLF
    (record,) = read_veri776(tmp_path)["train"]
    assert (record.key, record.vid, record.camera, record.label) == (
        "0002_c002_00030600_0", 2, 2, None)


def test_veri776_junk_rule_matches_release_index(tmp_path):
    make_veri776(tmp_path, newline="\r\n")
    got = read_veri776(tmp_path)
    gt, jk = read_veri776_index(tmp_path)
    gallery = got["gallery"]
    assert len(gt) == len(jk) == len(got["query"])
    assert [] in gt  # the single-camera id: its gt line is empty (and the file's last line)
    for q, gt_row, jk_row in zip(got["query"], gt, jk):
        same_id = [i for i, g in enumerate(gallery) if g.vid == q.vid]
        assert jk_row == [i for i in same_id if gallery[i].camera == q.camera]
        assert gt_row == [i for i in same_id if gallery[i].camera != q.camera]


def test_veri776_index_out_of_range(tmp_path):
    tree = make_veri776(tmp_path)
    n_gallery = len(tree.records["gallery"])
    edit_lines(tmp_path / "jk_index.txt", lambda ls: [ls[0], f"1 {n_gallery + 1}"] + ls[2:])
    _raises(["jk_index.txt:2", repr(str(n_gallery + 1)), f"1..{n_gallery}"],
            read_veri776_index, tmp_path)


def test_synthetic_reads_views_meta(tmp_path):
    tree = make_veri776(tmp_path, views=True)
    got = read_dataset("synthetic", tmp_path, test_subset="ignored")
    assert got == tree.records
    for split, records in got.items():
        for r, want in zip(records, tree.records[split]):
            assert r.meta == want.meta and set(r.meta) == {"azimuth_deg", "elevation_deg"}
            assert all(isinstance(v, float) for v in r.meta.values())
    # a query image and its gallery copy are distinct rows of views.csv
    assert got["query"][0].key == got["gallery"][0].key
    assert got["query"][0].meta != got["gallery"][0].meta


def test_synthetic_views_errors(tmp_path):
    make_veri776(tmp_path, views=True)
    views = tmp_path / "views.csv"
    lines = views.read_text().splitlines()
    # a listed image without a row
    views.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    name = lines[1].split(",")[1]
    _raises(["views.csv", name, "image_train"], read_synthetic, tmp_path)
    # a row whose vid disagrees with the file name
    folder, name, vid, *rest = lines[1].split(",")
    views.write_text("\n".join(lines[:1] + [",".join([folder, name, "77", *rest])] + lines[2:]))
    _raises(["views.csv:2", name, "77"], read_synthetic, tmp_path)
    # a header that differs
    views.write_text("\n".join(["folder,name,vid,cam,azimuth_deg,elevation_deg"] + lines[1:]))
    _raises(["views.csv:1", "folder,name,vid,camera,azimuth_deg,elevation_deg"],
            read_synthetic, tmp_path)


@pytest.mark.parametrize("bad, expect", [
    ("vehicle_0002.jpg", "expected a JPEG file name"),
    ("0002_c002_00030600_0.png", "expected a JPEG file name"),
    ("", "blank line"),
    ("0002_c002_0.5.jpg", "must not contain '.'"),  # a key with a dot would break WebDataset
])
def test_veri776_malformed_line(tmp_path, bad, expect):
    make_veri776(tmp_path)
    edit_lines(tmp_path / "name_train.txt", lambda ls: ls[:2] + [bad] + ls[2:])
    _raises(["name_train.txt:3", expect] + ([repr(bad)] if bad else []), read_veri776, tmp_path)


def test_veri776_trailing_blank_lines_are_fine(tmp_path):
    tree = make_veri776(tmp_path)
    path = tmp_path / "name_query.txt"
    path.write_text(path.read_text() + "\n  \n")
    assert read_veri776(tmp_path) == tree.records


def test_veri776_missing_image(tmp_path):
    tree = make_veri776(tmp_path)
    missing = tree.records["gallery"][4].image
    missing.unlink()
    _raises(["name_test.txt:5", str(missing), "does not exist"], read_veri776, tmp_path)


def test_veri776_duplicate_key(tmp_path):
    make_veri776(tmp_path)
    edit_lines(tmp_path / "name_query.txt", lambda ls: ls + [ls[1]])
    n = len((tmp_path / "name_query.txt").read_text().splitlines())
    _raises([f"name_query.txt:{n}", "duplicate key", "line 2"], read_veri776, tmp_path)


def test_missing_root_and_list_file(tmp_path):
    _raises([str(tmp_path / "nope")], read_dataset, "veri776", tmp_path / "nope")
    make_veri776(tmp_path)
    (tmp_path / "name_test.txt").unlink()
    _raises([str(tmp_path / "name_test.txt"), "not found"], read_dataset, "veri776", tmp_path)


def test_unknown_dataset_name(tmp_path):
    message = _raises(["'veri'"], read_dataset, "veri", tmp_path)
    for known in ("synthetic", "veri776", "vehicleid", "veriwild"):
        assert known in message


# --------------------------------------------------------------------------- VehicleID

def test_vehicleid_records_match_layout(tmp_path):
    tree = make_vehicleid(tmp_path, subsets=("800", "1600"))
    got = read_dataset("vehicleid", tmp_path, test_subset=800)  # int works like "800"
    assert list(got) == ["train", "test"]
    assert got["train"] == tree.records["train"]
    assert got["test"] == tree.records["test_800"]
    bigger = read_vehicleid(tmp_path, "1600")["test"]
    assert bigger == tree.records["test_1600"] and len(bigger) > len(got["test"])
    for r in got["train"] + got["test"]:
        assert r.camera == -1 and re.fullmatch(r"\d{7}", r.key)
        assert r.image == tmp_path / "image" / f"{r.key}.jpg"
    labels = [r.label for r in got["train"]]
    assert any(labels) and None in labels


@pytest.mark.parametrize("bad, expect", [
    ("0000001", "expected '<image name> <vehicle id>'"),
    ("0000001 twelve", "integer id"),
    ("0000001.jpg 12", "name without extension"),
])
def test_vehicleid_malformed_line(tmp_path, bad, expect):
    make_vehicleid(tmp_path)
    edit_lines(tmp_path / "train_test_split" / "test_list_800.txt", lambda ls: [bad] + ls)
    _raises(["test_list_800.txt:1", repr(bad), expect], read_vehicleid, tmp_path, "800")


def test_vehicleid_missing_image_and_duplicate(tmp_path):
    tree = make_vehicleid(tmp_path)
    path = tmp_path / "train_test_split" / "train_list.txt"
    edit_lines(path, lambda ls: ls + [ls[0]])
    n = len(path.read_text().splitlines())
    _raises([f"train_list.txt:{n}", "duplicate key", repr(tree.records["train"][0].key)],
            read_vehicleid, tmp_path, "800")
    edit_lines(path, lambda ls: ls[:-1])
    tree.records["train"][1].image.unlink()
    _raises(["train_list.txt:2", "does not exist"], read_vehicleid, tmp_path, "800")


@pytest.mark.parametrize("source, subset, expect", [
    ("vehicleid", None, "800, 1600, 2400, 3200, 6000, 13164"),
    ("vehicleid", "900", "800, 1600, 2400, 3200, 6000, 13164"),
    ("veriwild", None, "small, medium, large"),
    ("veriwild", "3000", "small, medium, large"),
])
def test_test_subset_required(tmp_path, source, subset, expect):
    _raises([source, "test_subset", repr(subset), expect], read_dataset, source, tmp_path, subset)


# --------------------------------------------------------------------------- VERI-Wild

def test_veriwild_records_match_layout(tmp_path):
    tree = make_veriwild(tmp_path, subsets=("small", "medium"))
    got = read_dataset("veriwild", tmp_path, test_subset="small")
    assert list(got) == ["train", "query", "gallery"]
    assert got["train"] == tree.records["train"]
    assert got["query"] == tree.records["query_small"]
    assert got["gallery"] == tree.records["gallery_small"]
    medium = read_veriwild(tmp_path, "medium")
    assert medium["gallery"] == tree.records["gallery_medium"]
    assert len(medium["gallery"]) > len(got["gallery"])
    # cameras come from vehicle_info.txt, key is <vid>_<imgid> with the release's padding
    info = {}
    for line in (tmp_path / "train_test_split" / "vehicle_info.txt").read_text().splitlines()[1:]:
        entry, camera = line.split(";")[:2]
        info[entry.replace("/", "_")] = int(camera)
    for r in got["train"] + got["query"] + got["gallery"]:
        assert re.fullmatch(r"\d{5}_\d{6}", r.key) and r.camera == info[r.key]
        assert r.vid == int(r.key[:5])
        assert r.image == tmp_path / "images" / r.key[:5] / f"{r.key[6:]}.jpg"
    labels = [r.label for r in got["train"]]
    assert any(labels) and None in labels


def test_veriwild_bad_header(tmp_path):
    make_veriwild(tmp_path)
    info = tmp_path / "train_test_split" / "vehicle_info.txt"
    edit_lines(info, lambda ls: ["id/image;Camera;Time;Model;Type;Color"] + ls[1:])
    _raises(["vehicle_info.txt:1", "'id/image;Camera;Time;Model;Type;Color'",
             "'id/image;Camera ID;Time;Model;Type;Color'"], read_veriwild, tmp_path, "small")


def test_veriwild_image_missing_from_vehicle_info(tmp_path):
    tree = make_veriwild(tmp_path)
    gone = tree.records["gallery"][2].key.replace("_", "/")
    info = tmp_path / "train_test_split" / "vehicle_info.txt"
    edit_lines(info, lambda ls: [line for line in ls if not line.startswith(gone + ";")])
    _raises(["test_3000.txt:3", repr(gone), "vehicle_info.txt"], read_veriwild, tmp_path, "small")


def test_veriwild_bad_camera_in_vehicle_info(tmp_path):
    tree = make_veriwild(tmp_path)
    entry = tree.records["train"][0].key.replace("_", "/")
    info = tmp_path / "train_test_split" / "vehicle_info.txt"
    edit_lines(info, lambda ls: [ls[0], f"{entry};cam7;t;m;t;c"] + ls[2:])
    _raises(["vehicle_info.txt:2", "cam7", "integer camera id"], read_veriwild, tmp_path, "small")


@pytest.mark.parametrize("bad", ["00001_000001", "00001/000001.jpg", "1/2/3"])
def test_veriwild_malformed_line(tmp_path, bad):
    make_veriwild(tmp_path)
    edit_lines(tmp_path / "train_test_split" / "test_3000_query.txt", lambda ls: ls[:1] + [bad])
    _raises(["test_3000_query.txt:2", repr(bad), "'<vid>/<imgid>'"], read_veriwild,
            tmp_path, "small")


def test_veriwild_missing_image(tmp_path):
    tree = make_veriwild(tmp_path)
    tree.records["query"][1].image.unlink()
    _raises(["test_3000_query.txt:2", str(tree.records["query"][1].image), "does not exist"],
            read_veriwild, tmp_path, "small")


# --------------------------------------------------------------------------- collecting problems

def _problem_rows(problems: list[Problem]) -> list[tuple[str, str, int | None]]:
    return [(p.kind, Path(p.file).name, p.line) for p in problems]


def _veri776_with_faults(root: Path):
    """2 missing images, 1 zero-byte image, 1 malformed list line -> (tree, dropped, expected rows)."""
    tree = make_veri776(root)
    train, gallery = tree.records["train"], tree.records["gallery"]
    dropped = [train[1], train[3], gallery[4]]
    train[1].image.unlink()
    empty_file(train[3].image)
    gallery[4].image.unlink()
    insert_line(root / "name_query.txt", 2, "vehicle_0002.jpg")
    expected = [("missing_image", "name_train.txt", 2), ("empty_image", "name_train.txt", 4),
                ("malformed_line", "name_query.txt", 2), ("missing_image", "name_test.txt", 5)]
    return tree, dropped, expected


def test_veri776_reports_every_problem_at_once(tmp_path):
    tree, dropped, expected = _veri776_with_faults(tmp_path)
    with pytest.raises(DatasetError) as info:
        read_dataset("veri776", tmp_path)
    error = info.value
    head, *lines = str(error).splitlines()
    assert head == f"{tmp_path}: 4 problems in 3 files: 2 missing_image, 1 empty_image, 1 malformed_line"
    assert _problem_rows(error.problems) == expected
    assert lines == [str(p) for p in error.problems]
    for (_, file, line), text in zip(expected, lines):
        assert text.startswith(f"{tmp_path / file}:{line}: ")
    missing_train, empty, malformed, missing_gallery = error.problems
    assert str(dropped[0].image) in missing_train.message and "does not exist" in missing_train.message
    assert str(dropped[1].image) in empty.message and "0 bytes" in empty.message
    assert "'vehicle_0002.jpg'" in malformed.message and "expected a JPEG file name" in malformed.message
    assert str(dropped[2].image) in missing_gallery.message
    # the entries that were dropped are named for the manifest
    assert [(p.split, p.key, p.image) for p in (missing_train, empty, missing_gallery)] == [
        (r.split, r.key, str(r.image)) for r in dropped]
    assert (malformed.split, malformed.key, malformed.image) == ("query", None, None)
    # the same through the per-dataset reader
    assert _problem_rows(_problems(["4 problems"], read_veri776, tmp_path)) == expected


def test_veri776_skip_drops_exactly_the_bad_entries(tmp_path):
    tree, dropped, expected = _veri776_with_faults(tmp_path)
    got, problems = read_dataset_checked("veri776", tmp_path, on_error="skip")
    want = {split: [r for r in records if r not in dropped] for split, records in tree.records.items()}
    assert got == want
    assert sum(map(len, tree.records.values())) - sum(map(len, got.values())) == 3
    assert _problem_rows(problems) == expected
    assert read_dataset("veri776", tmp_path, on_error="skip") == want


@pytest.mark.parametrize("source, subset, builder", [
    ("veri776", None, make_veri776),
    ("synthetic", None, lambda root: make_veri776(root, views=True)),
    ("vehicleid", "1600", make_vehicleid),  # records["test"] is the largest subset's
    ("veriwild", "small", make_veriwild),
])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_clean_dataset_has_no_problems(tmp_path, source, subset, builder, on_error):
    tree = builder(tmp_path)
    got, problems = read_dataset_checked(source, tmp_path, subset, on_error=on_error)
    assert problems == []
    assert list(got) == (["train", "test"] if source == "vehicleid" else ["train", "query", "gallery"])
    for split, records in got.items():
        assert records == tree.records[split]
        assert [r.meta for r in records] == [r.meta for r in tree.records[split]]


def test_on_error_must_be_known(tmp_path):
    make_veri776(tmp_path)
    for call in (read_dataset, read_dataset_checked):
        with pytest.raises(ValueError, match="on_error") as info:
            call("veri776", tmp_path, on_error="ignore")
        assert not isinstance(info.value, DatasetError)
        assert all(part in str(info.value) for part in ("'ignore'", "'raise'", "'skip'"))


def test_structural_problems_raise_even_when_skipping(tmp_path):
    make_veri776(tmp_path)
    (tmp_path / "name_query.txt").unlink()
    (tmp_path / "name_test.txt").unlink()
    problems = _problems(["2 problems in 2 files: 2 missing_file", "name_query.txt", "name_test.txt"],
                       read_dataset_checked, "veri776", tmp_path, on_error="skip")
    assert [(p.kind, p.line) for p in problems] == [("missing_file", None)] * 2
    missing_root = tmp_path / "nope"
    assert _problem_rows(_problems([str(missing_root)], read_dataset, "veri776", missing_root,
                                 on_error="skip")) == [("missing_file", "nope", None)]


def test_listed_problems_are_capped(tmp_path):
    make_veri776(tmp_path)
    n = MAX_LISTED + 10
    edit_lines(tmp_path / "name_train.txt", lambda ls: ls + [f"bad_{i}.jpg" for i in range(n)])
    with pytest.raises(DatasetError) as info:
        read_veri776(tmp_path)
    head, *lines = str(info.value).splitlines()
    assert head.endswith(f": {n} problems in 1 file: {n} malformed_line")
    assert len(lines) == MAX_LISTED + 1 and lines[-1] == "... and 10 more"
    assert len(info.value.problems) == n  # the exception carries them all


def test_problem_text_and_kinds():
    assert str(Problem("missing_image", "a/name_test.txt", 5, "image x does not exist")) == (
        "a/name_test.txt:5: image x does not exist")
    assert str(Problem("missing_file", "a/views.csv", None, "views file not found")) == (
        "a/views.csv: views file not found")
    assert {"malformed_line", "missing_image", "empty_image", "missing_camera", "missing_view",
            "duplicate", "conflict", "missing_file", "bad_header"} == set(PROBLEM_KINDS)
    with pytest.raises(ValueError, match="'typo'"):
        Problem("typo", "f", 1, "m")


def test_synthetic_views_problems_are_collected(tmp_path):
    tree = make_veri776(tmp_path, views=True)
    views = tmp_path / "views.csv"
    rows = views.read_text().splitlines()  # rows[i] is line i + 1; rows[1..] follow train order
    train = tree.records["train"]
    assert [row.split(",")[1] for row in rows[1:5]] == [r.image.name for r in train[:4]]
    folder, name, vid, camera, _, elevation = rows[2].split(",")
    rows[2] = ",".join([folder, name, "77", camera, "0.0", elevation])  # train[1]: vid disagrees
    folder, name, vid, camera, _, elevation = rows[3].split(",")
    rows[3] = ",".join([folder, name, vid, camera, "nan", elevation])  # train[2]: not finite
    rows.append(rows[4])  # train[3]: a second row
    del rows[1]  # train[0]: no row (shifts the lines above by one)
    views.write_text("\n".join(rows) + "\n")
    n = len(rows)
    got, problems = read_dataset_checked("synthetic", tmp_path, on_error="skip")
    assert _problem_rows(problems) == [("missing_view", "name_train.txt", 1), ("conflict", "views.csv", 2),
                                       ("malformed_line", "views.csv", 3), ("duplicate", "views.csv", n)]
    assert [p.key for p in problems] == [r.key for r in train[:4]]
    assert got["train"] == train[4:] and got["query"] == tree.records["query"]
    assert "line 4" in problems[3].message and "vid/camera 77/" in problems[1].message
    _raises(["4 problems in 2 files", "1 conflict, 1 duplicate, 1 malformed_line, 1 missing_view"],
            read_synthetic, tmp_path)


def test_vehicleid_collects_malformed_lines_and_missing_images(tmp_path):
    tree = make_vehicleid(tmp_path)
    test_list = tmp_path / "train_test_split" / "test_list_800.txt"
    insert_line(test_list, 1, "0000001")
    insert_line(test_list, 3, "0000001.jpg 12")
    tree.records["train"][2].image.unlink()
    problems = _problems(["3 problems in 2 files: 2 malformed_line, 1 missing_image",
                        "test_list_800.txt:1: got '0000001'", "test_list_800.txt:3: got '0000001.jpg 12'",
                        "train_list.txt:3: image"], read_vehicleid, tmp_path, "800")
    assert _problem_rows(problems) == [("missing_image", "train_list.txt", 3),
                                       ("malformed_line", "test_list_800.txt", 1),
                                       ("malformed_line", "test_list_800.txt", 3)]
    got, skipped = read_dataset_checked("vehicleid", tmp_path, "800", on_error="skip")
    assert skipped == problems
    assert got["train"] == [r for i, r in enumerate(tree.records["train"]) if i != 2]
    assert got["test"] == tree.records["test_800"]


def test_veriwild_collects_camera_and_line_problems(tmp_path):
    tree = make_veriwild(tmp_path)
    lists = tmp_path / "train_test_split"
    gone = tree.records["gallery"][2]
    assert drop_rows(lists / "vehicle_info.txt", gone.key.replace("_", "/") + ";") == 1
    insert_line(lists / "test_3000_query.txt", 2, "00004_000010.jpg")
    problems = _problems(["2 problems in 2 files: 1 malformed_line, 1 missing_camera",
                        "test_3000_query.txt:2: got '00004_000010.jpg'",
                        f"test_3000.txt:3: image {gone.key.replace('_', '/')!r} has no row in"],
                       read_veriwild, tmp_path, "small")
    assert _problem_rows(problems) == [("malformed_line", "test_3000_query.txt", 2),
                                       ("missing_camera", "test_3000.txt", 3)]
    assert (problems[1].split, problems[1].key, problems[1].image) == ("gallery", gone.key, str(gone.image))
    got, skipped = read_dataset_checked("veriwild", tmp_path, "small", on_error="skip")
    assert skipped == problems
    assert got["train"] == tree.records["train"] and got["query"] == tree.records["query"]
    assert got["gallery"] == [r for r in tree.records["gallery"] if r != gone]


def test_veriwild_entry_checks_are_independent(tmp_path):
    """An image both missing and without a camera gets both problems; a camera conflict drops it."""
    tree = make_veriwild(tmp_path)
    info = tmp_path / "train_test_split" / "vehicle_info.txt"
    both, conflicted = tree.records["train"][1], tree.records["train"][4]
    both.image.unlink()
    drop_rows(info, both.key.replace("_", "/") + ";")
    entry = conflicted.key.replace("_", "/")
    edit_lines(info, lambda ls: ls + [f"{entry};{conflicted.camera + 1};t;m;t;c"])
    n = len(info.read_text().splitlines())
    got, problems = read_dataset_checked("veriwild", tmp_path, "small", on_error="skip")
    assert _problem_rows(problems) == [("missing_image", "train_list.txt", 2),
                                       ("missing_camera", "train_list.txt", 2),
                                       ("conflict", "vehicle_info.txt", n)]
    assert [p.key for p in problems] == [both.key, both.key, conflicted.key]
    assert f"disagrees with camera {conflicted.camera}" in problems[2].message
    assert got["train"] == [r for r in tree.records["train"] if r not in (both, conflicted)]
