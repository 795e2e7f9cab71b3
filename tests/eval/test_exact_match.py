"""Batched greedy exact match must agree with one plain ``generate`` call per question."""

import pytest
import torch

from forgetlab.eval.exact_match import greedy_exact_match
from forgetlab.models.build import ModelConfig, build_model

EOS, PAD = 1, 0


def reference_exact_match(model, prompts, answers):
    """Naive reference: unpadded HF generate per question, compare the continuation to answer+eos."""
    exact, first = [], []
    for p, a in zip(prompts, answers):
        target = list(a) + [EOS]
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=len(target), do_sample=False, pad_token_id=PAD, eos_token_id=None)
        gen = out[0, len(p):].tolist()
        exact.append(gen[: len(target)] == target)
        first.append(gen[0] == target[0])
    return exact, first


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_batched_matches_per_question_generate(arch):
    model = build_model(ModelConfig(architecture=arch, d_model=32, n_layers=2, n_heads=4), 40, PAD, EOS, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (24,), generator=g)]
    # Answers: half are the model's own greedy continuation (so EM is true), half random (mostly false).
    answers = []
    for i, p in enumerate(prompts):
        if i % 2 == 0:
            out = model.generate(torch.tensor([p]), max_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=None)
            answers.append(out[0, len(p):].tolist())
        else:
            answers.append(torch.randint(3, 40, (2,), generator=g).tolist())
    ref_exact, ref_first = reference_exact_match(model, prompts, answers)
    got = greedy_exact_match(model, prompts, answers, eos_id=EOS, pad_id=PAD, batch_size=7)
    assert got.first_token == ref_first
    assert got.exact == ref_exact
    assert any(got.first_token)


def test_exact_match_requires_eos_after_answer():
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2), 20, PAD, EOS, 2, seed=1)
    prompt = [5, 6, 7]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    a, b = out[0, 3:].tolist()
    res = greedy_exact_match(model, [prompt], [[a]], eos_id=EOS, pad_id=PAD)
    assert res.first_token == [True]
    assert res.exact == [b == EOS]
