"""The run directory's guards against losing work, called as the commands call them."""

import json

import pytest

from forgetlab.experiments.rundir import prepare_run_dir


def test_overwrite_replaces_a_run_but_never_a_folder_that_is_not_one(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, {"seed": 0}, resume=False, overwrite=False, log=lambda s: None)
    (run / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        prepare_run_dir(run, {"seed": 1}, resume=False, overwrite=False, log=lambda s: None)
    prepare_run_dir(run, {"seed": 1}, resume=False, overwrite=True, log=lambda s: None)
    assert json.loads((run / "config.json").read_text()) == {"seed": 1} and not (run / "results.json").exists()

    data = tmp_path / "data"  # a folder of the user's that happens to be named as --out
    data.mkdir()
    (data / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files but no config.json, so it is not a forgetlab run"):
        prepare_run_dir(data, {"seed": 0}, resume=False, overwrite=True, log=lambda s: None)
    assert (data / "thesis.tex").read_text() == "keep me" and sorted(p.name for p in data.iterdir()) == ["thesis.tex"]

    empty = tmp_path / "empty"  # an empty folder is simply used
    empty.mkdir()
    prepare_run_dir(empty, {"seed": 0}, resume=False, overwrite=True, log=lambda s: None)
    assert (empty / "config.json").is_file()


def test_a_run_started_before_a_setting_existed_resumes_when_it_keeps_its_default(tmp_path):
    """A config.json written before forgetlab gained a setting lacks its key: the run resumes under the setting's
    default, and is refused under any other value, as a changed setting is."""
    from dataclasses import replace

    from forgetlab.experiments.cit import CITConfig

    cfg, run = CITConfig(world_dir="w"), tmp_path / "run"
    prepare_run_dir(run, cfg, resume=False, overwrite=False, log=lambda s: None)
    saved = json.loads((run / "config.json").read_text())
    del saved["checkpoint_format"]  # as an older forgetlab wrote it
    (run / "config.json").write_text(json.dumps(saved))
    prepare_run_dir(run, cfg, resume=True, overwrite=False, log=lambda s: None)
    with pytest.raises(ValueError, match="checkpoint_format: 'merged' then, 'adapter' now; method: 'seq' then, 'lora' now"):
        prepare_run_dir(run, replace(cfg, checkpoint_format="adapter", method="lora"), resume=True, overwrite=False,
                        log=lambda s: None)
    with pytest.raises(ValueError, match=r"\(seed: 0 then, 1 now\); use the same options"):
        prepare_run_dir(run, replace(cfg, seed=1), resume=True, overwrite=False, log=lambda s: None)


def test_a_resume_names_the_nested_setting_that_changed_and_another_commands_run(tmp_path):
    from dataclasses import replace

    from forgetlab.experiments.cit import CITConfig
    from forgetlab.experiments.rundir import config_differences

    cfg, run = CITConfig(world_dir="w"), tmp_path / "run"
    prepare_run_dir(run, cfg, resume=False, overwrite=False, log=lambda s: None)
    with pytest.raises(ValueError, match=r"\(train.epochs: 10 then, 3.0 now\)"):
        prepare_run_dir(run, replace(cfg, train=replace(cfg.train, epochs=3.0)), resume=True, overwrite=False,
                        log=lambda s: None)
    assert config_differences({"a": 1, "t": {"x": 1, "y": 2}}, {"a": 1, "t": {"x": 1, "y": 3}, "b": 0}) == [
        ("b", None, 0), ("t.y", 2, 3)]
    (run / "config.json").write_text(json.dumps({"preset": "cpu-demo", "world": {}, "pretrain": {}, "phases": []}))
    with pytest.raises(ValueError, match="holds a run of another command .its config.json has other settings.; give this one"):
        prepare_run_dir(run, cfg, resume=True, overwrite=False, log=lambda s: None)
