"""report.md: every number in its tables is the one in results.json, and the sentences follow the numbers."""

import json

import pytest

from forgetlab.experiments.cit import CITConfig, summarize
from forgetlab.report.markdown import BIOGRAPHY_MEASURES, biography_report, cit_report, drift_report, table
from forgetlab.utils.io import to_jsonable
from forgetlab.worlds.instructions import InstructionTask


def parse_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` as rows of cells (header row first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_table_formats_fractions_and_keeps_text():
    assert table(["a", "b"], [("x", 0.12345), ("y", "7.0")]) == "| a | b |\n|---|---|\n| x | 0.123 |\n| y | 7.0 |\n"


BIO = {"task0_before": 0.766, "task0_min_during_task1": 0.12, "task0_after_task1": 0.133, "task1_after": 0.944,
       "task0_recovered": 0.523, "task0_recovery_control": 0.516, "spurious_share": 0.616, "method": "seq",
       "preset": "cpu-demo", "seed": 0, "seconds": 527.1, "task0_recall": {"task0": 0.816, "task1": 0.597},
       "score_matrix": {"rows": ["pretrain", "task0", "task1"], "tasks": ["task0", "task1"],
                        "R": [[0.0, 0.0], [0.766, 0.035], [0.133, 0.944]], "metrics": {"acc": 0.5385, "bwt_gem": -0.633}}}


def test_biography_report_holds_the_results(tmp_path):
    biography_report(BIO, tmp_path)
    text = (tmp_path / "report.md").read_text()
    measures, matrix, metrics = parse_tables(text)
    assert [row[0] for row in measures[1:]] == [label for _, label in BIOGRAPHY_MEASURES]
    assert [float(row[1]) for row in measures[1:]] == pytest.approx([BIO[k] for k, _ in BIOGRAPHY_MEASURES], abs=5e-4)
    assert matrix[0] == ["after", "task0", "task1"] and matrix[3] == ["task1", "0.133", "0.944"]
    assert metrics[1:] == [["acc", "0.538"], ["bwt_gem", "-0.633"]]
    assert "62% of the drop came back" in text and "recovery beats the control (+0.007)" in text
    assert "0.816 before task 1, 0.597 after it (0.219 of knowledge itself lost)" in text and "(curves.png)" in text


def test_biography_report_says_when_recovery_does_not_beat_the_control_or_nothing_dropped(tmp_path):
    biography_report({**BIO, "task0_recovery_control": 0.6, "method": "freeze", "freeze_layers": 2, "early_stop": 0.9},
                     tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "does not beat the control (-0.077)" in text and "`freeze` (bottom layers frozen 2, early stop at 0.9)" in text
    biography_report({**BIO, "task0_after_task1": 0.8, "task0_recall": {"task0": 0.5, "task1": 0.6}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "moved task 0 from 0.766 to 0.800" in text and "no drop to explain" in text and "(no knowledge lost)" in text


def test_biography_report_with_two_new_tasks_names_the_drop_recovery_explains(tmp_path):
    # before 0.8, after task 1 0.6, after task 2 0.4, recovered 0.7: 75% of the drop to the final model came back
    two = {**BIO, "task0_before": 0.8, "task0_after_task1": 0.6, "task0_final": 0.4, "task0_recovered": 0.7,
           "spurious_share": 0.75, "task0_recall": {"task0": 0.9, "task1": 0.8, "task2": 0.7},
           "score_matrix": {**BIO["score_matrix"], "rows": ["pretrain", "task0", "task1", "task2"],
                            "tasks": ["task0", "task1", "task2"], "R": [[0, 0, 0], [0.8, 0, 0], [0.6, 0.9, 0], [0.4, 0.8, 0.9]]}}
    biography_report(two, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Tasks 1 to 2 took task 0 from 0.800 to 0.400 (after task 1 0.600" in text
    assert "75% of the drop came back" in text and "0.900 before task 1, 0.700 after task 2 (0.200 of knowledge" in text
    biography_report({**BIO, "spurious_share": float("nan")}, tmp_path)
    measures = parse_tables((tmp_path / "report.md").read_text())[0]
    assert measures[-1] == ["spurious share of the drop", "–"]


def test_cit_report_holds_the_results(tmp_path):
    tasks = [InstructionTask("a", "d", ()), InstructionTask("b", "d", ())]
    R = [[10.0, 0.0], [80.0, 5.0], [50.0, 90.0]]
    general = [{"gp": 70.0, "ip": 60.0}, {"gp": 65.0, "ip": 58.0}, {"gp": 40.0, "ip": 50.0}]
    results = {**summarize(CITConfig(world_dir="x", method="inclora", fvg=True), tasks, R, general), "seconds": 12.0}
    cit_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    general_table, sequence, metrics, matrix = parse_tables(text)
    assert general_table[1] == ["GP (zero-shot)", "70.0", "40.0", "-30.0"] and general_table[2][1:] == ["60.0", "50.0", "-10.0"]
    # AP = (80 + 90) / 2, FP = (50 + 90) / 2, the initial row's mean (10 + 0) / 2 and FP's gain over it
    assert [row[1] for row in sequence[1:]] == ["85.0", "70.0", "15.0", "5.0", "+65.0"]
    assert dict(metrics[1:])["bwt_gem"] == "-30.0"
    assert matrix[0] == ["after", "1. a", "2. b"] and [row[1:] for row in matrix[1:]] == [["10.0", "0.0"], ["80.0", "5.0"],
                                                                                         ["50.0", "90.0"]]
    assert text.startswith("# Continual instruction tuning: `inclora` + FV-guided training, 2 tasks")
    train_loss = [{"task": "a", "steps": 4, "lm": 0.5, "fv": 0.01, "kl": 0.25}, {"task": "b", "steps": 4, "lm": 0.125}]
    cit_report({**results, "train_loss": train_loss}, tmp_path)
    losses = parse_tables((tmp_path / "report.md").read_text())[-1]
    assert losses == [["task", "steps", "LM loss", "fv", "kl"], ["a", "4", "0.5", "0.01", "0.25"], ["b", "4", "0.125", "–", "–"]]
    one = summarize(CITConfig(world_dir="x"), tasks[:1], [[10.0], [80.0]], general[:2])  # one task: no BWT, FWT, forgetting
    cit_report({**json.loads(json.dumps(to_jsonable(one))), "seconds": 1.0}, tmp_path)  # as read back from results.json
    assert dict(parse_tables((tmp_path / "report.md").read_text())[2][1:])["bwt_gem"] == "–"


def test_biography_report_weighs_the_ewc_penalty_against_the_lm_loss(tmp_path):
    terms = {"pretrain": {"lm": 2.0}, "task0": {"lm": 0.5}, "task1": {"lm": 0.25, "ewc": 1e-6}, "recovery": {}}
    biography_report({**BIO, "loss_terms": terms}, tmp_path)
    losses = parse_tables((tmp_path / "report.md").read_text())[-1]
    assert losses == [["phase", "LM loss", "ewc"], ["pretrain", "2", "–"], ["task0", "0.5", "–"], ["task1", "0.25", "1e-06"]]
    biography_report({**BIO, "loss_terms": {"task1": {"lm": 0.25}}}, tmp_path)  # no method term: no table
    assert "Training loss" not in (tmp_path / "report.md").read_text()


def fit(r2, slope=1.0):
    return {"pooled": {"slope": slope, "intercept": 0.0, "r2": r2, "n": 12}, "median_task_r2": r2 / 2,
            "checkpoint_mean": {"r2": None}}


def test_drift_report_names_the_best_measure_and_the_interventions(tmp_path):
    fits = {"fv_cosine": fit(0.12), "zero_shot_fv_cosine": fit(0.2), "hidden_cosine": fit(0.47, -2.0),
            "param_distance": fit(0.01)}
    interventions = {"summary": {"forgotten_tasks": 1, "mean_add_recovered": 0.25, "mean_subtract_recovered": None},
                     "tasks": {"a": {"forgotten": True, "initial": 1.0, "final": 0.2, "add_original_fv": 0.4},
                               "b": {"forgotten": False, "initial": 1.0, "final": 1.0}}}
    drift_report(fits, ["runs/x"], interventions, tmp_path)
    text = (tmp_path / "drift.md").read_text()
    measures, tasks = parse_tables(text)
    assert measures[1] == ["FV cosine to the initial FV", "0.12", "1", "0.06", "–"] and measures[3][1:3] == ["0.47", "-2"]
    assert measures[2][:2] == ["FV heads' zero-shot output, cosine to the initial", "0.20"]
    assert "best by last hidden state cosine (control) (R² 0.47)" in text and "does not hold here" in text
    assert "FV cosine to the initial FV reaches 0.12, FV heads' zero-shot output, cosine to the initial reaches 0.20" in text
    assert "recovers on average 25% of its drop" in text and "last trained task –" in text
    assert tasks[1:] == [["a", "1.000", "0.200", "0.400", "–"]]
    drift_report({**fits, "fv_cosine": fit(0.9)}, ["r1", "r2"], None, tmp_path)
    text = (tmp_path / "drift.md").read_text()
    assert "2 runs" in text and "the FV paper's finding" in text and "interventions" not in text.lower()
    older = {m: f for m, f in fits.items() if m != "zero_shot_fv_cosine"}  # drift.json written before the measure
    drift_report({**older, "param_distance": fit(0.6)}, ["r1"], None, tmp_path)
    measures, = parse_tables((tmp_path / "drift.md").read_text())
    assert len(measures) == 4 and "best by parameter L2 distance (control) (R² 0.60)" in (tmp_path / "drift.md").read_text()
