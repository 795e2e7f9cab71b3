"""Mean ± sd over seeds, against numpy on hand-made runs."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from forgetlab.cli.main import app
from forgetlab.report.aggregate import aggregate_runs, write_aggregate


def fake_cit_run(path, seed, method, ap, gp_final):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed, "method": method, "fvg": False, "train": {"lr": 1e-4}}))
    (path / "results.json").write_text(json.dumps({
        "seed": seed, "method": method, "fvg": False, "tasks": ["a", "b"], "R": [[0, 0], [1, 0], [1, 1]], "AP": ap,
        "FP": ap - 1, "forget": 1.0, "initial": {"GP": 50.0, "IP": 60.0}, "final": {"GP": gp_final, "IP": 55.0}}))
    return path


def test_runs_that_differ_only_in_seed_are_one_setting(tmp_path):
    runs = [fake_cit_run(tmp_path / "a0", 0, "inclora", 70.0, 40.0), fake_cit_run(tmp_path / "a1", 1, "inclora", 80.0, 44.0),
            fake_cit_run(tmp_path / "a2", 2, "inclora", 75.0, 47.0), fake_cit_run(tmp_path / "b0", 0, "seq", 90.0, 30.0)]
    summary = aggregate_runs(runs)
    assert summary["experiment"] == "cit" and [g["n"] for g in summary["groups"]] == [3, 1]
    inclora, seq = summary["groups"]
    assert inclora["label"] == "inclora" and inclora["seeds"] == [0, 1, 2] and seq["label"] == "seq"
    ap = inclora["metrics"]["AP"]
    assert ap["values"] == [70.0, 80.0, 75.0]
    assert ap["mean"] == pytest.approx(np.mean([70, 80, 75])) and ap["sd"] == pytest.approx(np.std([70, 80, 75], ddof=1))
    assert inclora["metrics"]["final.GP"]["sd"] == pytest.approx(np.std([40, 44, 47], ddof=1))
    assert seq["metrics"]["AP"]["sd"] is None and "seed" not in inclora["metrics"] and "R" not in inclora["metrics"]
    write_aggregate(summary, tmp_path / "agg")
    md = (tmp_path / "agg" / "aggregate.md").read_text()
    assert "| inclora | 3 | 0, 1, 2 | 50.0 ± 0.0 | 43.7 ± 3.5 |" in md and "| seq | 1 | 0 | 50.0 | 30.0 |" in md
    assert json.loads((tmp_path / "agg" / "aggregate.json").read_text()) == json.loads(json.dumps(summary))


def test_a_setting_that_differs_is_named_and_bad_input_is_refused(tmp_path):
    a = fake_cit_run(tmp_path / "a", 0, "inclora", 70.0, 40.0)
    b = fake_cit_run(tmp_path / "b", 0, "inclora", 71.0, 41.0)
    config = json.loads((b / "config.json").read_text())
    config["train"]["lr"] = 2e-3
    (b / "config.json").write_text(json.dumps(config))
    labels = [g["label"] for g in aggregate_runs([a, b])["groups"]]
    assert labels == ["inclora train.lr=0.0001", "inclora train.lr=0.002"]
    bio = tmp_path / "bio.json"
    bio.write_text(json.dumps({"seed": 0, "method": "seq", "task0_before": 0.7}))
    with pytest.raises(ValueError, match="different experiments"):
        aggregate_runs([a, bio])
    result = CliRunner().invoke(app, ["aggregate", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "neither a finished run directory" in result.stderr
    ok = CliRunner().invoke(app, ["aggregate", str(a), str(b), "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0 and (tmp_path / "o" / "aggregate.md").is_file()


def fake_biography_run(path, seed, world_seed, spurious_share):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed, "preset": "cpu-demo", "world": {"seed": world_seed}}))
    (path / "results.json").write_text(json.dumps({"seed": seed, "method": "seq", "task0_before": 0.8,
                                                   "spurious_share": spurious_share}))
    return path


def test_biography_seeds_pool_with_their_world_seed_and_undefined_values_stay_aligned(tmp_path):
    # `biography run --seed S` seeds the world with S too: those runs are one setting
    runs = [fake_biography_run(tmp_path / f"s{s}", s, s, share) for s, share in ((0, 0.75), (1, None), (2, 0.25))]
    (group,) = aggregate_runs(runs)["groups"]
    assert group["n"] == 3 and group["seeds"] == [0, 1, 2] and "world.seed" not in group["setting"]
    share = group["metrics"]["spurious_share"]
    assert share["values"] == [0.75, None, 0.25] and share["n"] == 2
    assert share["mean"] == pytest.approx(0.5) and share["sd"] == pytest.approx(np.std([0.75, 0.25], ddof=1))
    write_aggregate(aggregate_runs(runs), tmp_path / "agg")
    assert "0.500 ± 0.354 (n=2)" in (tmp_path / "agg" / "aggregate.md").read_text()
    # a world seed held fixed while the training seed varies is part of the setting
    fixed = [fake_biography_run(tmp_path / f"f{s}", s, 0, 0.5) for s in (0, 1)]
    groups = aggregate_runs(fixed + [fake_biography_run(tmp_path / "g", 0, 1, 0.5)])["groups"]
    assert [(g["setting"]["world.seed"], g["n"]) for g in groups] == [(0, 2), (1, 1)]


def test_a_metric_some_runs_lack_stays_aligned_with_its_runs(tmp_path):
    """Results of one setting written by different versions: a metric missing from the middle run is None there,
    so ``values`` still follow ``runs``, and mean, sd and n are over the two runs that have it."""
    runs = [fake_cit_run(tmp_path / f"r{s}", s, "seq", 70.0 + 10 * s, 40.0) for s in range(3)]
    middle = json.loads((runs[1] / "results.json").read_text())
    del middle["final"]
    (runs[1] / "results.json").write_text(json.dumps(middle))
    (group,) = aggregate_runs(runs)["groups"]
    gp = group["metrics"]["final.GP"]
    assert gp["values"] == [40.0, None, 40.0] and gp["n"] == 2 and gp["mean"] == pytest.approx(40.0)
    assert group["metrics"]["AP"]["values"] == [70.0, 80.0, 90.0]
    assert all(len(m["values"]) == 3 for m in group["metrics"].values())


def test_a_nan_in_a_results_file_counts_as_undefined(tmp_path):
    """A results file holding NaN (``json`` writes it for a float nan) is an undefined metric, like null: left out
    of mean, sd and n, not turned into a nan mean."""
    runs = [fake_biography_run(tmp_path / f"s{s}", s, s, 0.5) for s in range(3)]
    for run, share in zip(runs, (0.75, float("nan"), 0.25)):
        data = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**data, "spurious_share": share}))
    share = aggregate_runs(runs)["groups"][0]["metrics"]["spurious_share"]
    assert share["n"] == 2 and share["mean"] == pytest.approx(0.5)
    assert share["sd"] == pytest.approx(np.std([0.75, 0.25], ddof=1))


def bare_biography_results(path, seed, ewc_strength, after):
    """A biography results file kept without its config.json, as docs/results/ keeps them."""
    path.write_text(json.dumps({"seed": seed, "method": "ewc", "preset": "cpu-demo", "freeze_layers": 0, "replay": 0.0,
                                "early_stop": 0.0, "ewc_strength": ewc_strength, "task0_before": 0.8,
                                "task0_after_task1": after}))
    return path


def test_bare_results_keep_the_method_settings_they_record_apart_and_a_repeated_seed_is_refused(tmp_path):
    """Without config.json a run is what its results record: EWC at three strengths are three settings (they were one,
    averaging the strengths as a metric); two runs of one seed that nothing recorded tells apart are refused."""
    runs = [bare_biography_results(tmp_path / f"ewc{s}.json", 0, s, a) for s, a in ((1e4, 0.149), (1e5, 0.179), (1e6, 0.188))]
    summary = aggregate_runs(runs)
    assert [g["n"] for g in summary["groups"]] == [1, 1, 1]
    assert [g["metrics"]["task0_after_task1"]["mean"] for g in summary["groups"]] == [0.149, 0.179, 0.188]
    assert "ewc_strength" not in summary["groups"][0]["metrics"] and "ewc_strength=10000.0" in summary["groups"][0]["label"]
    twice = [bare_biography_results(tmp_path / "a.json", 0, 1e4, 0.1), bare_biography_results(tmp_path / "b.json", 0, 1e4, 0.2)]
    with pytest.raises(ValueError, match="repeat seed 0, so they differ in a setting their results do not record"):
        aggregate_runs(twice)
