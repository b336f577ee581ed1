"""params.yaml -> typed config: the real file loads, bad input names the key, value and rule."""
import dataclasses
from pathlib import Path

import pytest

from pipeline.config import ConfigError, Params, load_params, params_from_dict
from pipeline.constants import VARIANT_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


def test_real_params_file_loads_into_frozen_sections():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "synthetic"
    assert params.synth.cameras_per_id == (3, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.synth.train_ids = 1  # frozen


def test_every_key_of_params_yaml_is_in_the_schema_and_round_trips():
    import yaml
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = params_from_dict(raw)
    resolved = params.to_dict()
    # null method keys come back as the variant's values; everything else as written
    for key in ("mask_pool", "local_neck", "vis_offset", "part_distance"):
        assert raw["reid"][key] is None and resolved["reid"][key] == VARIANT_DEFAULTS["paper"][key]
        resolved["reid"][key] = None
    for key in ("normalize_local", "w_center"):
        assert raw["reid"]["loss"][key] is None and resolved["reid"]["loss"][key] == VARIANT_DEFAULTS["paper"][key]
        resolved["reid"]["loss"][key] = None
    assert resolved == raw


def test_the_variant_sets_the_method_keys_left_null_and_each_can_be_overridden():
    official = load_params(ROOT / "params.yaml", ["reid.variant=official"]).reid
    assert (official.mask_pool, official.local_neck, official.vis_offset, official.part_distance,
            official.loss.normalize_local, official.loss.w_center) == ("nearest", True, 1.0, "sqrt_euclidean",
                                                                      True, 5e-4)
    mixed = load_params(ROOT / "params.yaml", ["reid.variant=official", "reid.local_neck=false",
                                               "reid.loss.w_center=0"]).reid
    assert (mixed.local_neck, mixed.loss.w_center, mixed.mask_pool) == (False, 0.0, "nearest")
    paper = load_params(ROOT / "params.yaml", ["reid.part_distance=sqrt_euclidean"]).reid
    assert (paper.part_distance, paper.local_neck, paper.vis_offset) == ("sqrt_euclidean", False, 0.0)


def test_dotted_overrides_are_parsed_as_yaml_and_validated():
    params = load_params(ROOT / "params.yaml", ["synth.train_ids=7", "data.val_ids=0", "shard.resize=[64, 96]",
                                                "synth.label_fraction=1"])
    assert params.synth.train_ids == 7
    assert params.shard.resize == (64, 96)
    assert params.synth.label_fraction == 1.0 and isinstance(params.synth.label_fraction, float)


@pytest.mark.parametrize("override, needle", [
    ("data.val_ids=179", "data.val_ids: got 179, but synth.train_ids=180 leaves fewer than 2 training identities"),
    ("synth.train_idz=3", "synth.train_idz: unknown key"),
    ("synth.train_ids=many", "synth.train_ids: got 'many' (str), expected int"),
    ("synth.train_ids=true", "synth.train_ids: got True (bool), expected int"),
    ("synth.label_fraction=1.5", "synth.label_fraction: got 1.5, expected a value >= 0.0 and <= 1.0"),
    ("synth.cameras_per_id=[3]", "synth.cameras_per_id: got [3], expected a list of 2"),
    ("synth.cameras_per_id=[4, 2]", "synth.cameras_per_id: got [4, 2], expected [min, max]"),
    ("parser.scale=[1.2, 0.8]", "parser.scale: got [1.2, 0.8], expected [min, max] with min <= max"),
    ("data.source=market", "data.source: got 'market', expected one of 'synthetic'"),
    ("shard.resize=[0, 64]", "shard.resize: got (0, 64), expected a value >= 8"),
    ("data.root=/elsewhere", "data.root: got '/elsewhere'; with data.source 'synthetic'"),
    ("data=3", "data: expected a mapping, got 3"),
])
def test_bad_values_name_key_value_and_rule(override, needle):
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert needle in str(err.value)
    assert "params.yaml" in str(err.value)


def test_real_dataset_needs_its_test_subset():
    with pytest.raises(ConfigError, match="data.test_subset: got None, expected one of large, medium, small"):
        load_params(ROOT / "params.yaml", ["data.source=veriwild", "data.root=/d/VERI-Wild"])
    params = load_params(ROOT / "params.yaml", ["data.source=vehicleid", "data.root=/d/VehicleID",
                                                "data.test_subset=800"])
    assert params.data.test_subset == "800"


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_params(ROOT / "params.yaml", ["synth.train_ids"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_digest_changes_only_with_the_sections_it_covers():
    a = load_params(ROOT / "params.yaml")
    b = load_params(ROOT / "params.yaml", ["shard.samples_per_shard=7"])
    assert a.digest("synth") == b.digest("synth")
    assert a.digest("shard") != b.digest("shard")


def test_paper_preset_applies_and_explicit_overrides_still_win():
    params = load_params(ROOT / "params.yaml", ["preset=paper", "reid.P=4"])
    assert params.parser.encoder == "se_resnext50_32x4d" and params.reid.backbone == "resnet50"
    assert params.reid.image_size == (256, 256)
    assert params.reid.P == 4
    # the authors' recipe: 120 full epochs, 10 warm-up epochs, x 0.1 at 40 and 70, local weights
    reid = params.reid
    assert (reid.epochs, reid.batches_per_epoch, reid.warmup_epochs, reid.schedule, reid.milestones, reid.gamma) == (
        120, None, 10, "multistep", (40, 70), 0.1)
    assert reid.pretrained == "weights/resnet50-imagenet.pt"
    assert params.parser.encoder_weights == "weights/se_resnext50_32x4d-imagenet.pt"
    assert (params.parser.image_size, params.parser.epochs, params.parser.batch_size) == (256, 40, 8)
    from pipeline.reid.train import steps_per_epoch
    assert steps_per_epoch(reid, 37778, world_size=1) == 37778 // (4 * 4)    # one pass (P overridden to 4)
    assert steps_per_epoch(reid, 37778, world_size=8) == 37778 // (4 * 4 * 8)
    with pytest.raises(ConfigError, match="preset: got 'fast', expected null or one of 'paper'"):
        load_params(ROOT / "params.yaml", ["preset=fast"])


def test_nested_loss_weights_override_like_a_sweep_would():
    params = load_params(ROOT / "params.yaml", ["reid.loss.w_ltri=0.5"])
    assert params.reid.loss.w_ltri == 0.5
    with pytest.raises(ConfigError, match="reid.loss.w_ltri: got -1.0, expected a value >= 0.0"):
        load_params(ROOT / "params.yaml", ["reid.loss.w_ltri=-1"])
