"""Runs against a baseline: the shares of its drops they keep, worked by hand on made-up results."""

import json

import pytest
from typer.testing import CliRunner

from forgetlab.cli.main import app
from forgetlab.report.compare import compare_runs, write_comparison


def fake_run(path, gp_final, ip_final, fp, *, tasks=("a", "b"), gp0=90.0, ip0=80.0, method="inclora", fvg=False):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "method": method, "fvg": fvg, "tasks": list(tasks), "R": [[0, 0], [100, 0], [50, 100]], "AP": 100.0, "FP": fp,
        "initial": {"GP": gp0, "IP": ip0}, "final": {"GP": gp_final, "IP": ip_final}}))
    return path


def test_shares_of_the_drops_and_the_target_by_hand(tmp_path):
    base = fake_run(tmp_path / "inclora", 50.0, 60.0, 40.0)                       # drops 40 and 20
    good = fake_run(tmp_path / "fvg", 80.0, 70.0, 36.0, fvg=True)                 # drops 10, 10: keeps 75%, 50%; FP -4
    costly = fake_run(tmp_path / "fvg_kl20", 85.0, 78.0, 30.0, fvg=True)          # keeps 87.5%, 90%; FP -10
    short = fake_run(tmp_path / "lwf", 75.0, 68.0, 45.0, method="lwf")            # drops 15, 12: keeps 62.5%, 40%; FP +5
    summary = compare_runs(base, [good, costly, short])
    assert summary["baseline"]["GP_drop"] == 40.0 and summary["baseline"]["IP_drop"] == 20.0
    assert summary["baseline"]["forgets"] is True
    rows = {r["run"].rsplit("/", 1)[-1]: r for r in summary["runs"]}
    assert rows["fvg"]["GP_drop_kept"] == pytest.approx(0.75) and rows["fvg"]["IP_drop_kept"] == pytest.approx(0.5)
    assert rows["fvg"]["FP_change"] == pytest.approx(-4.0) and rows["fvg"]["target_met"] is True  # at the edges
    assert rows["fvg_kl20"]["GP_drop_kept"] == pytest.approx(0.875) and rows["fvg_kl20"]["target_met"] is False
    assert rows["lwf"]["GP_drop_kept"] == pytest.approx(0.625) and rows["lwf"]["IP_drop_kept"] == pytest.approx(0.4)
    assert rows["lwf"]["FP_change"] == pytest.approx(5.0) and rows["lwf"]["target_met"] is False
    assert compare_runs(base, [costly], fp_tolerance=10.0)["runs"][0]["target_met"] is True
    text = write_comparison(summary, tmp_path / "cmp")
    assert "| fvg | 10.0 / 10.0 | 75% | 50% | 100.0 / 36.0 | -4.0 | met |" in text
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == json.loads(json.dumps(summary))


def test_a_baseline_without_a_drop_leaves_the_shares_undefined(tmp_path):
    base = fake_run(tmp_path / "flat", 90.0, 82.0, 40.0)                          # GP unchanged, IP up
    summary = compare_runs(base, [fake_run(tmp_path / "other", 85.0, 80.0, 40.0)])
    row = summary["runs"][0]
    assert row["GP_drop_kept"] is None and row["IP_drop_kept"] is None and row["target_met"] is None
    assert summary["baseline"]["forgets"] is False


def test_runs_of_other_models_sequences_or_experiments_are_refused_in_one_line(tmp_path):
    base = fake_run(tmp_path / "base", 50.0, 60.0, 40.0)
    other_model = fake_run(tmp_path / "m", 50.0, 60.0, 40.0, gp0=70.0)
    other_sequence = fake_run(tmp_path / "s", 50.0, 60.0, 40.0, tasks=("a", "c"))
    (tmp_path / "bio").mkdir()
    (tmp_path / "bio" / "results.json").write_text(json.dumps({"task0_before": 0.7}))
    no_general = fake_run(tmp_path / "nogeneral", 50.0, 60.0, 40.0)
    results = json.loads((no_general / "results.json").read_text())
    del results["final"]["IP"]
    results["FP"] = None
    (no_general / "results.json").write_text(json.dumps(results))
    runner = CliRunner()
    ok = fake_run(tmp_path / "ok", 80.0, 70.0, 36.0)
    for bad, message, options in ((other_model, "not the same initial model", []),
                                  (other_sequence, "compare runs of one sequence", []),
                                  (tmp_path / "bio", "not the results of a `forgetlab cit run`", []),
                                  (no_general, "has no number for final.IP, FP", []),
                                  (tmp_path / "none", "no results.json", []),
                                  (ok, "--keep 50: a share of the drop", ["--keep", "50"]),
                                  (ok, "--fp-tolerance -5: points of FP", ["--fp-tolerance", "-5"])):
        result = runner.invoke(app, ["cit", "compare", str(base), str(bad), "--out", str(tmp_path / "out"), *options])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["cit", "compare", str(base), str(ok), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "| ok | 10.0 / 10.0 | 75% | 50% |" in result.output, result.output
    # a run given as its results.json is named by its directory
    result = runner.invoke(app, ["cit", "compare", str(base / "results.json"), str(ok / "results.json"),
                                 "--out", str(tmp_path / "out")])
    assert "Against the baseline base" in result.output and "| ok | 10.0 / 10.0 |" in result.output, result.output
    assert (tmp_path / "out" / "compare.md").is_file()


@pytest.mark.parametrize("gp_final, ip_final, forgets", [
    (50.0, 75.0, False),    # drops 40 and 5: GP alone is not forgetting
    (80.0, 70.0, True),     # drops exactly 10 and 10: the bar is inclusive
    (80.01, 40.0, False),   # drops 9.99 and 40: IP alone is not forgetting either
])
def test_forgetting_counts_only_when_both_drops_reach_ten_points(tmp_path, gp_final, ip_final, forgets):
    """A baseline forgets only if GP *and* IP each drop by ≥ 10 points (initial GP/IP 90/80 here)."""
    base = fake_run(tmp_path / "base", gp_final, ip_final, 40.0)
    summary = compare_runs(base, [fake_run(tmp_path / "run", 85.0, 78.0, 40.0)])
    assert summary["baseline"]["GP_drop"] == pytest.approx(90.0 - gp_final)
    assert summary["baseline"]["IP_drop"] == pytest.approx(80.0 - ip_final)
    assert summary["baseline"]["forgets"] is forgets
    reproduced = "forgetting reproduced" if forgets else "forgetting not reproduced"
    assert reproduced in write_comparison(summary, tmp_path / "cmp")
