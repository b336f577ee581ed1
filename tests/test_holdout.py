"""Validation identities: held out of training by the shard stage, given families of their own by the renderer."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import SynthConfig
from pipeline.data.holdout import HoldoutError, hold_out
from pipeline.data.records import Record
from pipeline.data.synthetic.families import identities


def records(cameras: bool) -> dict[str, list[Record]]:
    train = [Record(f"{vid:04d}_c{cam}_{i}", Path(f"{vid}_{cam}_{i}.jpg"), vid, cam if cameras else -1, "train")
             for vid in (3, 5, 8, 9) for cam in (1, 2) for i in range(2)]
    return {"train": train, "query": [Record("q", Path("q.jpg"), 20, 1, "query")]}


def test_top_vids_leave_training_and_split_like_veri():
    out = hold_out(records(cameras=True), 2)
    assert sorted({r.vid for r in out["train"]}) == [3, 5]
    assert {r.vid for r in out["val_gallery"]} == {8, 9} and len(out["val_gallery"]) == 8   # every image
    assert [(r.vid, r.camera) for r in out["val_query"]] == [(8, 1), (8, 2), (9, 1), (9, 2)]  # one per camera
    assert {r.split for r in out["val_query"]} == {"val_query"} and out["query"] == records(True)["query"]
    assert hold_out(records(True), 0) == records(True)


def test_without_cameras_the_query_is_not_also_in_the_gallery():
    out = hold_out(records(cameras=False), 1)
    query, gallery = out["val_query"], out["val_gallery"]
    assert [r.vid for r in query] == [9] and len(gallery) == 3
    assert not {r.key for r in query} & {r.key for r in gallery}


def test_too_many_validation_ids_is_a_clear_error():
    with pytest.raises(HoldoutError, match="data.val_ids: got 3, .* 4 identities; expected at most 2"):
        hold_out(records(True), 3)


def test_no_family_straddles_training_and_validation_identities():
    cfg = SynthConfig(train_ids=40, test_ids=10, family_size=(4, 6))
    people = identities(cfg, seed=1, val_ids=11)
    val = {p.vid for p in people if p.vid > 29 and p.vid <= 40}
    assert len(val) == 11
    for family in {p.family for p in people}:
        members = {p.vid for p in people if p.family == family}
        assert members <= val or not members & val, f"family {family} straddles the holdout"
    # the test identities do not change when only the validation count changes (family numbers shift)
    def test_look(ps):
        return [(p.vid, p.first_vid, p.body, p.marks) for p in ps if p.split == "test"]
    assert test_look(people) == test_look(identities(cfg, seed=1, val_ids=5))
