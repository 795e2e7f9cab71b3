"""Bad input: one clear line on stderr, exit code 2, nothing overwritten."""

import json
import os

import pytest
from typer.testing import CliRunner

from forgetlab.cli.main import app


def invoke(*args, tmp_path):
    env = {"FORGETLAB_CACHE": str(tmp_path / "cache")}
    return CliRunner().invoke(app, ["biography", *args], env=env)


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("forgetlab: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'; choose one of: smoke, cpu-demo, gpu, paper"),
    (["--method", "lamol"], "method='lamol' is unknown"),
    (["--method", "ewc", "--ewc-strength", "-1"], "method=ewc needs --ewc-strength > 0"),
    (["--method", "ewc", "--ewc-strength", "0"], "method=ewc needs --ewc-strength > 0"),  # an explicit 0 is not 1e4
    (["--method", "ewc", "--ewc-strength", "nan"], "method=ewc needs --ewc-strength > 0"),
    (["--method", "ewc", "--ewc-strength", "inf"], "method=ewc needs --ewc-strength > 0"),
    (["--method", "freeze", "--freeze-layers", "9"], "--freeze-layers 9 is outside 0..2"),
    (["--replay", "-0.5"], "--replay -0.5 must be a fraction"),
    (["--early-stop", "3"], "--early-stop 3.0 must be an accuracy"),
    (["--resume", "--overwrite"], "contradict"),
    (["--set", "task.lr=fast"], "--set task.lr: expected a value like"),
    (["--set", "world.n_pretrain_people=-5"], "n_pretrain_people=-5"),
    (["--method", "ewc", "--freeze-layers", "1"], "--freeze-layers 1 needs --method freeze (method ewc freezes nothing)"),
    (["--set", "task.min_lr_ratio=-1"], "task.min_lr_ratio=-1.0 must be in [0, 1]"),
    (["--set", "pretrain.weight_decay=-0.1"], "pretrain.weight_decay=-0.1 must not be negative"),
    (["--set", "task.grad_clip=-1"], "task.grad_clip=-1.0 must not be negative"),
    (["--set", "world.n_new_tasks=0"], "world.n_new_tasks=0: a run learns at least one new task"),
    (["--set", "world.n_pretrain_people=3", "--set", "world.task0_train_fraction=0.34"],
     "task 0 has 1 training person; recovery re-aligns on half of them"),
    (["--set", "task.weight_decay=NaN"], "--set task.weight_decay: nan is not a finite number; give a finite value"),
    (["--set", "task.epochs=Infinity"], "--set task.epochs: inf is not a finite number; give a finite value"),
    (["--set", "model.d_ff=-1"], "model.d_ff=-1 must not be negative (0 gives the architecture's default width)"),
    (["--set", "model.n_heads=3"], "model.d_model=64 is not divisible by n_heads=3; change one of them"),
])
def test_bad_options(args, message, tmp_path):
    preset = [] if "--preset" in args else ["--preset", "smoke"]
    result = invoke("run", *preset, *args, "--out", str(tmp_path / "run"), tmp_path=tmp_path)
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists()  # nothing half-written: the corrected command can use the same --out


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"keep": 1}')
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(run), tmp_path=tmp_path))
    assert "already exists; pass --resume to continue it or --overwrite to replace it" in line
    assert json.loads((run / "results.json").read_text()) == {"keep": 1}


def test_resume_with_a_different_config_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "smoke", "seed": 5}))
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(run), "--resume", tmp_path=tmp_path))
    assert "different config" in line and "seed" in line
    assert json.loads((run / "config.json").read_text()) == {"preset": "smoke", "seed": 5}


def test_resume_without_a_run(tmp_path):
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(tmp_path / "none"), "--resume", tmp_path=tmp_path))
    assert "no run to resume" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(locked / "run"), tmp_path=tmp_path))
    assert "cannot write" in line


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(f), tmp_path=tmp_path))
    assert "is a file" in line


def test_recover_needs_a_checkpoint(tmp_path):
    line = one_error_line(invoke("recover", "--model", str(tmp_path), "--run", str(tmp_path), tmp_path=tmp_path))
    assert "not a Hugging Face checkpoint directory" in line


def test_output_under_a_file_is_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(f / "run"), tmp_path=tmp_path))
    assert "cannot write to --out" in line


def test_only_a_command_that_succeeds_leaves_the_process_group(tmp_path, monkeypatch):
    """Under torchrun a finished ``biography`` command takes the process group down itself (left to the interpreter's
    exit, gloo's threads can abort a finished run); a failed one does not (its peers may be stuck in a collective)."""
    from forgetlab.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "leave", lambda: calls.append("leave"))
    one_error_line(invoke("run", "--preset", "huge", "--out", str(tmp_path / "run"), tmp_path=tmp_path))
    assert calls == []
    assert invoke("generate", "--preset", "smoke", "--out", str(tmp_path / "world"), tmp_path=tmp_path).exit_code == 0
    assert calls == ["leave"]


THETAS = ["--theta0", "t0", "--theta1", "t1", "--theta2", "t2"]


def any_command(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_command_refuses_an_out_that_is_a_file_before_any_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for args in (["fv", "extract", "--model", tmp_path / "none", "--task", "t", "--out", f],
                 ["analyze", "angles", "--a1", tmp_path, "--a2", tmp_path, "--b1", tmp_path, "--b2", tmp_path, "--out", f],
                 ["aggregate", tmp_path, "--out", f],
                 ["biography", "generate", "--preset", "smoke", "--out", f]):
        assert "--out " + str(f) + " is a file; give a directory" in one_error_line(any_command(*args)), args
    assert f.read_text() == "x"


def test_broken_checkpoints_get_one_line_before_anything_is_written(tiny_llama_dir, tmp_path):
    import shutil

    no_weights, bad_config = tmp_path / "no_weights", tmp_path / "bad_config"
    for broken in (no_weights, bad_config, tmp_path / "swapped.old"):  # swapped: a save killed between renames
        shutil.copytree(tiny_llama_dir, broken)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    (bad_config / "config.json").write_text("{not json")
    task = tmp_path / "antonym.json"
    task.write_text(json.dumps([{"input": f"w{i}", "output": f"v{i}"} for i in range(30)]))
    for args, message in (
            (["analyze", "features", "--checkpoint", tmp_path / "empty", "--checkpoint", no_weights, "--prompts",
              tmp_path / "p.jsonl", "--out", tmp_path / "f"], "is not a Hugging Face checkpoint directory"),
            (["analyze", "angles", "--a1", no_weights, "--a2", no_weights, "--b1", no_weights, "--b2", no_weights,
              "--out", tmp_path / "a"], f"checkpoint {no_weights} has no weights"),
            (["fv", "extract", "--model", bad_config, "--task", task, "--out", tmp_path / "x"],
             f"--model {bad_config}: config.json cannot be read"),
            (["fv", "extract", "--model", tmp_path / "swapped", "--task", task, "--out", tmp_path / "x"],
             f"a save killed while replacing it left the previous copy in {tmp_path / 'swapped.old'}"),
            (["fv", "extract", "--model", tiny_llama_dir, "--task", task, "--device", "bogus", "--out", tmp_path / "x"],
             "--device bogus is unknown"),
            (["fv", "extract", "--model", tiny_llama_dir, "--task", task, "--device", "cuda:5", "--out", tmp_path / "x"],
             "--device cuda:5: this machine has")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert message in one_error_line(any_command(*args)), args
    for name in ("f", "a", "x"):
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("args, message", [
    (["cit", "run", "--world", "{tmp}/world", "--epochs", "nan"], "train.epochs=nan is not a finite number"),
    (["cit", "run", "--world", "{tmp}/world", "--lr", "inf"], "train.lr=inf is not a finite number"),
    (["cit", "run", "--world", "{tmp}/world", "--set", "train.lr=NaN"], "--set train.lr: nan is not a finite number"),
    (["cit", "compare", "{tmp}/base", "{tmp}/run", "--fp-tolerance", "nan"],
     "--fp-tolerance nan: points of FP a run may lose, a finite 0 or more (the target: 5)"),
    (["cit", "compare", "{tmp}/base", "{tmp}/run", "--fp-tolerance", "inf"], "--fp-tolerance inf: points of FP"),
    (["cit", "compare", "{tmp}/base", "{tmp}/run", "--keep", "nan"], "--keep nan: a share of the drop, in (0, 1]"),
    (["analyze", "landscape", *THETAS, "--data", "a=a.jsonl", "--alpha-range", "-inf,7"],
     "--alpha-range '-inf,7': -inf is not a finite number; expected LOW,HIGH such as -1,7, or auto"),
    (["analyze", "landscape", *THETAS, "--data", "a=a.jsonl", "--beta-range", "-1,nan"],
     "--beta-range '-1,nan': nan is not a finite number"),
    (["analyze", "landscape", *THETAS, "--data", "a=a.jsonl", "--data", "b=b.jsonl", "--data", "a=c.jsonl"],
     "--data 'a=c.jsonl': the task name 'a' is given twice; name each task once"),
    (["fv", "evaluate", "--model", "{tmp}/m", "--task", "{tmp}/t.json", "--fv", "{tmp}/fv", "--alpha", "nan"],
     "--alpha nan is not a finite number; give a scale such as 1 (negative subtracts the vector)"),
    (["fv", "evaluate", "--model", "{tmp}/m", "--task", "{tmp}/t.json", "--fv", "{tmp}/fv", "--alpha", "-inf"],
     "--alpha -inf is not a finite number"),
])
def test_numbers_that_are_not_finite_and_repeated_names_are_refused_before_anything_is_written(args, message, tmp_path):
    """``float()`` reads nan and inf from the command line, and NaN passes every ``x < 0``: one line, exit 2, and no
    --out made."""
    out = tmp_path / "out"
    line = one_error_line(any_command(*[a.format(tmp=tmp_path) for a in args], "--out", out))
    assert message in line
    assert not out.exists()


@pytest.mark.parametrize("setting", ["replay", "ewc_strength", "lwf_strength", "lwf_temperature", "olora_strength",
                                     "lora_dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_cit_settings_that_are_not_finite_are_refused_through_the_python_api(setting, value):
    """``--set`` stops them at the parser; a config built in Python meets the same refusal in ``validate``."""
    from forgetlab.experiments.cit import CITConfig

    with pytest.raises(ValueError) as err:
        CITConfig(world_dir="world", **{setting: value}).validate()
    assert str(err.value) == f"{setting}={value} is not a finite number; give a finite value"


def test_a_corrupt_results_file_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{oops")
    line = one_error_line(any_command("aggregate", tmp_path / "run", "--out", tmp_path / "agg"))
    assert f"{tmp_path / 'run' / 'results.json'} is not valid JSON" in line


def test_settings_that_cannot_work_are_refused():
    from forgetlab.analysis.fv_drift import DriftSettings
    from forgetlab.fv.evaluate import FVEvalSettings

    for bad, message in (({"n_prompts": 0}, "n_prompts=0 must be at least 1"), ({"batch_size": 0}, "batch_size=0"),
                         ({"shots": -1}, "shots=-1 must be at least 1")):
        with pytest.raises(ValueError, match=message):
            FVEvalSettings(**bad).validate()
    with pytest.raises(ValueError, match="eval_prompts=-1 must be at least 1"):
        DriftSettings(eval_prompts=-1).validate()


@pytest.mark.parametrize("args, message", [
    (["fv", "universal", "--out", "x"], "Missing argument 'fv_dirs'. (see `forgetlab fv universal --help`)"),
    (["biography", "run", "--bogus"], "No such option: --bogus"),
    (["fv", "extract", "--model", "m", "--task", "t", "--out", "o", "--top-k", "abc"], "Invalid value for '--top-k'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_usage_errors_of_the_console_command_are_one_line(args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "forgetlab", *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("forgetlab: error: "), proc.stderr
    assert message in lines[0]
    if args == ["nonsense"]:  # help still shows as usual
        help_ = subprocess.run([sys.executable, "-m", "forgetlab", "fv", "--help"], capture_output=True, text=True)
        assert help_.returncode == 0 and "extract" in help_.stdout


@pytest.mark.parametrize("command, shown", [
    (["cit", "run"], ["[default: the world's model]", "[default: the ICL world's general tasks]"]),
    (["biography", "run"], ["[default: $FORGETLAB_CACHE or ~/.cache/forgetlab]", "(default with --method ewc: 1e4)",
                            "default with --method freeze: 2)"]),
    (["biography", "recover"], ["[default: the model dir's run]"]),
    (["analyze", "landscape"], ["[default: theta0, theta1, theta2]"]),
    (["fv", "evaluate"], ["[default: best of the sweep]"]),
])
def test_help_shows_the_defaults_written_in_brackets(command, shown, monkeypatch):
    """Rich markup reads "[...]" as a style tag and drops it unless escaped: every such default must reach the screen."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option, so no default is cut by wrapping
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for default in shown:
        assert default in text, default


def test_out_that_is_a_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep")
    line = one_error_line(invoke("run", "--preset", "smoke", "--out", str(out), tmp_path=tmp_path))
    assert f"--out {out} is a file; give a directory" in line
    assert out.read_text() == "keep"
    from forgetlab.experiments.rundir import prepare_run_dir  # the Python API refuses it the same way

    with pytest.raises(ValueError, match="is a file, not a directory"):
        prepare_run_dir(out, {"seed": 0}, resume=False, overwrite=True)
    assert out.read_text() == "keep"
