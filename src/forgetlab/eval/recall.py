"""Knowledge recall: does the model still complete its own training text with the right values?

QA exact match needs two things, the stored fact and the alignment that extracts it for a question.
Recall asks for the fact in the format it was learned in (a pretraining biography, values as greedy
continuations of the gold text before them), so it needs no QA alignment: a model that fails the
questions but still completes the biographies has lost the alignment, not the knowledge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def find_span(tokens: Sequence[int], value: Sequence[int]) -> tuple[int, int] | None:
    """[start, end) of the only occurrence of ``value`` in ``tokens`` after position 0, else None."""
    n, m = len(tokens), len(value)
    hits = [i for i in range(1, n - m + 1) if list(tokens[i : i + m]) == list(value)]
    return (hits[0], hits[0] + m) if m and len(hits) == 1 else None


@torch.no_grad()
def span_recall(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                spans: Sequence[Sequence[tuple[int, int]]], *, pad_id: int, batch_size: int = 256) -> list[list[bool]]:
    """Per sequence and span: is every token of the span the argmax given the gold tokens before it.

    That is exactly what greedy decoding from the span's start would produce, for the span's length,
    but costs one teacher-forced pass per batch instead of a decoding loop per span.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[bool]] = []
    for b in range(0, len(sequences), batch_size):
        rows = [list(s) for s in sequences[b : b + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # predicted[t] guesses ids[t + 1]
        right = (predicted[:, :-1] == ids[:, 1:]).cpu()
        for i, row_spans in enumerate(spans[b : b + batch_size]):
            out.append([bool(right[i, start - 1 : end - 1].all()) for start, end in row_spans])
    model.train(was_training)
    return out
