"""The score-matrix heatmap of a continual instruction-tuning run."""

from __future__ import annotations

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
