"""Replay: mix a sample of earlier tasks' rows into the new task's data.

Rows are sampled without replacement (the reference code sampled with replacement), seeded.
"""

from __future__ import annotations

import torch

from forgetlab.train.data import TokenDataset, concat, subset


def mix_replay(current: TokenDataset, old: TokenDataset, fraction: float, seed: int, pad_id: int) -> TokenDataset:
    """``current`` plus round(fraction * len(current)) distinct rows of ``old`` (all of it at most)."""
    n = min(len(old), round(fraction * len(current)))
    if n == 0:
        return current
    rows = torch.randperm(len(old), generator=torch.Generator().manual_seed(seed))[:n]
    return concat([current, subset(old, rows)], pad_id)
