"""Weight-update angles: does phase B update the same subspace as phase A did? (SF paper, papers.md §3)

For each weight matrix, ΔA = W(a2) − W(a1) and ΔB = W(b2) − W(b1); the effective rank r of a Δ is the
smallest k whose top-k singular values hold ``energy`` (99%) of ‖Δ‖²_F. Each of ΔB's top-r_B left
singular vectors u is compared with span(U_A[:, :r_A]): the angle is arccos ‖U_Aᵀu‖ (u has unit norm),
0° when u lies in A's update subspace, 90° when it is orthogonal to it.

What counts as "close" depends on r_A: a random unit vector in R^m has E‖U_Aᵀu‖² = r_A/m, so with the
high 99%-energy ranks of a small model even unrelated updates sit well below 90°. ``chance_angle_deg``
= arccos √(r_A/m) is that reference; an update is in A's subspace only where its angle is clearly below it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from forgetlab.analysis.weights import weight_matrices

COLUMNS = ("layer", "component", "rank_a", "rank_b", "mean_angle_deg", "min_angle_deg", "max_angle_deg", "norm_a", "norm_b",
           "chance_angle_deg")


def effective_rank(singular_values: torch.Tensor, energy: float = 0.99) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ_i² (0 for a zero matrix)."""
    power = singular_values.double() ** 2
    total = power.sum()
    if total <= 0:
        return 0
    share = torch.cumsum(power, 0) / total
    k = int(torch.searchsorted(share, torch.tensor(energy, dtype=torch.float64, device=power.device)).item()) + 1
    return min(k, len(power))  # energy 1.0: rounding can leave the full sum a hair below 1


def subspace_angles(delta_a: torch.Tensor, delta_b: torch.Tensor, energy: float = 0.99) -> tuple[int, int, torch.Tensor]:
    """(r_A, r_B, angles in degrees of ΔB's top-r_B left singular vectors to span(U_A[:, :r_A]))."""
    u_a, s_a, _ = torch.linalg.svd(delta_a.double(), full_matrices=False)
    u_b, s_b, _ = torch.linalg.svd(delta_b.double(), full_matrices=False)
    r_a, r_b = effective_rank(s_a, energy), effective_rank(s_b, energy)
    if r_a == 0 or r_b == 0:
        return r_a, r_b, torch.empty(0, dtype=torch.float64)
    cos = torch.linalg.vector_norm(u_a[:, :r_a].T @ u_b[:, :r_b], dim=0).clamp(max=1.0)
    return r_a, r_b, torch.rad2deg(torch.arccos(cos)).cpu()


def chance_angle(rank: int, dim: int) -> float:
    """Degrees: arccos √(rank/dim), the angle of a random direction of R^dim to a rank-dimensional subspace."""
    return float(np.degrees(np.arccos(np.sqrt(rank / dim)))) if dim else float("nan")


@dataclass
class AngleRow:
    layer: int
    component: str
    rank_a: int
    rank_b: int
    mean_angle_deg: float
    min_angle_deg: float
    max_angle_deg: float
    norm_a: float
    norm_b: float
    chance_angle_deg: float


def update_angles(a1, a2, b1, b2, energy: float = 0.99, device: str | None = None) -> list[AngleRow]:
    """Rows for every weight matrix the four models share, in layer order (models or weight dicts)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mats = [m if isinstance(m, dict) else weight_matrices(m) for m in (a1, a2, b1, b2)]
    keys = [k for k in mats[0] if all(k in m for m in mats[1:])]
    rows = []
    for key in sorted(keys, key=lambda k: (k[0], k[1])):
        w = [m[key].to(device=device, dtype=torch.float32) for m in mats]
        if w[0].shape != w[1].shape or w[2].shape != w[3].shape or w[0].shape != w[2].shape:
            raise ValueError(f"weight {key} has different shapes across the checkpoints; compare checkpoints of one model")
        delta_a, delta_b = w[1] - w[0], w[3] - w[2]
        r_a, r_b, angles = subspace_angles(delta_a, delta_b, energy)
        stats = (angles.mean().item(), angles.min().item(), angles.max().item()) if len(angles) else (float("nan"),) * 3
        rows.append(AngleRow(key[0], key[1], r_a, r_b, *stats, float(delta_a.norm()), float(delta_b.norm()),
                            chance_angle(r_a, delta_a.shape[0])))
    return rows


def angles_over_training(a1, a2, checkpoints, energy: float = 0.99, device: str | None = None) -> list[list[AngleRow]]:
    """Phase A's update against each window of a later phase: one list of rows per consecutive pair
    (checkpoints[k] → checkpoints[k+1]), as :func:`update_angles` gives for that pair.

    The SF paper's finding is a change over training (task 1's first steps update task 0's subspace, later
    steps do not), which a single B phase averages away. ``checkpoints`` may be an iterator of models or weight
    dicts: each is read once and only two are held at a time. ΔA is decomposed again for every window on purpose:
    keeping its bases for all matrices would hold tens of GB for a 7B model.
    """
    a1, a2 = (m if isinstance(m, dict) else weight_matrices(m) for m in (a1, a2))
    windows, previous = [], None
    for checkpoint in checkpoints:
        current = checkpoint if isinstance(checkpoint, dict) else weight_matrices(checkpoint)
        if previous is not None:
            windows.append(update_angles(a1, a2, previous, current, energy, device))
        previous = current
    if not windows:
        raise ValueError("angles over training need at least two checkpoints of the later phase (one window)")
    return windows


def component_means(rows: list[AngleRow]) -> dict[str, dict[str, float | None]]:
    """Per component, averaged over layers (matrices with an angle only): mean angle, chance angle and their
    difference (negative: nearer A's subspace than a random direction)."""
    out = {}
    for comp in dict.fromkeys(r.component for r in rows):
        mine = [r for r in rows if r.component == comp and np.isfinite(r.mean_angle_deg)]
        angle = float(np.mean([r.mean_angle_deg for r in mine])) if mine else None
        chance = float(np.mean([r.chance_angle_deg for r in mine])) if mine else None
        out[comp] = {"mean_angle_deg": angle, "chance_angle_deg": chance,
                     "below_chance_deg": None if angle is None else chance - angle}
    return out


def csv_cells(row: AngleRow) -> list[str]:
    """A row's values in ``COLUMNS`` order as CSV cells (floats to 6 significant digits; an undefined angle is nan)."""
    return [f"{v:.6g}" if isinstance(v, float) else str(v) for v in (getattr(row, c) for c in COLUMNS)]


def write_angles_csv(rows: list[AngleRow], path: Path) -> None:
    from forgetlab.utils.io import atomic_write_text

    lines = [",".join(COLUMNS)] + [",".join(csv_cells(r)) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_angles_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def angle_matrix(rows: list[AngleRow], field: str = "mean_angle_deg") -> tuple[list[int], list[str], np.ndarray]:
    """One column of the rows (the mean angle) as a (layer x component) grid; NaN where a matrix is absent."""
    layers = sorted({r.layer for r in rows})
    comps = list(dict.fromkeys(r.component for r in rows))
    grid = np.full((len(layers), len(comps)), np.nan)
    for r in rows:
        grid[layers.index(r.layer), comps.index(r.component)] = getattr(r, field)
    return layers, comps, grid
