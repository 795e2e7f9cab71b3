"""``report.md`` beside a run's results: the numbers of ``results.json`` as tables a person reads, a few
sentences that say what they mean, and the figures. Every number is read from the results dict, so the
report can never disagree with the file that scripts read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from forgetlab.utils.io import atomic_write_text


def undefined(value: object) -> bool:
    """A metric the run leaves undefined: NaN in memory, null once read back from JSON."""
    return value is None or isinstance(value, float) and math.isnan(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats with 3 decimals (fractions) unless already formatted, a dash for
    an undefined number (None or NaN)."""
    def cell(value: object) -> str:
        if undefined(value):
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


BIOGRAPHY_MEASURES = (
    ("task0_before", "task 0 (QA on held-out people) before task 1"),
    ("task0_min_during_task1", "task 0, lowest during task 1"),
    ("task0_after_task1", "task 0 after task 1"),
    ("task1_after", "task 1 after task 1"),
    ("task0_recovered", "task 0 after recovery"),
    ("task0_recovery_control", "recovery control (pretrained-only model)"),
    ("spurious_share", "spurious share of the drop"),
)


def biography_report(results: dict, out: Path) -> None:
    """``report.md`` of a biography run (exact match as fractions, as in ``results.json``)."""
    r = results
    settings = [f"{name} {r[key]:g}" for key, name in (("freeze_layers", "bottom layers frozen"), ("ewc_strength", "EWC λ"),
                                                     ("replay", "replay"), ("early_stop", "early stop at")) if r.get(key)]
    parts = [f"# Spurious forgetting on synthetic biographies: preset `{r['preset']}`, method `{r['method']}`"
             f"{' (' + ', '.join(settings) + ')' if settings else ''}, seed {r['seed']}\n\n",
             table(["measure", "exact match"], [(label, r[key] if undefined(r[key]) else float(r[key]))
                                                for key, label in BIOGRAPHY_MEASURES])]
    # recovery starts from the model after the last new task, so the drop it explains ends there
    rows = (r.get("score_matrix") or {}).get("rows") or ["task1"]
    last = rows[-1]
    final = r.get("task0_final", r["task0_after_task1"])
    drop = r["task0_before"] - final
    if last == "task1":
        lines = [f"Task 1 {'took' if drop > 0 else 'moved'} task 0 from {r['task0_before']:.3f} to {final:.3f} "
                 f"(lowest {r['task0_min_during_task1']:.3f}) while task 1 reached {r['task1_after']:.3f}."]
    else:
        lines = [f"Tasks 1 to {last.removeprefix('task')} {'took' if drop > 0 else 'moved'} task 0 from "
                 f"{r['task0_before']:.3f} to {final:.3f} (after task 1 {r['task0_after_task1']:.3f}, lowest during it "
                 f"{r['task0_min_during_task1']:.3f}); task 1 reached {r['task1_after']:.3f}."]
    if drop > 0:
        lines.append(f"One epoch of re-alignment on task 0 brought it back to {r['task0_recovered']:.3f}: "
                     f"{r['spurious_share']:.0%} of the drop came back, the part that was lost alignment rather than "
                     "lost knowledge.")
    else:
        lines.append(f"There is no drop to explain; re-alignment gives {r['task0_recovered']:.3f}.")
    margin = r["task0_recovered"] - r["task0_recovery_control"]
    lines.append(f"The same re-alignment from the pretrained-only model reaches {r['task0_recovery_control']:.3f}, so "
                 f"recovery {'beats' if margin > 0 else 'does not beat'} the control ({margin:+.3f}).")
    recall = r.get("task0_recall", {})
    if recall.get("task0") is not None and recall.get(last) is not None:
        lost = recall["task0"] - recall[last]
        lines.append(f"Held-out people's values the model still completes in its own biographies: {recall['task0']:.3f} "
                     f"before task 1, {recall[last]:.3f} after {'it' if last == 'task1' else 'task ' + last.removeprefix('task')}"
                     + (f" ({lost:.3f} of knowledge itself lost)." if lost > 0 else " (no knowledge lost)."))
    parts.append("\n" + " ".join(lines) + "\n")
    matrix = r.get("score_matrix")
    if matrix:
        parts.append("\n## Score matrix (rows: after each phase)\n\n")
        parts.append(table(["after", *matrix["tasks"]], [(row, *map(float, values))
                                                         for row, values in zip(matrix["rows"], matrix["R"])]))
        parts.append("\n" + table(["metric", "value"], [(k, float(v)) for k, v in matrix["metrics"].items()]))
    trained = [{"phase": name, **terms} for name, terms in r.get("loss_terms", {}).items() if terms]
    if any(set(e) - {"phase", "lm"} for e in trained):  # a method term (EWC) to weigh against the LM loss
        parts.append("\n## Training loss per phase (mean per micro-batch; method terms as weighted in the loss)\n\n")
        parts.append(loss_table(trained, "phase"))
    parts.append(f"\n![task-0 and task-1 exact match along the run](curves.png)\n\nRun time {r['seconds']:.0f} s. "
                 "Data: `results.json`, `curves.csv`; configuration: `config.json`.\n")
    atomic_write_text(out / "report.md", "".join(parts))


def loss_table(entries: Sequence[dict], label: str) -> str:
    """Mean training loss terms per phase: ``lm`` and every method term any phase has (``–`` where it has none)."""
    names = sorted({k for e in entries for k, v in e.items() if isinstance(v, (int, float))} - {label, "steps", "lm"})
    steps = ["steps"] if any("steps" in e for e in entries) else []
    return table([label, *steps, "LM loss", *names],
                 [(e[label], *(e.get("steps", "–") for _ in steps), f"{e['lm']:.4g}",
                   *(f"{e[n]:.3g}" if n in e else "–" for n in names)) for e in entries])


def _number(value) -> str:
    return "–" if undefined(value) else f"{value:.1f}"


def cit_report(results: dict, out: Path) -> None:
    """``report.md`` of a continual instruction-tuning run (scores ×100, as in ``results.json``)."""
    r = results
    tasks = r["tasks"]
    title = f"`{r['method']}`" + (" + FV-guided training" if r["fvg"] else "")
    parts = [f"# Continual instruction tuning: {title}, {len(tasks)} tasks, seed {r['seed']}\n"]
    if "initial" in r:
        parts.append("\n" + table(["general ability", "initial", "final", "change"],
                                  [(name, f"{r['initial'][k]:.1f}", f"{r['final'][k]:.1f}",
                                    f"{r['final'][k] - r['initial'][k]:+.1f}")
                                   for k, name in (("GP", "GP (zero-shot)"), ("IP", "IP (5-shot in context)"))]))
    parts.append("\n" + table(["sequence", "value"], [
        ("AP (each task right after it was trained)", f"{r['AP']:.1f}"), ("FP (every task at the end)", f"{r['FP']:.1f}"),
        ("forget = AP − FP", f"{r['forget']:.1f}"),
        *((("the initial model on these tasks (mean of R's first row)", f"{r['initial_tasks_mean']:.1f}"),
           ("FP gain over the initial model", f"{r['FP_gain']:+.1f}")) if "FP_gain" in r else ())]))
    extra = [(k, _number(r[k])) for k in ("acc", "bwt_gem", "bwt_trace", "fwt", "forgetting") if k in r]
    if extra:
        parts.append("\n" + table(["metric", "value"], extra))
    labels = [f"{k + 1}. {t}" for k, t in enumerate(tasks)]
    parts.append("\n## Score matrix R (rows: after each task; ROUGE-L or option accuracy ×100)\n\n")
    parts.append(table(["after", *labels], [(name, *(f"{v:.1f}" for v in row))
                                            for name, row in zip(["initial", *labels], r["R"])]))
    if r.get("train_loss"):
        parts.append("\n## Training loss per task (mean per micro-batch; method terms as weighted in the loss)\n\n")
        parts.append(loss_table(r["train_loss"], "task"))
        fitted = [(k, e) for k, e in enumerate(r["train_loss"]) if "train_rows" in e]
        if fitted:
            parts.append("\n## Each task right after training on it: its own training rows against its test rows\n\n")
            parts.append(table(["task", "training rows", "score on them", "test score (R)"],
                               [(e["task"], e["train_rows"]["n"], f"{e['train_rows']['score']:.1f}", f"{r['R'][k + 1][k]:.1f}")
                                for k, e in fitted]))
        targets = [(e["task"], e["fvg_target"]) for e in r["train_loss"] if "fvg_target" in e]
        if targets:
            parts.append("\n## FVG's KL target against the labels (the frozen model before each task, at the prompt "
                         "end, on the task's training rows)\n\n")
            parts.append(table(["task", "frozen: top-1 is the answer", "frozen: p(answer)", "frozen + FV: top-1",
                                "frozen + FV: p(answer)"],
                               [(name, *(f"{t[k]:.2f}" for k in ("frozen_top1", "frozen_p_answer", "frozen_fv_top1",
                                                                  "frozen_fv_p_answer"))) for name, t in targets]))
    parts.append(f"\n![score matrix](scores.png)\n\nRun time {r['seconds']:.0f} s. Data: `results.json`; configuration: "
                 "`config.json`; library versions and devices: `environment.json`; the final model in `model/`.\n")
    atomic_write_text(out / "report.md", "".join(parts))


DRIFT_MEASURES = (("fv_cosine", "FV cosine to the initial FV"),
                  ("zero_shot_fv_cosine", "FV heads' zero-shot output, cosine to the initial"),
                  ("hidden_cosine", "last hidden state cosine, zero-shot prompts (control)"),
                  ("icl_hidden_cosine", "last hidden state cosine, the FV's in-context prompts (control)"),
                  ("param_distance", "parameter L2 distance (control)"))


def drift_report(fits: dict, runs: Sequence[str], interventions: dict | None, out: Path) -> None:
    """``drift.md`` of ``forgetlab cit analyze``: how well each measure explains the zero-shot score change
    (the FV paper's claim is that FV cosine does, and the controls do not), and the FV interventions."""
    def r2(value) -> str:
        return "–" if value is None else f"{value:.2f}"

    measures = [(m, label) for m, label in DRIFT_MEASURES if m in fits]  # drift.json of older runs lacks some
    pooled = {m: fits[m]["pooled"] for m, _ in measures}
    parts = [f"# FV drift vs. forgetting: {len(runs)} run{'s' if len(runs) > 1 else ''}, "
             f"{pooled['fv_cosine']['n']} (checkpoint, general task) points\n\n",
             table(["measure", "R² pooled", "slope", "median R² per task", "R² over checkpoint means"],
                   [(label, r2(pooled[m]["r2"]), "–" if pooled[m]["slope"] is None else f"{pooled[m]['slope']:.3g}",
                     r2(fits[m]["median_task_r2"]), r2(fits[m].get("checkpoint_mean", {}).get("r2")))
                    for m, label in measures])]
    known = {m: p["r2"] for m, p in pooled.items() if p["r2"] is not None}
    if len(known) == len(measures):
        best = max(known, key=known.get)
        fv_measures = [m for m in ("fv_cosine", "zero_shot_fv_cosine") if m in known]
        parts.append(f"\nPooled over tasks and checkpoints, the score change is explained best by "
                     f"{dict(measures)[best]} (R² {known[best]:.2f})"
                     + ("; an FV measure explains more than every control, the FV paper's finding."
                        if best in fv_measures else
                        "; " + ", ".join(f"{dict(measures)[m]} reaches {known[m]:.2f}" for m in fv_measures)
                        + ", so the FV paper's finding (FV similarity above the controls) does not hold here.") + "\n")
    parts.append("\n![score change vs each measure, with the fits](drift.png)\n")
    if len(runs) == 1:
        parts.append("\nThe most forgotten tasks checkpoint by checkpoint (FV cosine as bars, the zero-shot score as a line, "
                     "the zero-shot hidden-state cosine dotted):\n\n![FV cosine and score per task](drift_tasks.png)\n")
    if interventions is not None:
        s = interventions["summary"]
        forgotten = {name: t for name, t in interventions["tasks"].items() if t.get("forgotten")}
        parts.append(f"\n## FV interventions on the last checkpoint\n\n{s['forgotten_tasks']} general tasks lost at least "
                     f"{100 * s.get('min_drop', 0.05):g} points. Adding each one's original FV recovers on average "
                     f"{'–' if s['mean_add_recovered'] is None else format(s['mean_add_recovered'], '.0%')} of its drop "
                     f"({'–' if s.get('pooled_add_recovered') is None else format(s['pooled_add_recovered'], '.0%')} "
                     "of all the points lost); "
                     "subtracting the FV of the last trained task "
                     f"{'–' if s['mean_subtract_recovered'] is None else format(s['mean_subtract_recovered'], '.0%')}.\n")
        if forgotten:
            parts.append("\n" + table(["task", "initial", "final", "+ original FV", "− last task's FV"],
                                      [(name, float(t["initial"]), float(t["final"]), float(t["add_original_fv"]),
                                        float(t["subtract_last_task_fv"]) if "subtract_last_task_fv" in t else "–")
                                       for name, t in forgotten.items()]))
    parts.append("\nData: `drift.json`, `drift.csv`" + (", `interventions.json`" if interventions is not None else "")
                 + f". Runs: {', '.join(f'`{r}`' for r in runs)}.\n")
    atomic_write_text(out / "drift.md", "".join(parts))


def analysis_report(done: dict, out: Path) -> None:
    """``analysis.md`` of ``forgetlab biography analyze``: per analysis the numbers that carry the paper's findings,
    read from what each analysis returned (the same dicts as its JSON), and its figures."""
    parts = ["# Spurious-forgetting diagnostics of the run\n"]
    if "angles" in done:
        angles = done["angles"]
        rows = [(layer, angles["mean_angle_deg_by_layer"][layer], angles["chance_angle_deg_by_layer"][layer])
                for layer in angles["mean_angle_deg_by_layer"]]
        parts += ["## Update angles: task 1 against task 0's update subspace\n",
                  "Mean angle of task 1's update directions to the subspace task 0's update spanned, per layer (−1: "
                  "embeddings); chance is where a random direction would sit. Below chance: task 1 moves inside task 0's "
                  "subspace.\n", table(["layer", "mean angle (deg)", "chance (deg)"],
                                       [(l, _degrees(a), _degrees(c)) for l, a, c in rows]),
                  "![angles](angles/angles.png)\n"]
    if "angles-over-training" in done:
        windows = done["angles-over-training"]["windows"]
        comps = list(dict.fromkeys(c for w in windows for c in w["by_component"]))
        parts += ["## Update angles window by window\n",
                  "Degrees below chance (averaged over layers) of each window of task 1: high = inside task 0's update "
                  "subspace, 0 = no closer than a random direction.\n",
                  table(["window", *comps], [(f"{Path(w['b1']).name} → {Path(w['b2']).name}",
                                              *(_degrees(w["by_component"][c]["below_chance_deg"]) for c in comps))
                                             for w in windows]),
                  "![angles over training](angles-over-training/angles_over_training.png)\n"]
    if "features" in done:
        pairs = done["features"]["pairs"]
        last = list(pairs)[-1]
        parts += ["## Feature shift\n",
                  f"Last-prompt-token features on task-0 test questions, per layer (0: embedding output), {last}: mean "
                  "shift relative to the RMS feature norm and the turn of the first principal component.\n",
                  table(["layer", "mean shift", "PC1 angle (deg)"],
                        [(r["layer"], r["mean_shift"], _degrees(r["pc1_angle_deg"])) for r in pairs[last]]),
                  "![feature shift](features/features.png)\n"]
    if "landscape" in done:
        land = done["landscape"]
        tasks = list(land["losses"])
        parts += ["## Loss landscape\n",
                  f"The plane through {Path(land['theta0']).name} with d1 = {Path(land['theta1']).name} − "
                  f"{Path(land['theta0']).name} and d2 = {Path(land['theta2']).name} − {Path(land['theta1']).name}, "
                  f"drawn over α ∈ [{land['alphas'][0]:.2f}, {land['alphas'][-1]:.2f}], β ∈ [{land['betas'][0]:.2f}, "
                  f"{land['betas'][-1]:.2f}] ({len(land['alphas'])} × {len(land['betas'])} points); each "
                  "checkpoint's own losses along the path (not read off the plane).\n",
                  table(["checkpoint", *(f"{t} loss" for t in tasks), "α", "β"],
                        [(Path(p["checkpoint"]).name, *(p["losses"][t] for t in tasks), round(p["alpha"], 3) + 0.0,
                          round(p["beta"], 3) + 0.0)  # + 0.0: no "-0.000" for a point on the axis
                         for p in land["trajectory"]]),
                  "![loss landscape](landscape/landscape.png)\n"]
    atomic_write_text(out / "analysis.md", "\n".join(parts))


def _degrees(value) -> str:
    return "–" if undefined(value) else f"{value:.1f}"
