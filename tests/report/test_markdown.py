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
    assert "best by last hidden state cosine, zero-shot prompts (control) (R² 0.47)" in text and "does not hold here" in text
    assert "FV cosine to the initial FV reaches 0.12, FV heads' zero-shot output, cosine to the initial reaches 0.20" in text
    assert "recovers on average 25% of its drop" in text and "last trained task –" in text
    assert "(drift_tasks.png)" in text  # one run: the per-task figure, which pooled runs do not get
    assert tasks[1:] == [["a", "1.000", "0.200", "0.400", "–"]]
    drift_report({**fits, "fv_cosine": fit(0.9)}, ["r1", "r2"], None, tmp_path)
    text = (tmp_path / "drift.md").read_text()
    assert "2 runs" in text and "the FV paper's finding" in text and "interventions" not in text.lower()
    assert "drift_tasks.png" not in text
    older = {m: f for m, f in fits.items() if m != "zero_shot_fv_cosine"}  # drift.json written before the measure
    drift_report({**older, "param_distance": fit(0.6)}, ["r1"], None, tmp_path)
    measures, = parse_tables((tmp_path / "drift.md").read_text())
    assert len(measures) == 4 and "best by parameter L2 distance (control) (R² 0.60)" in (tmp_path / "drift.md").read_text()


def test_cit_report_puts_each_tasks_own_test_score_and_the_fvg_target_in_their_columns(tmp_path):
    """Right after task k (row k + 1 of R: row 0 is the initial model) its test score is R[k + 1][k]: 80 for task a
    and 90 for task b here, never the initial model's 10 or 5. FVG's target rates go under their own headers."""
    tasks = [InstructionTask("a", "d", ()), InstructionTask("b", "d", ())]
    R = [[10.0, 0.0], [80.0, 5.0], [50.0, 90.0]]
    general = [{"gp": 70.0, "ip": 60.0}, {"gp": 65.0, "ip": 58.0}, {"gp": 40.0, "ip": 50.0}]
    target = {"frozen_top1": 0.11, "frozen_p_answer": 0.22, "frozen_fv_top1": 0.33, "frozen_fv_p_answer": 0.44}
    train_loss = [{"task": "a", "steps": 4, "lm": 0.5, "train_rows": {"n": 12, "score": 95.0}, "fvg_target": target},
                  {"task": "b", "steps": 4, "lm": 0.25, "train_rows": {"n": 12, "score": 97.0},
                   "fvg_target": {k: v + 0.5 for k, v in target.items()}}]
    results = {**summarize(CITConfig(world_dir="x", method="inclora", fvg=True), tasks, R, general), "seconds": 1.0,
               "train_loss": train_loss}
    cit_report(results, tmp_path)
    *_, losses, fitted, targets = parse_tables((tmp_path / "report.md").read_text())
    assert losses[0] == ["task", "steps", "LM loss"]  # the dicts under train_loss are not loss terms
    assert fitted == [["task", "training rows", "score on them", "test score (R)"], ["a", "12", "95.0", "80.0"],
                      ["b", "12", "97.0", "90.0"]]
    assert targets == [["task", "frozen: top-1 is the answer", "frozen: p(answer)", "frozen + FV: top-1",
                        "frozen + FV: p(answer)"], ["a", "0.11", "0.22", "0.33", "0.44"], ["b", "0.61", "0.72", "0.83", "0.94"]]


def test_score_matrix_figure_writes_each_score_in_its_cell(tmp_path, monkeypatch):
    """The heatmap of a 3 × 2 R (initial row first): the number at column j, row i is R[i][j], rounded."""
    import numpy as np

    from forgetlab.report import cit as figures

    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: shown.append(fig))
    R = np.array([[10.0, 0.0], [80.0, 5.0], [50.0, 90.0]])
    figures.plot_score_matrix(R, ["a", "b"], tmp_path / "scores.png")
    ax = shown[0].axes[0]
    cells = sorted((round(t.get_position()[0]), round(t.get_position()[1]), t.get_text()) for t in ax.texts)
    assert cells == sorted((j, i, f"{R[i][j]:.0f}") for i in range(3) for j in range(2))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["initial", "after a", "after b"]


def test_drift_figure_plots_later_checkpoints_in_points_with_the_pooled_line(tmp_path, monkeypatch):
    """One point per later checkpoint (index > 0; the initial one is the origin of every change) at
    (measure, 100 · score change), and the fitted line 100 · (slope · x + intercept) across the points' range."""
    import numpy as np

    from forgetlab.analysis.fv_drift import MEASURES
    from forgetlab.report import cit as figures

    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: shown.append(fig))
    rows = [{"index": i, "score_change": change, **{m: x + k for k, m in enumerate(MEASURES)}}
            for i, change, x in ((0, 0.0, 1.0), (1, -0.1, 0.8), (2, -0.25, 0.5), (3, -0.3, 0.4))]
    fits = {m: {"pooled": {"slope": 0.5 + k, "intercept": -0.2, "r2": 0.9}} for k, m in enumerate(MEASURES)}
    figures.plot_drift(rows, fits, tmp_path / "drift.png")
    for k, (ax, m) in enumerate(zip(shown[0].axes, MEASURES)):
        xs = [0.8 + k, 0.5 + k, 0.4 + k]
        np.testing.assert_allclose(ax.collections[0].get_offsets(), list(zip(xs, [-10.0, -25.0, -30.0])))
        line_x, line_y = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
        assert line_x.min() == pytest.approx(min(xs)) and line_x.max() == pytest.approx(max(xs))
        np.testing.assert_allclose(line_y, 100 * ((0.5 + k) * line_x - 0.2))


def test_drift_tasks_figure_draws_the_most_forgotten_tasks_checkpoint_by_checkpoint(tmp_path, monkeypatch):
    """Three tasks over three checkpoints, drops worked out by hand (a 0.9, b 0.2, c 0.5): the two largest are drawn,
    each with FV cosine as bars, the zero-shot hidden-state cosine and 100 · score as lines, in checkpoint order."""
    import numpy as np

    from forgetlab.report import cit as figures

    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, rect=None: shown.append(fig))
    table = {"a": [(1.0, 1.0, 1.0), (0.6, 0.9, 0.5), (0.2, 0.7, 0.1)], "b": [(1.0, 1.0, 0.8), (0.9, 0.95, 0.7),
                                                                          (0.8, 0.9, 0.6)],
             "c": [(1.0, 1.0, 0.9), (0.7, 0.5, 0.2), (-0.1, 0.6, 0.4)]}
    rows = [{"index": i, "checkpoint": f"ck{i}", "task": t, "fv_cosine": fv, "hidden_cosine": hidden, "zero_shot": score,
             "score_change": score - table[t][0][2]} for t, points in table.items()
            for i, (fv, hidden, score) in reversed(list(enumerate(points)))]  # rows out of order on purpose
    assert figures.plot_drift_tasks(rows, tmp_path / "t.png", k=2) == ["a", "c"]
    bars_a, bars_c = shown[0].axes[0], shown[0].axes[1]
    for ax, task in ((bars_a, "a"), (bars_c, "c")):
        assert ax.get_title() == task
        assert [p.get_height() for p in ax.patches] == pytest.approx([fv for fv, _, _ in table[task]])
        np.testing.assert_allclose(ax.lines[0].get_ydata(), [h for _, h, _ in table[task]])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["initial", "after 1", "after 2"]
    twins = [ax for ax in shown[0].axes if ax not in (bars_a, bars_c) and ax.lines]
    np.testing.assert_allclose(twins[0].lines[0].get_ydata(), [100.0, 50.0, 10.0])
    np.testing.assert_allclose(twins[1].lines[0].get_ydata(), [90.0, 20.0, 40.0])
    assert figures.most_forgotten(rows, 3) == ["a", "c", "b"]
