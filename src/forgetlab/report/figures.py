"""Writing figures: every PNG of forgetlab goes through ``save_figure``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Write the PNG beside its final name, then rename: a reader never sees half a figure. ``rect``: the part of the
    figure the axes are laid out in (room left for a figure-wide legend)."""
    fig.tight_layout(rect=rect)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
