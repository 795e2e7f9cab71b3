"""Continual-learning metrics over a score matrix (pure numpy).

Indexing convention (used by every function here):
    ``R`` has shape ``(T+1, T)``.  Row ``0`` holds the initial model's scores,
    row ``i`` (1..T) the scores after training through task ``i``.  Column
    ``j`` (0-based) is task ``j+1``.  So task ``k`` (1-based) is learned at
    row ``k``, and ``R[k, k-1]`` is its score right after learning it.

Metrics that compare tasks with each other (BWT, FWT, forgetting) need
``T >= 2`` and return ``nan`` for ``T == 1``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "as_score_matrix",
    "acc",
    "avg_incremental_acc",
    "bwt_gem",
    "bwt_trace",
    "fwt",
    "forgetting",
    "ap",
    "fp",
    "forget",
    "general_ability_delta",
    "spurious_share",
    "drop_kept",
    "cl_summary",
]

_EXPECTED = "a finite 2-D score matrix of shape (T+1, T) with T >= 1"


def as_score_matrix(R: ArrayLike) -> np.ndarray:
    """Validate ``R`` and return it as a float array, so bad input fails loudly."""
    try:
        arr = np.asarray(R, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"R: expected {_EXPECTED}, got non-numeric input ({exc})") from None
    if arr.ndim != 2:
        raise ValueError(f"R: expected {_EXPECTED}, got {arr.ndim}-D array of shape {arr.shape}")
    rows, t = arr.shape
    if t < 1 or rows != t + 1:
        raise ValueError(f"R: expected {_EXPECTED}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"R: expected {_EXPECTED}, got non-finite values (nan/inf) in shape {arr.shape}")
    return arr


def _diag(R: np.ndarray) -> np.ndarray:
    """Score of each task right after learning it: R[k, k-1] for k = 1..T."""
    t = R.shape[1]
    return R[np.arange(1, t + 1), np.arange(t)]


def _seen_drop_sum(R: np.ndarray) -> float:
    """Sum over tasks 1..T-1 of (final score - score right after learning)."""
    t = R.shape[1]
    return float(np.sum(R[t, : t - 1] - _diag(R)[: t - 1]))


def acc(R: ArrayLike) -> float:
    """Average accuracy: mean of the final row, ACC = (1/T) sum_j R[T, j]."""
    R = as_score_matrix(R)
    return float(R[-1].mean())


def avg_incremental_acc(R: ArrayLike) -> float:
    """Average incremental accuracy (Rebuffi et al., iCaRL):
    mean over k = 1..T of the mean score on the k tasks seen so far, R[k, :k]."""
    R = as_score_matrix(R)
    t = R.shape[1]
    return float(np.mean([R[k, :k].mean() for k in range(1, t + 1)]))


def bwt_gem(R: ArrayLike) -> float:
    """Backward transfer, GEM variant (Lopez-Paz & Ranzato 2017):
    1/(T-1) sum_{k=1..T-1} (R[T, k-1] - R[k, k-1]).  Negative = forgetting.
    Returns nan for T == 1."""
    R = as_score_matrix(R)
    t = R.shape[1]
    return math.nan if t < 2 else _seen_drop_sum(R) / (t - 1)


def bwt_trace(R: ArrayLike) -> float:
    """Backward transfer, TRACE variant: same sum as :func:`bwt_gem` but
    divided by T instead of T-1, so it equals bwt_gem * (T-1)/T.
    Returns nan for T == 1."""
    R = as_score_matrix(R)
    t = R.shape[1]
    return math.nan if t < 2 else _seen_drop_sum(R) / t


def fwt(R: ArrayLike, b: ArrayLike | None = None) -> float:
    """Forward transfer, GEM variant: 1/(T-1) sum_{k=2..T} (R[k-1, k-1] - b[k-1]),
    i.e. score on task k just *before* training on it minus a baseline.

    The baseline ``b`` (length T, one entry per task; b[0] is unused) defaults
    to the initial model's scores ``R[0]``; pass e.g. random-init scores to
    follow GEM exactly.  Returns nan for T == 1."""
    R = as_score_matrix(R)
    t = R.shape[1]
    if b is None:
        base = R[0]
    else:
        base = np.asarray(b, dtype=float)
        if base.shape != (t,) or not np.all(np.isfinite(base)):
            raise ValueError(f"b: expected finite 1-D baseline of shape ({t},), got shape {base.shape}")
    if t < 2:
        return math.nan
    k = np.arange(1, t)  # 0-based columns of tasks 2..T; pre-training row is also k
    return float(np.mean(R[k, k] - base[k]))


def forgetting(R: ArrayLike) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk):
    1/(T-1) sum_{k=1..T-1} max_{l in k..T-1} (R[l, k-1] - R[T, k-1]).
    The max runs only over rows l >= k (after task k was learned), so a high
    zero-shot score before learning is not counted.  Not clipped at 0.
    Returns nan for T == 1."""
    R = as_score_matrix(R)
    t = R.shape[1]
    if t < 2:
        return math.nan
    per_task = [R[k : t, k - 1].max() - R[t, k - 1] for k in range(1, t)]
    return float(np.mean(per_task))


def ap(R: ArrayLike) -> float:
    """Average performance right after learning each task: mean_k R[k, k-1]."""
    R = as_score_matrix(R)
    return float(_diag(R).mean())


def fp(R: ArrayLike) -> float:
    """Final performance: mean of the last row (same number as :func:`acc`)."""
    return acc(R)


def forget(R: ArrayLike) -> float:
    """AP - FP: how much the average drops from just-learned to final.
    Unlike BWT it includes the last task (which contributes 0)."""
    R = as_score_matrix(R)
    return ap(R) - fp(R)


def general_ability_delta(before: ArrayLike, after: ArrayLike) -> float:
    """Mean over general-ability sets of (G_T - G_0): negative = general skills lost.

    ``before`` holds G_0 (initial model), ``after`` holds G_T (after all tasks);
    both 1-D, same non-zero length, finite."""
    g0 = np.asarray(before, dtype=float)
    gt = np.asarray(after, dtype=float)
    if g0.ndim != 1 or g0.shape != gt.shape or g0.size == 0:
        raise ValueError(
            f"before/after: expected two non-empty 1-D vectors of equal length, got shapes {g0.shape} and {gt.shape}"
        )
    if not (np.all(np.isfinite(g0)) and np.all(np.isfinite(gt))):
        raise ValueError(f"before/after: expected finite values, got nan/inf (shape {g0.shape})")
    return float(np.mean(gt - g0))


def spurious_share(before: float, current: float, recovered: float) -> float:
    """Share of a drop that a short re-alignment brings back:
    (recovered - current) / (before - current).

    1 = the drop was fully "spurious" (recovered), 0 = none recovered.  Not
    clipped: can exceed 1 (recovery overshoots) or be negative (it got worse).
    Returns nan when there is no drop to explain (current within 1e-9 of before, or
    above it: a share of a gain has no meaning, and its sign would read backwards)."""
    drop = float(before) - float(current)
    if drop < 1e-9:
        return math.nan
    return (float(recovered) - float(current)) / drop


def drop_kept(baseline_drop: float, drop: float) -> float:
    """Share of a baseline's drop that a method avoids: (baseline_drop - drop) / baseline_drop, the FV paper's
    "FVG keeps X% of the GP drop of IncLoRA".

    1 = nothing dropped, 0 = the baseline's whole drop, negative = a larger drop, above 1 = a gain. Returns nan
    when the baseline does not drop (baseline_drop below 1e-6, where the float noise of averaged scores lies: two runs'
    equal initial GP differ by 2e-9): there is nothing to keep."""
    if float(baseline_drop) < 1e-6:
        return math.nan
    return (float(baseline_drop) - float(drop)) / float(baseline_drop)


def share_or_none(before: float | None, current: float, recovered: float) -> float | None:
    """:func:`spurious_share` as run results hold it: None (JSON null) when undefined, no ``before`` or no drop, so
    the dict a Python call returns reads the same as the ``results.json`` it writes."""
    share = spurious_share(before, current, recovered) if before is not None else math.nan
    return None if math.isnan(share) else share


def cl_summary(R: ArrayLike) -> dict[str, float]:
    """All matrix metrics in one dict (fwt uses the initial-model baseline R[0])."""
    R = as_score_matrix(R)
    return {
        "acc": acc(R),
        "avg_incremental_acc": avg_incremental_acc(R),
        "bwt_gem": bwt_gem(R),
        "bwt_trace": bwt_trace(R),
        "fwt": fwt(R),
        "forgetting": forgetting(R),
        "ap": ap(R),
        "fp": fp(R),
        "forget": forget(R),
    }
