"""Dataset readers against tiny trees written in each release's exact layout."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sources import (
    DatasetError,
    read_dataset,
    read_synthetic,
    read_vehicleid,
    read_veri776,
    read_veri776_index,
    read_veriwild,
)
from tests.fixtures_datasets import make_vehicleid, make_veri776, make_veriwild


def _edit_lines(path: Path, edit) -> None:
    """Rewrite a list file through ``edit(lines) -> lines``."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def _raises(match_parts: list[str], fn, *args, **kwargs) -> str:
    """Call fn, expect a DatasetError whose message contains every part; return it."""
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


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
    _edit_lines(tmp_path / "jk_index.txt", lambda ls: [ls[0], f"1 {n_gallery + 1}"] + ls[2:])
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
    _edit_lines(tmp_path / "name_train.txt", lambda ls: ls[:2] + [bad] + ls[2:])
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
    _edit_lines(tmp_path / "name_query.txt", lambda ls: ls + [ls[1]])
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
    _edit_lines(tmp_path / "train_test_split" / "test_list_800.txt", lambda ls: [bad] + ls)
    _raises(["test_list_800.txt:1", repr(bad), expect], read_vehicleid, tmp_path, "800")


def test_vehicleid_missing_image_and_duplicate(tmp_path):
    tree = make_vehicleid(tmp_path)
    path = tmp_path / "train_test_split" / "train_list.txt"
    _edit_lines(path, lambda ls: ls + [ls[0]])
    n = len(path.read_text().splitlines())
    _raises([f"train_list.txt:{n}", "duplicate key", repr(tree.records["train"][0].key)],
            read_vehicleid, tmp_path, "800")
    _edit_lines(path, lambda ls: ls[:-1])
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
    _edit_lines(info, lambda ls: ["id/image;Camera;Time;Model;Type;Color"] + ls[1:])
    _raises(["vehicle_info.txt:1", "'id/image;Camera;Time;Model;Type;Color'",
             "'id/image;Camera ID;Time;Model;Type;Color'"], read_veriwild, tmp_path, "small")


def test_veriwild_image_missing_from_vehicle_info(tmp_path):
    tree = make_veriwild(tmp_path)
    gone = tree.records["gallery"][2].key.replace("_", "/")
    info = tmp_path / "train_test_split" / "vehicle_info.txt"
    _edit_lines(info, lambda ls: [line for line in ls if not line.startswith(gone + ";")])
    _raises(["test_3000.txt:3", repr(gone), "vehicle_info.txt"], read_veriwild, tmp_path, "small")


def test_veriwild_bad_camera_in_vehicle_info(tmp_path):
    tree = make_veriwild(tmp_path)
    entry = tree.records["train"][0].key.replace("_", "/")
    info = tmp_path / "train_test_split" / "vehicle_info.txt"
    _edit_lines(info, lambda ls: [ls[0], f"{entry};cam7;t;m;t;c"] + ls[2:])
    _raises(["vehicle_info.txt:2", "cam7", "integer camera id"], read_veriwild, tmp_path, "small")


@pytest.mark.parametrize("bad", ["00001_000001", "00001/000001.jpg", "1/2/3"])
def test_veriwild_malformed_line(tmp_path, bad):
    make_veriwild(tmp_path)
    _edit_lines(tmp_path / "train_test_split" / "test_3000_query.txt", lambda ls: ls[:1] + [bad])
    _raises(["test_3000_query.txt:2", repr(bad), "'<vid>/<imgid>'"], read_veriwild,
            tmp_path, "small")


def test_veriwild_missing_image(tmp_path):
    tree = make_veriwild(tmp_path)
    tree.records["query"][1].image.unlink()
    _raises(["test_3000_query.txt:2", str(tree.records["query"][1].image), "does not exist"],
            read_veriwild, tmp_path, "small")
