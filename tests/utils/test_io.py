import json

import pytest

from forgetlab.experiments.config import BiographyRunConfig
from forgetlab.experiments.presets import preset_config
from forgetlab.utils.io import apply_overrides, atomic_write_json, config_hash, from_jsonable, to_jsonable


def test_overrides_replace_nested_fields_with_type_checks():
    cfg = preset_config("smoke")
    new = apply_overrides(cfg, ["world.full_name=false", "task.lr=1e-4", "task.max_steps=7", "world.n_majors=12"])
    assert new.world.full_name is False and new.task.lr == 1e-4 and new.task.max_steps == 7
    assert new.world.n_majors == 12 and cfg.world.full_name is True
    for bad, msg in [("task.lr=fast", "expected a value like"), ("world.nope=1", "no setting 'nope'"),
                     ("task=3", "group of settings"), ("task.lr", "KEY=VALUE"), ("task.max_steps=1.5", "whole number")]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(cfg, [bad])


def test_list_settings_take_json_or_the_shell_form():
    from forgetlab.experiments.cit import CITConfig
    from forgetlab.experiments.icl_world import preset_config as icl_preset

    cit = CITConfig()
    for raw in ('["c_attn","c_proj"]', "[c_attn,c_proj]", "c_attn, c_proj"):
        assert apply_overrides(cit, [f"lora_targets={raw}"]).lora_targets == ("c_attn", "c_proj")
    assert apply_overrides(cit, ["lora_targets=query_key_value"]).lora_targets == ("query_key_value",)
    assert apply_overrides(icl_preset("smoke"), ["fv_alphas=[1,2.5]"]).fv_alphas == (1.0, 2.5)
    assert apply_overrides(preset_config("smoke"), ["snapshot_steps=50,100"]).snapshot_steps == (50, 100)
    for bad in ("lora_targets=[]", "lora_targets=[1,2]"):
        with pytest.raises(ValueError, match="expected a list like"):
            apply_overrides(cit, [bad])


def test_config_round_trip_and_hash(tmp_path):
    cfg = preset_config("cpu-demo", seed=3)
    atomic_write_json(tmp_path / "c.json", cfg)
    back = from_jsonable(BiographyRunConfig, json.loads((tmp_path / "c.json").read_text()))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg) != config_hash(preset_config("cpu-demo", seed=4))
    assert list(tmp_path.iterdir()) == [tmp_path / "c.json"]  # no temporary file left behind
    assert to_jsonable(cfg)["world"]["seed"] == 3


def test_atomic_writes_give_ordinary_file_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        # the same mode as a file opened the ordinary way, not mkstemp's private 0600
        (tmp_path / "plain.txt").write_text("x")
        assert (tmp_path / "results.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}


def test_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
    """Cache keys name the code as well as the config: editing a module (one byte) changes the fingerprint,
    the same source gives the same one, and the module order counts (it is part of what was hashed)."""
    import importlib

    from forgetlab.utils.io import code_fingerprint

    for name in ("fp_a", "fp_b"):
        (tmp_path / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    first = code_fingerprint("fp_a", "fp_b")
    assert code_fingerprint("fp_a", "fp_b") == first != code_fingerprint("fp_b", "fp_a")
    (tmp_path / "fp_b.py").write_text("X = 2\n")
    assert code_fingerprint("fp_a", "fp_b") != first
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        code_fingerprint("no_such_module")


def test_text_settings_take_the_text_as_written_and_numpy_scalars_become_json():
    import numpy as np

    from forgetlab.experiments.cit import CITConfig

    cit = CITConfig()
    assert apply_overrides(cit, ["sequence=1"]).sequence == "1"  # a world sequence index is text
    assert apply_overrides(cit, ["template=true", 'answer_end="eos"']).template == "true"
    assert apply_overrides(cit, ['answer_end="eos"']).answer_end == "eos"
    with pytest.raises(ValueError, match="single setting, not a group"):
        apply_overrides(cit, ["seed.x=1"])
    values = to_jsonable({"a": np.float32(1.5), "b": np.float32("nan"), "c": np.int64(3)})
    assert json.loads(json.dumps(values)) == {"a": 1.5, "b": None, "c": 3}


def test_set_values_are_coerced_to_the_setting_type_or_refused():
    """By hand: ``lr=1`` is the float 1.0 (and hashes as the config with 1.0 does), a text value keeps every ``=``
    after the first, a list setting takes one bare number, and a bool and a number never stand in for each other."""
    cfg = preset_config("smoke")
    one = apply_overrides(cfg, ["task.lr=1"])
    assert type(one.task.lr) is float and one.task.lr == 1.0
    assert config_hash(one) == config_hash(apply_overrides(cfg, ["task.lr=1.0"]))
    assert apply_overrides(cfg, ["model.checkpoint=/runs/a=b/model"]).model.checkpoint == "/runs/a=b/model"
    assert apply_overrides(cfg, ["snapshot_steps=50"]).snapshot_steps == (50,)
    for bad in ("task.max_steps=true", "world.full_name=1", "task.lr=false"):
        with pytest.raises(ValueError, match="expected a value like"):
            apply_overrides(cfg, [bad])


@pytest.mark.parametrize("item, shown", [
    ("task.weight_decay=NaN", "nan"), ("task.epochs=Infinity", "inf"), ("task.lr=-Infinity", "-inf"),
    ("task.lr=1e999", "inf"),  # JSON's parser reads an overflowing number as infinity
    ("task.max_steps=Infinity", "inf"), ("snapshot_steps=[50,NaN]", "nan"),
])
def test_set_refuses_numbers_that_are_not_finite_naming_the_key(item, shown):
    """``json.loads`` takes NaN and Infinity, and NaN passes every ``x < 0`` check after it: the parser stops them."""
    key = item.split("=")[0]
    with pytest.raises(ValueError) as err:
        apply_overrides(preset_config("smoke"), [item])
    assert str(err.value) == f"--set {key}: {shown} is not a finite number; give a finite value"


def test_a_text_setting_keeps_nan_as_text():
    from forgetlab.experiments.cit import CITConfig

    assert apply_overrides(CITConfig(), ["sequence=NaN"]).sequence == "NaN"


def test_json_round_trip_keeps_tuples_refuses_unknown_keys_and_nulls_infinities():
    cfg = apply_overrides(preset_config("smoke"), ["snapshot_steps=3,5"])
    back = from_jsonable(BiographyRunConfig, json.loads(json.dumps(to_jsonable(cfg))))
    assert back.snapshot_steps == (3, 5) and type(back.snapshot_steps) is tuple and back == cfg
    data = to_jsonable(cfg)
    data["task"]["lrr"] = 0.1  # a typo in a hand-edited config.json
    with pytest.raises(ValueError, match=r"unknown keys \['lrr'\]"):
        from_jsonable(BiographyRunConfig, data)
    assert to_jsonable({"a": float("inf"), "b": -float("inf"), "c": [float("nan"), 2.5]}) == {"a": None, "b": None,
                                                                                              "c": [None, 2.5]}
