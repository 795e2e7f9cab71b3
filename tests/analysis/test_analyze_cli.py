"""The analyze commands end to end on tiny checkpoints with a word-level tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.models.zoo import random_model, tiny_config

WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    tok = build_word_tokenizer(WORDS + ["Q", "A", ":"])
    ckpts = []
    for i in range(3):
        cfg = tiny_config("llama", len(tok), n_layers=2)
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        model = random_model(cfg, seed=i)
        model.save_pretrained(root / f"c{i}")
        tok.save_pretrained(root / f"c{i}")
        ckpts.append(root / f"c{i}")
    rows = [{"prompt": f"Q : w{i} w{(i * 7) % 30}\nA :", "answer": f" w{(i * 3) % 30}"} for i in range(40)]
    for name, part in (("fit", rows[:20]), ("eval", rows[20:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root, ckpts


def run(*args):
    return subprocess.run([sys.executable, "-m", "forgetlab.cli", "analyze", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_landscape_features_and_recovery(setup):
    root, (c0, c1, c2) = setup
    proc = run("landscape", "--theta0", c0, "--theta1", c1, "--theta2", c2, "--data", f"old={root / 'eval.jsonl'}",
               "--data", f"new={root / 'fit.jsonl'}", "--grid", "3x2", "--out", root / "land", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    land = json.loads((root / "land" / "landscape.json").read_text())
    assert len(land["losses"]["old"]) == 2 and len(land["losses"]["old"][0]) == 3
    traj = [(p["alpha"], p["beta"]) for p in land["trajectory"]]
    assert traj[0] == pytest.approx((0, 0), abs=1e-6) and traj[1] == pytest.approx((1, 0), abs=1e-6)
    assert traj[2] == pytest.approx((1, 1), abs=1e-6)  # θ2 = θ0 + d1 + d2 by construction
    assert land["grid_points_per_s"] == pytest.approx(6 / land["grid_seconds"])

    # on the unit square the grid's corners are θ0, θ1 = θ0 + d1 and θ2 = θ0 + d1 + d2: the losses read
    # off the plane must equal those of the checkpoints themselves, loaded and scored on their own
    proc = run("landscape", "--theta0", c0, "--theta1", c1, "--theta2", c2, "--data", f"old={root / 'eval.jsonl'}",
               "--grid", "2x2", "--alpha-range", "0,1", "--beta-range", "0,1", "--out", root / "unit", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    unit = json.loads((root / "unit" / "landscape.json").read_text())
    plane, path = unit["losses"]["old"], [p["losses"]["old"] for p in unit["trajectory"]]
    assert path == pytest.approx([plane[0][0], plane[0][1], plane[1][1]], rel=1e-4)
    assert len(set(round(v, 3) for v in path)) == 3  # three different models, not one loss repeated

    proc = run("features", "--checkpoint", c0, "--checkpoint", c1, "--prompts", root / "eval.jsonl", "--out", root / "feat")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (root / "feat" / "features.csv").read_text().splitlines()
    assert lines[0] == "pair,layer,pc1_angle_deg,mean_shift,shift_vs_pc1_angle_deg" and len(lines) == 1 + 3

    proc = run("recovery", "--checkpoint", c1, "--fit", root / "fit.jsonl", "--eval", root / "eval.jsonl",
               "--before", "0.9", "--out", root / "rec", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((root / "rec" / "recovery.json").read_text())
    assert (root / "rec" / "recovery.png").stat().st_size > 0
    row = rec["rows"][0]
    assert 0 <= row["current"] <= 1 and 0 <= row["recovered"] <= 1 and row["steps"] == 2
    if row["spurious_share"] is not None:
        assert row["spurious_share"] == pytest.approx((row["recovered"] - row["current"]) / (0.9 - row["current"]))


def test_bad_inputs_get_one_line(setup):
    root, (c0, c1, c2) = setup
    same = run("recovery", "--checkpoint", c1, "--fit", root / "eval.jsonl", "--eval", root / "eval.jsonl", "--out", root / "x")
    assert same.returncode == 2 and "share" in same.stderr
    grid = run("landscape", "--theta0", c0, "--theta1", c1, "--theta2", c2, "--data", f"a={root / 'fit.jsonl'}",
               "--grid", "3by3", "--out", root / "x")
    assert grid.returncode == 2 and "--grid" in grid.stderr
    one = run("features", "--checkpoint", c0, "--prompts", root / "eval.jsonl", "--out", root / "x")
    assert one.returncode == 2 and "at least two" in one.stderr
    # a checkpoint of another model (3 layers, not 2): one line naming it, not a broadcasting error
    tok = build_word_tokenizer(WORDS + ["Q", "A", ":"])
    other = root / "other"
    random_model(tiny_config("llama", len(tok), n_layers=3)).save_pretrained(other)
    tok.save_pretrained(other)
    for args in (("landscape", "--theta0", c0, "--theta1", c1, "--theta2", other, "--data", f"a={root / 'fit.jsonl'}",
                  "--grid", "2x2", "--no-progress"), ("features", "--checkpoint", c0, "--checkpoint", other,
                                                       "--prompts", root / "eval.jsonl")):
        proc = run(*args, "--out", root / "x")
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert f"checkpoint {other} is not a checkpoint of the same model as the first" in lines[0]
    assert not (root / "x").exists()


def test_bad_qa_files_and_options_get_one_line_before_any_output(setup, tmp_path):
    """In-process (fast): each bad file or option of the analyze commands exits 2 with one line naming it, and
    --out is not created."""
    from typer.testing import CliRunner

    from forgetlab.cli.main import app

    root, (c0, c1, c2) = setup
    files = {"missing": None, "notjson": "{not json}\n", "fields": json.dumps({"prompt": "Q : w1", "answer": 3}) + "\n",
             "empty": "\n"}
    for name, text in files.items():
        if text is not None:
            (tmp_path / f"{name}.jsonl").write_text(text)
    no_tokenizer = tmp_path / "no_tokenizer"
    random_model(tiny_config("llama", 40, n_layers=2)).save_pretrained(no_tokenizer)
    out = tmp_path / "out"
    landscape = ["landscape", "--theta0", c0, "--theta1", c1, "--theta2", c2, "--grid", "2x2", "--no-progress"]
    cases = [
        (["recovery", "--checkpoint", c1, "--fit", tmp_path / "missing.jsonl", "--eval", root / "eval.jsonl"], "does not exist"),
        (["recovery", "--checkpoint", c1, "--fit", tmp_path / "notjson.jsonl", "--eval", root / "eval.jsonl"], "line 1 is not JSON"),
        (["recovery", "--checkpoint", c1, "--fit", tmp_path / "fields.jsonl", "--eval", root / "eval.jsonl"], "string fields"),
        (["recovery", "--checkpoint", c1, "--fit", tmp_path / "empty.jsonl", "--eval", root / "eval.jsonl"], "has no rows"),
        (["recovery", "--checkpoint", c1, "--fit", root / "fit.jsonl", "--eval", root / "eval.jsonl", "--before", "1.5"],
         "--before 1.5"),
        ([*landscape, "--data", str(root / "fit.jsonl")], "expected NAME=FILE"),
        ([*landscape, "--data", f"a={root / 'fit.jsonl'}", "--alpha-range", "3,1"], "LOW must be below HIGH"),
        ([*landscape, "--data", f"a={root / 'fit.jsonl'}", "--beta-range", "x"], "expected LOW,HIGH"),
        ([*landscape, "--data", f"a={root / 'fit.jsonl'}", "--max-examples", "0"], "--max-examples 0"),
        (["landscape", "--theta0", no_tokenizer, "--theta1", c1, "--theta2", c2, "--data", f"a={root / 'fit.jsonl'}"],
         "no loadable tokenizer"),
        (["angles", "--a1", c0, "--a2", c1, "--b1", c1, "--b2", c2, "--energy", "0"], "--energy 0"),
        (["features", "--checkpoint", c0, "--checkpoint", c1, "--prompts", root / "eval.jsonl", "--scatter-layer", "9"],
         "--scatter-layer 9 is out of range"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(app, ["analyze", *map(str, args), "--out", str(out)])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and len(lines) == 1, (args, result.output)
        assert not out.exists(), args


def test_a_killed_landscape_resumes_after_its_last_row_with_the_same_losses(setup, tmp_path, monkeypatch):
    """The grid is saved row by row: a rerun after a kill computes only the missing rows and ends with exactly the
    losses of an uninterrupted run; other settings start afresh; the partial file is gone at the end."""
    from typer.testing import CliRunner

    import forgetlab.analysis.landscape as landscape
    from forgetlab.cli.main import app

    root, (c0, c1, c2) = setup
    real, calls = landscape.dataset_loss, {"n": 0, "kill_at": None}

    def counted(model, data, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt  # a kill in the middle of the grid's third row
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(landscape, "dataset_loss", counted)

    def run_grid(out, kill_at=None, max_examples=2000):
        calls.update(n=0, kill_at=kill_at)
        return CliRunner().invoke(app, ["analyze", "landscape", "--theta0", str(c0), "--theta1", str(c1), "--theta2",
                                        str(c2), "--data", f"old={root / 'eval.jsonl'}", "--grid", "3x4", "--out", str(out),
                                        "--max-examples", str(max_examples), "--no-progress"])

    fresh = run_grid(tmp_path / "fresh")
    assert fresh.exit_code == 0, fresh.output
    assert calls["n"] == 3 + 12  # the three trajectory checkpoints, then the grid
    killed = run_grid(tmp_path / "killed", kill_at=3 + 2 * 3 + 2)
    assert killed.exit_code == 130  # as an interrupt exits
    partial = json.loads((tmp_path / "killed" / "landscape.partial.json").read_text())
    assert partial["rows_done"] == 2 and not (tmp_path / "killed" / "landscape.json").exists()
    data = root / "eval.jsonl"  # written again with the same rows (as `biography analyze` does): still resumes
    data.write_bytes(data.read_bytes())
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    resumed = run_grid(tmp_path / "killed")
    assert resumed.exit_code == 0 and "resuming the grid after row 2 of 4" in resumed.output, resumed.output
    assert calls["n"] == 3 + 2 * 3  # the trajectory, then only the last two rows of the grid
    done, whole = (json.loads((tmp_path / d / "landscape.json").read_text()) for d in ("killed", "fresh"))
    assert done["losses"] == whole["losses"] and done["resumed_after_row"] == 2 and whole["resumed_after_row"] == 0
    assert not (tmp_path / "killed" / "landscape.partial.json").exists()

    run_grid(tmp_path / "other", kill_at=3 + 5)
    changed = run_grid(tmp_path / "other", max_examples=10)  # other rows decide the losses: nothing is reused
    assert changed.exit_code == 0 and "starting afresh" in changed.output and calls["n"] == 12 + 3

    # a finished grid of the same settings is only redrawn; other settings compute it again
    (tmp_path / "fresh" / "landscape.png").unlink()
    again = run_grid(tmp_path / "fresh")
    assert again.exit_code == 0 and "redrawing landscape.png only" in again.output and calls["n"] == 0
    assert json.loads((tmp_path / "fresh" / "landscape.json").read_text()) == whole
    assert (tmp_path / "fresh" / "landscape.png").stat().st_size > 0
    other = run_grid(tmp_path / "fresh", max_examples=10)
    assert other.exit_code == 0 and "redrawing" not in other.output and calls["n"] == 12 + 3


def test_auto_ranges_span_the_trajectory_with_a_quarter_to_spare(setup, tmp_path):
    """θ0, θ1, θ2 project to (0, 0), (1, 0), (1, 1): auto puts the grid over [−0.25, 1.25] on both axes, and its corner
    points are then checkpoints' own losses; a fixed range on one axis stays as given."""
    from typer.testing import CliRunner

    from forgetlab.analysis.landscape import span_with_margin
    from forgetlab.cli.main import app

    assert span_with_margin([0.0, 1.0, 1.0]) == pytest.approx((-0.25, 1.25))
    assert span_with_margin([2.0, 2.0]) == pytest.approx((1.5, 2.5))  # coinciding points: half a unit each side
    root, (c0, c1, c2) = setup

    def grid(out, beta_range):
        result = CliRunner().invoke(app, ["analyze", "landscape", "--theta0", str(c0), "--theta1", str(c1), "--theta2",
                                          str(c2), "--data", f"old={root / 'eval.jsonl'}", "--grid", "7x3", "--alpha-range",
                                          "auto", "--beta-range", beta_range, "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        return json.loads((out / "landscape.json").read_text())

    land = grid(tmp_path / "auto", "AUTO")
    assert land["alphas"] == pytest.approx(np.linspace(-0.25, 1.25, 7).tolist())
    assert land["betas"] == pytest.approx([-0.25, 0.5, 1.25])
    assert land["settings"]["alpha_range"] == "auto" and land["settings"]["beta_range"] == "auto"
    # α = 0 and α = 1 are grid points 1 and 5: at β = −0.25 + 0.75·k no checkpoint lies, but with β fixed at 0,1 the
    # corners (0, 0) and (1, 0) are θ0 and θ1
    fixed = grid(tmp_path / "fixed", "0,1")
    assert fixed["betas"] == pytest.approx([0.0, 0.5, 1.0])
    path = [p["losses"]["old"] for p in fixed["trajectory"]]
    assert fixed["losses"]["old"][0][1] == pytest.approx(path[0], rel=1e-4)
    assert fixed["losses"]["old"][0][5] == pytest.approx(path[1], rel=1e-4)
    assert fixed["losses"]["old"][2][5] == pytest.approx(path[2], rel=1e-4)


def test_a_missing_trajectory_checkpoint_is_named_before_the_grid(setup, tmp_path, monkeypatch):
    """The trajectory's checkpoints are loaded after the grid (hours on a CPU): a wrong one must fail first."""
    from typer.testing import CliRunner

    import forgetlab.analysis.landscape as landscape
    from forgetlab.cli.main import app

    root, (c0, c1, c2) = setup
    monkeypatch.setattr(landscape, "dataset_loss", lambda *a, **k: pytest.fail("the grid started"))
    result = CliRunner().invoke(app, ["analyze", "landscape", "--theta0", str(c0), "--theta1", str(c1), "--theta2",
                                      str(c2), "--data", f"old={root / 'eval.jsonl'}", "--trajectory", str(c0),
                                      "--trajectory", str(root / "no-such-step"), "--out", str(tmp_path / "l"),
                                      "--no-progress"])
    assert result.exit_code == 2 and "no-such-step" in result.output, result.output
    assert not (tmp_path / "l").exists()


def test_recovery_cli_share_uses_the_checkpoints_current_score_and_before(setup, tmp_path):
    """In-process (fast): a checkpoint fitted on some --eval rows scores above 0 before recovery, so recovery.json's
    share, (recovered − current) / (before − current) with --before 0.9, is told apart from recovered / before and
    (recovered − current) / before; a second checkpoint's row uses its own current score."""
    import tempfile
    from pathlib import Path

    from typer.testing import CliRunner

    from forgetlab.analysis.recovery import encode_qa, read_qa_rows
    from forgetlab.cli.main import app
    from forgetlab.models.build import load_model, load_tokenizer
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.train.data import qa_dataset
    from forgetlab.train.trainer import EvalSchedule, PhaseConfig, train_phase

    root, (c0, c1, c2) = setup
    model, tok = load_model(c1), load_tokenizer(c1)
    prompts, answers = encode_qa(tok, read_qa_rows(root / "eval.jsonl")[:8])
    cfg = PhaseConfig(lr=1e-2, epochs=20, batch_size=8, schedule="constant", weight_decay=0.0, checkpoint_every=0,
                      eval=EvalSchedule(dense_every=0, every=0))
    with tempfile.TemporaryDirectory() as state:
        train_phase(model, qa_dataset(prompts, answers, tok.eos_token_id, pad_id(tok)), cfg, phase="x",
                    state_dir=Path(state), seed=0, log=lambda s: None, progress=False)
    model.save_pretrained(tmp_path / "knows")
    tok.save_pretrained(tmp_path / "knows")
    result = CliRunner().invoke(app, ["analyze", "recovery", "--checkpoint", str(tmp_path / "knows"), "--checkpoint",
                                      str(c0), "--fit", str(root / "fit.jsonl"), "--eval", str(root / "eval.jsonl"),
                                      "--before", "0.9", "--lr", "1e-2", "--epochs", "1", "--out", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "rec" / "recovery.json").read_text())
    assert rec["before"] == 0.9 and [r["checkpoint"] for r in rec["rows"]] == [str(tmp_path / "knows"), str(c0)]
    knows, other = rec["rows"]
    c, r = knows["current"], knows["recovered"]
    assert 0 < c < 0.9 and r != c and c != other["current"], "the test needs these scores: " + str(rec["rows"])
    for row in rec["rows"]:
        assert row["before"] == 0.9 and row["steps"] == 1  # 20 fit rows, one batch of 32
        assert row["spurious_share"] == pytest.approx((row["recovered"] - row["current"]) / (0.9 - row["current"]))
    wrong = [r / 0.9, (r - c) / 0.9, (r - other["current"]) / (0.9 - other["current"])]
    assert all(abs(knows["spurious_share"] - w) > 0.02 for w in wrong), (knows, wrong)
