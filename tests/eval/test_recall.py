"""Teacher-forced span recall against greedy decoding with Hugging Face ``generate``."""

from __future__ import annotations

import random

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgetlab.eval.recall import find_span, span_recall


def test_find_span_needs_one_occurrence_after_the_start() -> None:
    assert find_span([5, 1, 2, 3, 9], [2, 3]) == (2, 4)
    assert find_span([5, 2, 3, 2, 3], [2, 3]) is None  # ambiguous
    assert find_span([2, 3, 7], [2, 3]) is None  # position 0 has no context
    assert find_span([1, 2, 3], [4]) is None


def test_span_recall_equals_greedy_generation() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    rng = random.Random(0)
    sequences, spans = [], []
    for i in range(8):
        prefix = torch.tensor([[rng.randrange(1, 40) for _ in range(3 + i % 3)]])
        seq = model.generate(prefix, max_new_tokens=10 + i, do_sample=False, pad_token_id=0)[0].tolist()
        if i % 2:  # a wrong token: greedy decoding no longer reproduces what follows it
            k = rng.randrange(len(prefix[0]), len(seq) - 3)
            seq[k] = (seq[k] + 7) % 40
        sequences.append(seq)
        spans.append([(s, s + rng.randrange(1, 4)) for s in rng.sample(range(1, len(seq) - 3), 3)])
    got = span_recall(model, sequences, spans, pad_id=0, batch_size=3)
    want = []
    for seq, row in zip(sequences, spans):
        want.append([])
        for start, end in row:
            gen = model.generate(torch.tensor([seq[:start]]), max_new_tokens=end - start, do_sample=False,
                                 pad_token_id=0)[0, start:].tolist()
            want[-1].append(gen == seq[start:end])
    assert got == want
    flat = [x for row in got for x in row]
    assert any(flat) and not all(flat)


def test_recall_items_are_values_named_earlier_in_their_sentence() -> None:
    """A value counts only where its sentence names the person before it (else nothing can predict it)."""
    from forgetlab.experiments.biography import _named_before

    name, period = [7, 8], 0
    # "7 8 was born in 3 . on 4 , 7 8 was born ."
    tokens = [7, 8, 1, 2, 3, period, 5, 4, 6, 7, 8, 1, 9, period]
    assert _named_before(tokens, 4, name, period)  # 3 follows the name in its sentence
    assert not _named_before(tokens, 7, name, period)  # 4 precedes the name in its sentence
    assert not _named_before([1, 7, period, 3], 3, [7], period)  # named only in the previous sentence
