"""``forgetlab biography generate`` into a folder that holds files, and options of ``run`` and ``analyze`` that cannot
work: one clear line on stderr, exit code 2, nothing written or overwritten."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from forgetlab.cli.main import app


def invoke(*args, tmp_path):
    env = {"FORGETLAB_CACHE": str(tmp_path / "cache")}
    return CliRunner().invoke(app, ["biography", *map(str, args)], env=env)


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("forgetlab: error: "), result.stderr
    return lines[0]


def world_seed(folder) -> int:
    return json.loads((folder / "world.json").read_text())["config"]["seed"]


def test_generate_does_not_mix_two_worlds_in_one_folder(tmp_path, monkeypatch):
    """Another seed into the same --out is refused unless --overwrite; with it the folder holds the new world alone
    (no file of the old one, such as a task the new world lacks). A generation that fails part-way leaves the world
    that was there as it was."""
    out = tmp_path / "w"
    result = invoke("generate", "--preset", "smoke", "--out", out, "--seed", 0, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert names == {"world.json", "pretrain.txt", "qa_task0_train.jsonl", "qa_task0_test.jsonl", "qa_task1.jsonl",
                     "tokenizer"} and world_seed(out) == 0
    (out / "qa_task2.jsonl").write_text('{"prompt": "from a world with two new tasks", "answer": "x"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    line = one_error_line(invoke("generate", "--preset", "smoke", "--out", out, "--seed", 1, tmp_path=tmp_path))
    assert f"--out {out} already holds files; pass --overwrite to replace them with this world" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    def disk_full(words):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("forgetlab.models.tokenizers.build_word_tokenizer", disk_full)
    line = one_error_line(invoke("generate", "--preset", "smoke", "--out", out, "--seed", 1, "--overwrite",
                                 tmp_path=tmp_path))
    assert "No space left on device" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old world, whole
    monkeypatch.undo()

    result = invoke("generate", "--preset", "smoke", "--out", out, "--seed", 1, "--overwrite", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == names and world_seed(out) == 1
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no .tmp or .old folder left beside it


def test_generate_overwrites_only_a_world(tmp_path):
    """--overwrite replaces a generated world, never a folder of other files that happens to be the --out."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(invoke("generate", "--preset", "smoke", "--out", out, "--overwrite", tmp_path=tmp_path))
    assert f"--overwrite: {out} holds files but no world.json, so it is not a generated world" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("generate", "--preset", "smoke", "--out", empty, tmp_path=tmp_path)  # an empty folder is fine
    assert result.exit_code == 0, result.output
    assert world_seed(empty) == 0


@pytest.mark.parametrize("steps, message", [
    ("abc", "--snapshot-steps 'abc': expected comma-separated step numbers such as 50,150"),
    ("50,,150", "--snapshot-steps '50,,150': expected comma-separated step numbers"),
    ("1.5", "--snapshot-steps '1.5': expected comma-separated step numbers"),
    ("0", "snapshot_steps=[0] must be positive step numbers"),
    ("50,-5", "snapshot_steps=[50, -5] must be positive step numbers"),
])
def test_run_refuses_snapshot_steps_that_are_not_step_numbers(steps, message, tmp_path):
    result = invoke("run", "--preset", "smoke", "--out", tmp_path / "run", "--snapshot-steps", steps, "--no-progress",
                    tmp_path=tmp_path)
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.fixture
def finished_run(tmp_path, tiny_llama_dir):
    """What `biography analyze` checks before it writes: a config, results.json and checkpoints (a tiny random model
    stands in for each), with task-1 snapshots at steps 2 and 4."""
    from forgetlab.experiments.presets import preset_config
    from forgetlab.utils.io import atomic_write_json

    run = tmp_path / "run"
    atomic_write_json(run / "config.json", preset_config("smoke", 0))
    (run / "results.json").write_text("{}")
    for name in ("pretrain", "task0", "task1", "task1-step-2", "task1-step-4"):
        shutil.copytree(tiny_llama_dir, run / "checkpoints" / name)
    return run


@pytest.mark.parametrize("args, message", [
    (["--plane", "abc"], "--plane 'abc': expected two task-1 snapshot steps A,B such as 100,150"),
    (["--plane", "2,4,6"], "--plane '2,4,6': expected two task-1 snapshot steps A,B"),
    (["--plane", "4,2"], "--plane 4,2: needs two task-1 snapshot steps in increasing order; this run kept 2, 4"),
    (["--plane", "2,3"], "--plane 2,3: needs two task-1 snapshot steps in increasing order; this run kept 2, 4"),
    (["--grid", "21"], "--grid '21': expected AxB such as 41x61"),
    (["--grid", "axb"], "--grid 'axb': expected AxB such as 41x61"),
    (["--grid", "1x5"], "--grid 1x5: need at least 2 points per axis, such as 21x21"),
    (["--grid", "-3x4"], "--grid -3x4: need at least 2 points per axis"),
    (["--energy", "2"], "--energy 2.0 must be in (0, 1]"),
    (["--max-examples", "0"], "--max-examples 0 must be at least 1"),
    (["--landscape-range", "wide"], "--landscape-range 'wide': use paper or auto"),
])
def test_analyze_refuses_options_that_cannot_work_before_it_writes(args, message, finished_run, tmp_path):
    """Before any analysis: a bad grid, energy or example count used to be refused only by the analysis that uses it,
    after the QA files, angles and features were written."""
    result = invoke("analyze", finished_run, *args, "--no-progress", tmp_path=tmp_path)
    assert message in one_error_line(result)
    assert not (finished_run / "analysis").exists()


def test_analyze_from_python_checks_its_options_first_too(finished_run):
    """The checks live in `analyze_biography_run` itself, so a caller from Python gets them before anything is written."""
    from forgetlab.experiments.biography_analysis import analyze_biography_run

    for kwargs, message in (({"grid": (1, 5)}, "--grid 1x5: need at least 2 points"), ({"energy": 0.0}, "--energy 0.0"),
                            ({"max_prompts": 0}, "--max-prompts 0 must be at least 1")):
        with pytest.raises(ValueError, match=message):
            analyze_biography_run(finished_run, log=lambda s: None, **kwargs)
    assert not (finished_run / "analysis").exists()
