"""The figures of continual instruction tuning: the score-matrix heatmap of a run, and FV drift vs. forgetting."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forgetlab.report.figures import save_figure  # noqa: E402


def plot_score_matrix(R: np.ndarray, tasks: Sequence[str], path: Path) -> None:
    """Rows: the model after each task (first: initial); columns: the task scored (×100)."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.1 * len(tasks), 1.4 + 0.5 * len(R)))
    image = ax.imshow(R, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(R)), ["initial"] + [f"after {t}" for t in tasks], fontsize=8)
    for (i, j), value in np.ndenumerate(R):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 50 else "black")
    fig.colorbar(image, ax=ax, label="score (ROUGE-L or accuracy, ×100)")
    save_figure(fig, path)


def plot_drift(rows: list[dict], fits: dict, path: Path) -> None:
    """Score change vs. each measure (the two FV cosines and the three controls), one point per checkpoint and task
    (one colour per run when several are pooled), with the pooled least-squares line and its R²."""
    from forgetlab.analysis.fv_drift import MEASURES
    from forgetlab.report.markdown import DRIFT_MEASURES

    later = [r for r in rows if r["index"] > 0]
    labels = dict(DRIFT_MEASURES)  # the names drift.md gives them
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.6), sharey=True)
    y = np.array([100 * r["score_change"] for r in later])
    runs = sorted({r.get("run", "") for r in later})
    for ax, measure in zip(axes, MEASURES):
        x = np.array([r[measure] for r in later])
        for k, run in enumerate(runs):
            mine = np.array([r.get("run", "") == run for r in later])
            ax.scatter(x[mine], y[mine], s=14, alpha=0.7, color=f"C{k % 10}", label=run or None)
        fit = fits[measure]["pooled"]
        if fit["r2"] is not None:
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, 100 * (fit["slope"] * xs + fit["intercept"]), color="black")
            ax.set_title(f"R² = {fit['r2']:.2f}", fontsize=10)
        ax.set_xlabel(textwrap.fill(labels[measure], 34))  # the long control names would run into each other
    axes[0].set_ylabel("zero-shot score change (points)")
    if len(runs) > 1:
        axes[0].legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


def most_forgotten(rows: list[dict], k: int) -> list[str]:
    """The ``k`` tasks whose zero-shot score fell most from the initial model to the last checkpoint (ties by name)."""
    last = max(r["index"] for r in rows)
    drops = {r["task"]: -r["score_change"] for r in rows if r["index"] == last}
    return sorted(drops, key=lambda t: (-drops[t], t))[:k]


def plot_drift_tasks(rows: list[dict], path: Path, k: int = 6) -> list[str]:
    """The FV paper's Figure 2 for one run: per forgotten task, FV cosine to the initial FV at each checkpoint
    (bars, left axis) and the zero-shot score (line, right axis), with the zero-shot hidden-state cosine (the strict
    control, dotted) on the bars' axis, so a reader sees which of the two the score follows. Returns the tasks drawn."""
    tasks = most_forgotten(rows, k)
    labels = ["initial" if i == 0 else f"after {i}" for i in sorted({r["index"] for r in rows})]  # task i trained
    cols = min(3, len(tasks))
    fig, axes = plt.subplots(-(-len(tasks) // cols), cols, figsize=(4.4 * cols, 3.2 * -(-len(tasks) // cols)),
                             squeeze=False)
    x = np.arange(len(labels))
    twins = []
    for ax, task in zip(axes.flat, tasks):
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["index"])
        ax.bar(x, [r["fv_cosine"] for r in mine], color="C0", alpha=0.6, label="FV cosine")
        ax.plot(x, [r["hidden_cosine"] for r in mine], ":o", color="grey", markersize=3,
                label="hidden-state cosine, zero-shot prompts (control)")
        ax.set_ylim(min(0.0, *(min(r["fv_cosine"], r["hidden_cosine"]) for r in mine)) - 0.05, 1.05)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(task, fontsize=9)
        twins.append(ax.twinx())
        twins[-1].plot(x, [100 * r["zero_shot"] for r in mine], "-o", color="C3", markersize=3,
                       label="zero-shot score (right axis)")
        twins[-1].set_ylim(-5, 105)
        twins[-1].tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("cosine to the initial model")
    fig.legend(handles=axes[0, 0].get_legend_handles_labels()[0] + twins[0].get_legend_handles_labels()[0],
               loc="lower center", ncol=3, fontsize=8)
    save_figure(fig, path, rect=(0, 0.06, 1, 1))
    return tasks
