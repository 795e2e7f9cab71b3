"""Loss landscape on the plane through θ0 spanned by d1 = θ1 − θ0 and d2 = θ2 − θ1 (SF paper's choice).

Directions use *all* floating-point parameters. Options: filter-normalise (Li et al. 2018: each output
unit's slice of each direction tensor rescaled to the norm of the same slice of θ0) and orthogonalise d2
against d1 (Gram–Schmidt, after the normalisation). A trajectory is projected onto the plane by least squares over all parameters:
c = argmin ‖θ_t − θ0 − [d1 d2] c‖, from the 2×2 Gram matrix accumulated tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Params = dict[str, torch.Tensor]


def parameters_of(model: torch.nn.Module) -> Params:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}


def _dot(a: Params, b: Params) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def filter_axes(model: torch.nn.Module) -> dict[str, int]:
    """The axis of each weight that indexes its output units (Li et al.'s filters): 0 for ``nn.Linear``'s
    (out, in), 1 for GPT-2's ``Conv1D``, which stores (in, out); parameters not listed use 0."""
    return {f"{name}.weight" if name else "weight": 1 for name, module in model.named_modules()
            if hasattr(module, "nf") and getattr(module, "weight", None) is not None}


def directions(theta0: Params, theta1: Params, theta2: Params, orthogonalize: bool = False,
               filter_normalize: bool = False, axes: Mapping[str, int] | None = None) -> tuple[Params, Params]:
    """d1 = θ1 − θ0, d2 = θ2 − θ1, optionally filter-normalised (each output unit's slice of a direction
    rescaled to the norm of the same slice of θ0; ``axes`` from :func:`filter_axes`) and then orthogonalised
    (d2 minus its projection on d1, so the axes of the plane are orthogonal; d2's filters then keep their
    normalisation only approximately). Raise ValueError when the two directions do not span a plane."""
    d1 = {n: theta1[n] - theta0[n] for n in theta0}
    d2 = {n: theta2[n] - theta1[n] for n in theta0}
    if filter_normalize:
        d1, d2 = (_filter_normalized(d, theta0, axes or {}) for d in (d1, d2))
    if orthogonalize:
        scale = _dot(d2, d1) / max(_dot(d1, d1), 1e-30)
        d2 = {n: d2[n] - scale * d1[n] for n in d2}
    n1, n2, c = _dot(d1, d1), _dot(d2, d2), _dot(d1, d2)
    if n1 == 0 or n2 == 0 or n1 * n2 - c * c <= 1e-12 * n1 * n2:
        which = "theta1 - theta0 is zero" if n1 == 0 else "theta2 - theta1 is zero" if n2 == 0 else \
            "theta2 - theta1 is parallel to theta1 - theta0"
        raise ValueError(f"the landscape plane is degenerate: {which}; pick three checkpoints that are not on one line")
    return d1, d2


def _filter_normalized(direction: Params, theta: Params, axes: Mapping[str, int]) -> Params:
    out = {}
    for n, d in direction.items():
        if d.dim() <= 1:
            out[n] = torch.zeros_like(d)  # biases and norms are left out, as in Li et al.
            continue
        d_units, t_units = (x.movedim(axes.get(n, 0), 0) for x in (d, theta[n]))
        rows_d = d_units.reshape(d_units.shape[0], -1).norm(dim=1).clamp(min=1e-12)
        rows_t = t_units.reshape(t_units.shape[0], -1).norm(dim=1)
        out[n] = (d_units * (rows_t / rows_d).view(-1, *[1] * (d.dim() - 1))).movedim(0, axes.get(n, 0))
    return out


def project(theta0: Params, d1: Params, d2: Params, points: Iterable[Params]) -> np.ndarray:
    """(n, 2) least-squares coordinates of each θ_t in the plane θ0 + a·d1 + b·d2 (``points`` may be a generator
    that loads one checkpoint at a time)."""
    gram = np.array([[_dot(d1, d1), _dot(d1, d2)], [_dot(d1, d2), _dot(d2, d2)]])
    coords = []
    for theta in points:
        offset = {n: theta[n] - theta0[n] for n in theta0}
        coords.append(np.linalg.solve(gram, np.array([_dot(d1, offset), _dot(d2, offset)])))
    return np.array(coords)


def span_with_margin(values: Sequence[float], share: float = 0.25) -> tuple[float, float]:
    """An axis range holding every value with ``share`` of their extent to spare on each side (half a unit when they
    coincide): where an ``auto`` landscape puts its grid, so the points fall along the trajectory rather than over
    the paper's [−1, 7] × [−1, 12], which a short trajectory fills only a corner of."""
    low, high = float(np.min(values)), float(np.max(values))
    margin = share * (high - low) if high - low > 1e-9 else 0.5
    return low - margin, high + margin


@torch.no_grad()
def set_point(model: torch.nn.Module, theta0: Params, d1: Params, d2: Params, a: float, b: float) -> None:
    for n, p in model.named_parameters():
        if n in theta0:
            p.copy_((theta0[n] + a * d1[n] + b * d2[n]).to(p.dtype))


@dataclass
class Landscape:
    alphas: np.ndarray
    betas: np.ndarray
    losses: dict[str, np.ndarray]   # task -> (len(betas), len(alphas))
    trajectory: np.ndarray | None = None


@torch.no_grad()
def loss_grid(model: torch.nn.Module, theta0: Params, d1: Params, d2: Params, alphas: Sequence[float],
              betas: Sequence[float], losses: dict[str, Callable[[torch.nn.Module], float]],
              progress: bool = False, done: Mapping[str, Sequence[Sequence[float]]] | None = None,
              on_row: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> Landscape:
    """Evaluate every loss function at θ0 + a·d1 + b·d2 for a in alphas, b in betas; restores θ0's weights after.

    A grid takes hours on a CPU, so it can resume: ``done`` holds the losses of the first rows (one per beta) of an
    interrupted grid, which are kept, not recomputed; ``on_row(rows_done, grid)`` is called after each row.
    """
    from tqdm.auto import tqdm

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    grid = {task: np.zeros((len(betas), len(alphas))) for task in losses}
    first = len(next(iter(done.values()))) if done else 0
    for task in grid:
        if first:
            grid[task][:first] = np.asarray(done[task], dtype=float)
    try:
        bar = tqdm(total=len(alphas) * len(betas), initial=first * len(alphas), desc="landscape", disable=not progress,
                   leave=False)
        for j in range(first, len(betas)):
            for i, a in enumerate(alphas):
                set_point(model, theta0, d1, d2, a, betas[j])
                for task, fn in losses.items():
                    grid[task][j, i] = fn(model)
                bar.update(1)
            if on_row is not None:
                on_row(j + 1, grid)
        bar.close()
    finally:
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return Landscape(np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float), grid)


@torch.no_grad()
def dataset_loss(model: torch.nn.Module, data, batch_size: int = 256) -> float:
    """Mean token loss over the labelled tokens of a ``TokenDataset`` (answer tokens for QA data).

    A landscape evaluates this thousands of times, so only the labelled positions are unembedded
    (the body runs once through ``model.base_model``; a 50k-token vocabulary at every position
    otherwise costs as much as the body), sums stay on the device, and CUDA runs under bf16 autocast.
    """
    from forgetlab.train.data import IGNORE

    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings()
    if body is model or head is None:
        raise ValueError(f"dataset_loss needs a causal LM with a base model and an output embedding; got {type(model).__name__}")
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in data.batch(torch.arange(start, min(len(data), start + batch_size))).items()}
            target = batch.pop("labels")[:, 1:]
            keep = target != IGNORE
            hidden = body(**batch).last_hidden_state[:, :-1][keep]
            logits = head(hidden).float()
            total += torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum").double()
            count += int(keep.sum())
    return float(total) / max(1, count)
