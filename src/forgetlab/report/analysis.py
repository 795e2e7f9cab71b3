"""Figures of the forgetting diagnostics: update-angle heatmap, loss landscape, feature shift, recovery."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from forgetlab.report.figures import save_figure  # noqa: E402


def plot_angle_heatmap(layers: list[int], components: list[str], grid: np.ndarray, path: Path, title: str,
                       chance: np.ndarray | None = None, unchanged: np.ndarray | None = None) -> None:
    """Mean angle per (layer, component); with ``chance``, a second panel of angle − chance angle
    (negative: closer to A's subspace than a random direction would be). Cells true in ``unchanged`` (a matrix one
    phase left as it was, e.g. frozen) read "no Δ", so they are not mistaken for matrices the model lacks."""
    panels = [(grid, "mean angle (degrees)", "viridis", 0, 90)]
    if chance is not None:
        panels.append((grid - chance, "angle − chance angle (degrees)", "RdBu", -45, 45))
    width = 1.2 + 0.9 * len(components)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 1.2 + 0.4 * len(layers)), squeeze=False)
    for ax, (values, label, cmap, vmin, vmax) in zip(axes[0], panels):
        image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(components)), components, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), ["emb" if l < 0 else str(l) for l in layers])
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                dark = value < (vmin + vmax) / 2 if cmap == "viridis" else abs(value) > 0.6 * vmax
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
            elif unchanged is not None and unchanged[i, j]:
                ax.text(j, i, "no Δ", ha="center", va="center", fontsize=7, color="gray")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label=label)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_angles_over_training(windows: Sequence[str], means: Sequence[dict[str, dict]], path: Path, title: str) -> None:
    """Per component (averaged over layers), how far each window's update sits below the chance angle of phase A's
    subspace: high = inside A's subspace, 0 = no closer than a random direction."""
    fig, ax = plt.subplots(figsize=(3.0 + 0.9 * len(windows), 4.2))
    components = list(dict.fromkeys(c for m in means for c in m))
    for comp in components:
        ys = [np.nan if m.get(comp, {}).get("below_chance_deg") is None else m[comp]["below_chance_deg"] for m in means]
        ax.plot(range(len(windows)), ys, marker="o", label=comp)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(windows)), windows, rotation=30, ha="right")
    ax.set_ylabel("chance angle − angle (degrees)\n(> 0: inside A's update subspace)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: lines run to every corner
    save_figure(fig, path)


def plot_landscape(alphas: np.ndarray, betas: np.ndarray, losses: dict[str, np.ndarray], path: Path,
                   trajectory: np.ndarray | None = None, labels: Sequence[str] = ()) -> None:
    """One contour panel per task. Colours and iso-loss lines are log-spaced: losses span 1e-2 (a learned task) to
    1e1 (far out on the plane), and a linear scale leaves the basin the trajectory runs through one colour. The
    trajectory's points are numbered, with the checkpoint names in a key below (names written beside the points
    overlap where the checkpoints lie close)."""
    fig, axes = plt.subplots(1, len(losses), figsize=(5.2 * len(losses), 4.4), squeeze=False)
    for ax, (task, grid) in zip(axes[0], losses.items()):
        positive = grid[np.isfinite(grid) & (grid > 0)]
        low, high = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
        levels = np.geomspace(low, high * (1 + 1e-9), 31) if high > low else 30
        contour = ax.contourf(alphas, betas, np.clip(grid, low, None), levels=levels, cmap="magma_r",
                              norm=LogNorm(low, high) if high > low else None)
        if high > low:
            ax.contour(alphas, betas, np.clip(grid, low, None), levels=np.geomspace(low, high, 9)[1:-1],
                       colors="white", linewidths=0.4, alpha=0.6)
        bar = fig.colorbar(contour, ax=ax, label=f"{task} loss" + (" (log scale)" if high > low else ""))
        if high > low:  # 1-2-5 ticks instead of one per colour level
            ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
                     for m in (1, 2, 5) if low <= m * 10.0 ** e <= high]
            if len(ticks) < 3:  # a narrow range: a few evenly spaced values instead
                ticks = np.geomspace(low, high, 4).tolist()
            bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
        if trajectory is not None and len(trajectory):
            ax.plot(trajectory[:, 0], trajectory[:, 1], "-o", color="cyan", ms=3.5, lw=1.2)
            for i, (a, b) in enumerate(trajectory):
                ax.annotate(str(i + 1), (a, b), xytext=(0, 6 if i % 2 == 0 else -11), textcoords="offset points",
                            ha="center", fontsize=7, color="white", fontweight="bold",
                            path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
        ax.set_xlabel("d1 = θ1 − θ0")
        ax.set_ylabel("d2 = θ2 − θ1")
        ax.set_title(task)
    if trajectory is not None and len(labels):
        key = "   ".join(f"{i + 1}: {label}" for i, label in enumerate(labels))
        fig.supxlabel("trajectory  " + key, fontsize=7)
    save_figure(fig, path)


def plot_feature_shift(rows_by_pair: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in rows_by_pair.items():
        layers = [r["layer"] for r in rows]
        axes[0].plot(layers, [np.nan if r["pc1_angle_deg"] is None else r["pc1_angle_deg"] for r in rows], marker="o",
                     label=label)
        axes[1].plot(layers, [r["mean_shift"] for r in rows], marker="o", label=label)
    axes[0].set_ylabel("PC1 angle (degrees)")
    axes[1].set_ylabel("mean shift / RMS feature norm")
    for ax in axes:
        ax.set_xlabel("layer (0 = embedding)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_feature_scatter(points: list[np.ndarray], labels: Sequence[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.4))
    for pts, label in zip(points, labels):
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, label=label)
    ax.set_xlabel("PC1 of the reference")
    ax.set_ylabel("PC2 of the reference")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_recovery(rows: Sequence[dict], path: Path) -> None:
    """Old-task exact match of each checkpoint now and after the brief re-alignment, against the level before the
    forgetting (dashed): how much of each drop was lost alignment (the spurious share, printed above the bars)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["current"] for r in rows], 0.4, label="current", color="tab:red")
    ax.bar(x + 0.2, [r["recovered"] for r in rows], 0.4, label="recovered", color="tab:green")
    before = rows[0].get("before") if rows else None
    if before is not None:
        ax.axhline(before, ls="--", color="black", lw=1, label="before")
    for i, r in enumerate(rows):
        if r.get("spurious_share") is not None:
            ax.text(i, max(r["current"], r["recovered"]) + 0.03, f"{r['spurious_share']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, [Path(r["checkpoint"]).name for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("old-task exact match")
    ax.set_title("recovery (numbers: spurious share)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
