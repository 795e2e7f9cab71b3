"""Batched greedy exact match must agree with one plain ``generate`` call per question."""

from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgetlab.eval.exact_match import greedy_exact_match
from forgetlab.models.build import ModelConfig, build_model

EOS, PAD = 1, 0


def reference_exact_match(model, prompts, answers, eos=EOS):
    """Naive reference: unpadded HF generate per question, compare the continuation to answer+eos."""
    exact, first = [], []
    for p, a in zip(prompts, answers):
        target = list(a) + [eos]
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


def greedy_continuations(model, prompts, n):
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                           eos_token_id=None)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_answers_of_different_lengths_in_one_batch_can_all_be_exact(arch):
    """A random model rarely emits eos, so the test above hardly ever sees a true exact match. Here eos is the
    token the model emits most, and each answer is a prompt's own greedy continuation up to that token: answers of
    lengths 1-4 that are exact, decoded in one batch (a row whose target ended must stay decided while longer rows
    continue, and every cached step must sit at the right position)."""
    model = build_model(ModelConfig(architecture=arch, d_model=32, n_layers=2, n_heads=4), 40, PAD, EOS, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (24,), generator=g)]
    conts = greedy_continuations(model, prompts, 5)
    eos = Counter(t for c in conts for t in c[1:]).most_common(1)[0][0]
    answers = [c[:c.index(eos)] if eos in c[1:] and c.index(eos) > 0 else c[:2] for c in conts]
    ref_exact, ref_first = reference_exact_match(model, prompts, answers, eos=eos)
    got = greedy_exact_match(model, prompts, answers, eos_id=eos, pad_id=PAD, batch_size=24)
    assert got.exact == ref_exact and got.first_token == ref_first
    exact_lengths = {len(a) for a, e in zip(answers, got.exact) if e}
    assert len(exact_lengths) >= 2 and max(exact_lengths) >= 2  # several lengths, some decoded over cached steps
    assert not all(got.exact)


def test_left_padding_keeps_learned_absolute_positions():
    """GPT-2 adds a learned embedding of the absolute position: a left-padded row must count its positions from its
    first real token, as an unpadded ``generate`` does, or its logits change (rotary models hide this)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (16,), generator=g)]
    answers = [c[:2] if i % 2 == 0 else torch.randint(3, 40, (2,), generator=g).tolist()
               for i, c in enumerate(greedy_continuations(model, prompts, 2))]
    ref_exact, ref_first = reference_exact_match(model, prompts, answers)
    got = greedy_exact_match(model, prompts, answers, eos_id=EOS, pad_id=PAD, batch_size=16)
    assert got.first_token == ref_first and got.exact == ref_exact
    assert sum(got.first_token) >= 8  # the model's own continuations start right


def test_cached_steps_continue_at_the_next_absolute_position():
    """A model's own 5-token greedy continuation, read as a 4-token answer and its eos (eos = the 5th token, one
    prompt at a time), is an exact match by definition; with GPT-2's learned absolute positions each cached step
    must feed its token at the next position for decoding to reproduce it."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (12,), generator=g)]
    for p, c in zip(prompts, greedy_continuations(model, prompts, 5)):
        res = greedy_exact_match(model, [p], [c[:4]], eos_id=c[4], pad_id=PAD)
        assert res.exact == [True] and res.first_token == [True], (p, c)
