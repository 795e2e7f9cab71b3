"""Exact match by batched greedy generation, and first-token accuracy from the same pass.

A question counts as answered when greedy decoding produces exactly the answer tokens followed by
eos. Prompts are left-padded and decoded together with a key/value cache; a row is decided as soon
as it leaves the answer (or emits eos), and the batch stops when every row is decided, so the cost
is a few cached steps per batch instead of one ``generate`` call per question. Comparing token ids
is exact for word-level tokenizers; for subword tokenizers it assumes the canonical tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import inspect

import torch


@dataclass
class QAResult:
    exact: list[bool]
    first_token: list[bool]

    @property
    def em(self) -> float:
        return sum(self.exact) / max(1, len(self.exact))

    @property
    def first_token_acc(self) -> float:
        return sum(self.first_token) / max(1, len(self.first_token))


@torch.no_grad()
def greedy_exact_match(model: torch.nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                       eos_id: int, pad_id: int, batch_size: int = 256) -> QAResult:
    """Per question: does greedy decoding give ``answer + [eos]``; is its first token right."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    out_exact = [False] * len(prompts)
    out_first = [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        targets = [list(answers[i]) + [eos_id] for i in idx]
        ex, ft = _decide_batch(model, [prompts[i] for i in idx], targets, pad_id, device)
        for j, i in enumerate(idx):
            out_exact[i], out_first[i] = ex[j], ft[j]
    model.train(was_training)
    return QAResult(out_exact, out_first)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), left-padded so every row's last token sits in the last column."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _decide_batch(model, prompts, targets, pad_id, device) -> tuple[list[bool], list[bool]]:
    n = len(prompts)
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    max_len = max(len(t) for t in targets)
    target = torch.full((n, max_len), -1, dtype=torch.long, device=device)
    for i, t in enumerate(targets):
        target[i, : len(t)] = torch.tensor(t)
    lengths = torch.tensor([len(t) for t in targets], device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)  # still matching the target so far
    position = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
    cache_name = cache_argument(model, out)
    first_ok = None
    for k in range(max_len):
        token = out.logits[:, -1].argmax(-1)
        alive &= (token == target[:, k]) | (k >= lengths)
        if k == 0:
            first_ok = alive.clone()
        if not bool((alive & (k + 1 < lengths)).any()):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        position = position[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                    **{cache_name: out[cache_name]})
    return alive.tolist(), first_ok.tolist()


def cache_argument(model: torch.nn.Module, out) -> str:
    """Name of the key/value cache in this transformers version (``cache``, formerly ``past_key_values``)."""
    if "cache" in inspect.signature(type(model).forward).parameters and "cache" in out:
        return "cache"
    return "past_key_values"
