"""The figure of a biography run, in the style of Figure 2a of the spurious-forgetting paper.

Task-0 and task-1 exact match against the training step, the phases laid end to end (task 0, then
task 1, ...), with the recovery and control results marked at the end.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from forgetlab.report.figures import save_figure  # noqa: E402
from forgetlab.report.markdown import undefined  # noqa: E402

COLORS = {"task0": "tab:blue", "task1": "tab:orange", "task2": "tab:green", "task3": "tab:red"}


def plot_curves(rows: list[dict], results: dict, path: Path) -> None:
    phases = [p for p in dict.fromkeys(r["phase"] for r in rows) if p.startswith("task")]
    offsets, offset = {}, 0
    for p in phases:
        offsets[p] = offset
        offset += max((r["step"] for r in rows if r["phase"] == p), default=0)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    tasks = sorted({r["task"] for r in rows if r["phase"] in offsets and r["metric"] == "em"})
    for task in tasks:
        pts = sorted((offsets[r["phase"]] + r["step"], r["value"]) for r in rows
                     if r["phase"] in offsets and r["task"] == task and r["metric"] == "em")
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=f"{task} exact match", color=COLORS.get(task), lw=1.6)
    for p in phases[1:]:
        ax.axvline(offsets[p], color="grey", ls="--", lw=0.8)
        ax.text(offsets[p], 1.02, f" {p} starts", fontsize=8, color="grey")
    ax.axhline(results["task0_before"], color="tab:blue", ls=":", lw=1,
               label=f"task0 before task 1 ({results['task0_before']:.2f})")
    ax.scatter([offset], [results["task0_recovered"]], marker="*", s=160, color="tab:blue", zorder=5,
               label=f"task0 after recovery ({results['task0_recovered']:.2f})")
    ax.scatter([offset], [results["task0_recovery_control"]], marker="x", s=70, color="black", zorder=5,
               label=f"recovery control, pretrained only ({results['task0_recovery_control']:.2f})")
    ax.set_xlabel("training step (task 0, then task 1, ...)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.08)
    share = "undefined (no drop)" if undefined(results["spurious_share"]) else f"{results['spurious_share']:.2f}"
    ax.set_title(f"biography world - method {results['method']} - spurious share {share}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, Path(path))
