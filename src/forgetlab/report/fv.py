"""Figures of the function-vector tools: the layer x head CIE heatmap and the FV layer sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from forgetlab.report.figures import save_figure  # noqa: E402


def plot_cie_heatmap(cie: torch.Tensor, heads: Sequence[tuple[int, int]], path: Path, title: str = "CIE") -> None:
    """Heads on x, layers on y (layer 0 at the bottom), top heads outlined."""
    n_layers, n_heads = cie.shape
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * n_heads), min(10, 1.5 + 0.3 * n_layers)))
    image = ax.imshow(cie.numpy(), origin="lower", aspect="auto", cmap="RdBu_r",
                      vmin=-float(cie.abs().max()), vmax=float(cie.abs().max()) or 1e-12)
    for layer, head in heads:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.4))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="mean causal indirect effect")
    save_figure(fig, path)


def plot_layer_sweep(accuracy_by_layer: Sequence[float], baseline: float, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(accuracy_by_layer)), accuracy_by_layer, marker="o", label="zero-shot + FV")
    ax.axhline(baseline, color="gray", ls="--", label="zero-shot")
    ax.set_xlabel("layer the FV is added to")
    ax.set_ylabel("first-token accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)

