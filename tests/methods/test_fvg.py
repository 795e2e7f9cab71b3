"""FV-guided training terms: head capture, the cached frozen side, and the losses, against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from forgetlab.fv.hooks import add_to_residual
from forgetlab.fv.prompts import collate
from forgetlab.methods.fvg import build_teacher_cache, capture_heads, fv_consistency, fvg_kl, fvg_terms
from forgetlab.models.adapter import adapt
from forgetlab.models.zoo import TINY_ARCHITECTURES, random_model, tiny_config

HEADS = [(1, 2), (0, 1), (2, 3)]


@pytest.fixture(scope="module")
def setup():
    model = random_model(tiny_config("llama", 60, n_layers=3))
    adapter = adapt(model)
    g = torch.Generator().manual_seed(0)
    encoded = [(torch.randint(3, 60, (n,), generator=g).tolist(), 5) for n in (7, 9, 6, 8)]
    return model, adapter, collate(encoded, pad_id=2)


def test_capture_reads_the_heads_at_the_given_positions(setup):
    model, adapter, batch = setup
    d = adapter.head_dim
    seen = {}
    hooks = [adapter.o_projs[l].register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].detach()))
             for l in range(adapter.n_layers)]
    positions = torch.tensor([3, 5, 8, 2])
    with capture_heads(adapter, HEADS, positions) as got:
        model(**batch.model_inputs())
    for h in hooks:
        h.remove()
    for k, (layer, head) in enumerate(HEADS):
        expected = seen[layer][torch.arange(4), positions, head * d:(head + 1) * d]
        assert torch.allclose(got["heads"][:, k], expected)


def test_gradients_flow_through_the_captured_heads(setup):
    model, adapter, batch = setup
    with capture_heads(adapter, HEADS) as got:
        model(**batch.model_inputs())
    got["heads"].pow(2).sum().backward()
    q_grad = adapter.layers[0].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_teacher_cache_equals_direct_frozen_passes(setup):
    model, adapter, batch = setup
    vector = torch.randn(adapter.hidden_size)
    cache = build_teacher_cache(adapter, [batch], vector, layer=1, heads=HEADS, alpha=2.0)
    with torch.no_grad(), add_to_residual(adapter, vector, 1, 2.0):
        steered = model(**batch.model_inputs()).logits[:, -1]
    assert torch.allclose(cache.logits, steered, atol=1e-5)
    with torch.no_grad(), capture_heads(adapter, HEADS) as got:
        model(**batch.model_inputs())
    assert torch.allclose(cache.heads, got["heads"], atol=1e-6)
    # the steering really changed the output
    with torch.no_grad():
        plain = model(**batch.model_inputs()).logits[:, -1]
    assert not torch.allclose(plain, steered, atol=1e-3)


def test_teacher_agreement_with_the_labels_row_by_row(setup):
    from forgetlab.fv.prompts import PromptBatch

    model, adapter, batch = setup
    vector = torch.randn(adapter.hidden_size)
    with torch.no_grad():
        plain = model(**batch.model_inputs()).logits[:, -1]
        with add_to_residual(adapter, vector, 1, 2.0):
            steered = model(**batch.model_inputs()).logits[:, -1]
    # rows 0 and 1 answer with the frozen model's top token, rows 2 and 3 with its least likely one
    targets = torch.cat([plain[:2].argmax(-1), plain[2:].argmin(-1)])
    cache = build_teacher_cache(adapter, [PromptBatch(batch.input_ids, batch.attention_mask, targets)], vector,
                                layer=1, heads=HEADS, alpha=2.0)
    assert cache.agreement["frozen_top1"] == 0.5
    for name, logits in (("frozen", plain), ("frozen_fv", steered)):
        top1 = sum(int(row.argmax()) == int(t) for row, t in zip(logits, targets)) / 4
        p = sum(math.exp(float(row[t] - torch.logsumexp(row, 0))) for row, t in zip(logits, targets)) / 4
        assert cache.agreement[f"{name}_top1"] == pytest.approx(top1)
        assert cache.agreement[f"{name}_p_answer"] == pytest.approx(p, rel=1e-4)
    unknown = PromptBatch(batch.input_ids, batch.attention_mask, torch.full((4,), -1))
    assert build_teacher_cache(adapter, [unknown], vector, layer=1, heads=HEADS).agreement is None


def test_losses_by_hand(setup):
    current = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    frozen = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # head 0: mean((0, 2)²) = 2; head 1: mean((-1, -1)²) = 1 -> 3
    assert fv_consistency(current, frozen).item() == pytest.approx(3.0)
    model, adapter, batch = setup
    vector = torch.randn(adapter.hidden_size)
    cache = build_teacher_cache(adapter, [batch], vector, layer=0, heads=HEADS)
    rows = torch.tensor([2, 0])
    logits = torch.randn(2, 60)
    heads = torch.randn(2, 3, adapter.head_dim)
    for temperature in (2.0, 1.0):
        l_fv, l_kl = fvg_terms(logits, heads, cache, rows, temperature=temperature)
        assert l_fv.item() == pytest.approx(fv_consistency(heads, cache.heads[rows]).item())
        assert l_kl.item() == pytest.approx(fvg_kl(logits, cache.logits[rows], temperature).item())


def test_fvg_kl_is_the_papers_kl():
    # two classes by hand: student (1/2, 1/2) at T = 1, teacher (3/4, 1/4): KL(student ‖ teacher)
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.log(torch.tensor([[3.0, 1.0]]))
    hand = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert fvg_kl(student, teacher, 1.0).item() == pytest.approx(hand)
    # the paper's code: F.kl_div(log_softmax(teacher / T), softmax(student / T), reduction="batchmean"), no T²
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    reference = F.kl_div(F.log_softmax(t / 2, -1), F.softmax(s / 2, -1), reduction="batchmean")
    assert fvg_kl(s, t, 2.0).item() == pytest.approx(reference.item(), rel=1e-6)
    assert fvg_kl(s, t, 2.0, n_rows=2).item() == pytest.approx(reference.item() * 5 / 2, rel=1e-6)  # row sums
    assert fvg_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_answer_kl_sums_over_a_rows_answer_tokens_and_skips_replayed_rows():
    from forgetlab.methods.fvg import FVGConfig, FVGuidance

    g = torch.Generator().manual_seed(1)
    I = -100
    labels = torch.tensor([[I, I, I, 7, 8, I], [I, I, 4, 5, 6, I], [I, I, I, I, 9, I]])  # row 2: replayed
    logits = torch.randn(3, 6, 10, generator=g)
    guide = FVGuidance.__new__(FVGuidance)
    guide.cfg = FVGConfig(temperature=2.0)
    guide.answers = [torch.randn(2, 10, generator=g), torch.randn(3, 10, generator=g)]  # rows 0 and 1 of the task
    rows, mine = torch.tensor([0, 1, 5]), torch.tensor([True, True, False])

    def kl(a, b):  # KL(softmax(a/2) ‖ softmax(b/2)) of one position, by hand
        p, q = F.softmax(a / 2, -1), F.softmax(b / 2, -1)
        return float((p * (p / q).log()).sum())
    # logits at position i predict the label at i + 1
    hand = (kl(logits[0, 2], guide.answers[0][0]) + kl(logits[0, 3], guide.answers[0][1])
            + sum(kl(logits[1, 1 + j], guide.answers[1][j]) for j in range(3))) / 2
    assert guide.answer_kl(logits, labels, rows, mine).item() == pytest.approx(hand, rel=1e-5)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers (8 significant bits) at each value of ``x``."""
    _, exponent = torch.frexp(x.float())  # x = m · 2^e with 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def test_answer_logits_cache_steers_at_the_prompt_end_and_keeps_answer_tokens_only(setup):
    """Every cached answer position against a single unpadded prompt+answer pass with the FV added at the prompt
    end only, rounded to bf16 like the cache: equal within one bf16 ulp (plus float32 noise of the batched,
    right-padded pass). The FV is small (norm about that of the residual stream at layer 1), so the edit is not
    swamped by RMSNorm and a wrong alpha, layer or position lands thousands of ulps away."""
    from forgetlab.methods.fvg import answer_logits_cache
    from forgetlab.train.data import qa_dataset

    model, adapter, _ = setup
    prompts, answers = [[5, 6, 7, 8], [9, 10, 11]], [[12, 13], [14, 15, 16]]
    data = qa_dataset(prompts, answers, eos_id=1, pad_id=2)
    vector = 0.02 * torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(4))
    cache = answer_logits_cache(adapter, data, torch.tensor([4, 3]), vector, layer=1, alpha=2.0)
    assert [c.shape[0] for c in cache] == [3, 4]  # answer tokens + eos of each row
    assert all(c.dtype == torch.bfloat16 for c in cache)

    def reference(prompt, answer, alpha=2.0, layer=1, at=None):
        """Logits predicting each answer token and the eos, from the row alone, the FV at position ``at``."""
        row = torch.tensor([prompt + answer + [1]])
        where = torch.tensor([len(prompt) - 1 if at is None else at])
        with torch.no_grad(), add_to_residual(adapter, vector, layer, alpha, positions=where):
            return model(input_ids=row).logits[0, len(prompt) - 1:-1].to(torch.bfloat16)

    def within_one_ulp(cached, ref):
        return ((cached.float() - ref.float()).abs() <= _bf16_ulp(ref) + 1e-6).all()

    for prompt, answer, cached in zip(prompts, answers, cache):
        assert within_one_ulp(cached, reference(prompt, answer))
        # the tolerance is tight enough to catch the edit with the wrong strength, layer or position
        assert not within_one_ulp(cached, reference(prompt, answer, alpha=1.0))
        assert not within_one_ulp(cached, reference(prompt, answer, layer=2))
        assert not within_one_ulp(cached, reference(prompt, answer, at=len(prompt)))  # at the first answer token


def _shift_task():
    """A word-shift task on a tiny random Llama: tokenizer, adapter, the task's pairs, six training prompts."""
    from forgetlab.models.tokenizers import build_word_tokenizer

    words = [f"w{i}" for i in range(24)]
    tok = build_word_tokenizer(words + ["Q", "A", ":"])
    adapter = adapt(random_model(tiny_config("llama", len(tok), n_layers=3), seed=1))
    pairs = [(words[i], words[(i + 1) % 24]) for i in range(24)]
    prompts = [tok(f"Q: {x}\nA:")["input_ids"] for x, _ in pairs[:6]]
    return tok, adapter, pairs, prompts


def test_guidance_steers_its_teacher_with_the_configured_scale():
    from forgetlab.eval.exact_match import left_pad
    from forgetlab.fv.prompts import PromptBatch
    from forgetlab.methods.fvg import FVGConfig, FVGuidance
    from forgetlab.models.tokenizers import pad_id

    tok, adapter, pairs, prompts = _shift_task()
    cfg = FVGConfig(layer=1, scale=3.0, top_k=4, shots=3, n_prompts=4)
    guide = FVGuidance(adapter, tok, "shift", pairs, prompts, cfg)
    ids, mask = left_pad(prompts, pad_id(tok))
    batch = PromptBatch(ids, mask, torch.zeros(len(ids), dtype=torch.long))
    by_hand = build_teacher_cache(adapter, [batch], guide.fv.vector, 1, guide.heads, alpha=3.0)
    assert torch.allclose(guide.cache.logits, by_hand.logits, atol=1e-5)
    once = build_teacher_cache(adapter, [batch], guide.fv.vector, 1, guide.heads, alpha=1.0)
    assert not torch.allclose(guide.cache.logits, once.logits, atol=1e-4)


def test_guidance_loss_reads_each_row_at_its_prompt_end_and_skips_replayed_rows():
    """The terms of a training batch, by hand: heads read by an own hook on W_O's input and logits taken at each
    row's last prompt token (rows are right-padded, prompts of different lengths); a replayed row adds nothing."""
    from forgetlab.methods.fvg import FVGConfig, FVGuidance
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.train.data import qa_dataset

    tok, adapter, pairs, prompts = _shift_task()
    prompts[2] = prompts[2] + tok("w5 w6")["input_ids"][-2:]  # a longer prompt, so the rows' prompt ends differ
    answers = [tok(y)["input_ids"][-1:] for _, y in pairs[:6]]
    data = qa_dataset(prompts, answers, eos_id=tok.eos_token_id, pad_id=pad_id(tok))
    cfg = FVGConfig(layer=1, alpha_fv=0.5, alpha_kl=3.0, temperature=1.5, top_k=4, shots=3, n_prompts=4)
    guide = FVGuidance(adapter, tok, "shift", pairs, prompts, cfg, train_data=data)
    model, d = adapter.model, adapter.head_dim
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained for a while: the student now differs from the frozen teacher
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    pick = [2, 0, 1]                   # the batch: task rows 2 and 0, and row 1's text replayed as an old task's row
    rows = torch.tensor([2, 0, len(prompts)])
    batch = {"input_ids": data.input_ids[pick], "attention_mask": data.attention_mask[pick], "labels": data.labels[pick]}

    def forward():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    terms = guide.loss(adapter, rows, batch, forward)
    seen = {}
    hooks = [adapter.o_projs[l].register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].detach()))
             for l in range(adapter.n_layers)]
    with torch.no_grad():
        logits = forward().logits
    for h in hooks:
        h.remove()
    ends = [len(prompts[2]) - 1, len(prompts[0]) - 1]
    heads = torch.stack([torch.stack([seen[l][i, p, h * d:(h + 1) * d] for l, h in guide.heads])
                         for i, p in enumerate(ends)])
    at_end = torch.stack([logits[i, p] for i, p in enumerate(ends)])
    task_rows = torch.tensor([2, 0])
    assert terms["fv"].item() > 1e-4 and terms["kl"].item() > 1e-4
    assert terms["fv"].item() == pytest.approx(0.5 * fv_consistency(heads, guide.cache.heads[task_rows]).item(), rel=1e-4)
    assert terms["kl"].item() == pytest.approx(3.0 * fvg_kl(at_end, guide.cache.logits[task_rows], 1.5).item(), rel=1e-4)
    only_replayed = guide.loss(adapter, torch.tensor([len(prompts)]), {k: v[2:] for k, v in batch.items()},
                               lambda: model(input_ids=batch["input_ids"][2:]))
    assert only_replayed["fv"].item() == 0.0 and only_replayed["kl"].item() == 0.0


def test_guidance_agreement_scores_the_first_answer_token_of_each_row():
    """The KL target's agreement with the labels, by hand from single unpadded prompt passes of the frozen model
    (plain, and with the FV at the prompt end): the label is the first answer token of each right-padded
    training row, not the last prompt token or the eos after it. Answers are picked so that some rows hit
    the plain top token, some the steered one and some the least likely token, and prompt lengths differ."""
    from forgetlab.methods.fvg import FVGConfig, FVGuidance, task_function_vector
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.train.data import qa_dataset

    tok, adapter, pairs, prompts = _shift_task()
    prompts[2] = prompts[2] + tok("w5 w6")["input_ids"][-2:]
    cfg = FVGConfig(layer=1, scale=2.0, top_k=4, shots=3, n_prompts=4)
    fv = task_function_vector(adapter, tok, "shift", pairs, cfg)
    plain, steered = [], []
    with torch.no_grad():
        for prompt in prompts:
            plain.append(adapter.model(input_ids=torch.tensor([prompt])).logits[0, -1])
            with add_to_residual(adapter, fv.vector, 1, 2.0):
                steered.append(adapter.model(input_ids=torch.tensor([prompt])).logits[0, -1])
    firsts = [int(plain[0].argmax()), int(plain[1].argmax()), int(steered[2].argmax()), int(steered[3].argmax()),
              int(plain[4].argmin()), int(plain[5].argmin())]
    data = qa_dataset(prompts, [[t] for t in firsts], eos_id=tok.eos_token_id, pad_id=pad_id(tok))
    guide = FVGuidance(adapter, tok, "shift", pairs, prompts, cfg, train_data=data, fv=fv)
    for name, logits in (("frozen", plain), ("frozen_fv", steered)):
        top1 = sum(int(row.argmax()) == t for row, t in zip(logits, firsts)) / 6
        p = sum(float(row.float().softmax(-1)[t]) for row, t in zip(logits, firsts)) / 6
        assert 2 / 6 <= top1 <= 4 / 6  # rows 0-3 can hit, rows 4 and 5 cannot: the check is informative
        assert guide.cache.agreement[f"{name}_top1"] == pytest.approx(top1)
        assert guide.cache.agreement[f"{name}_p_answer"] == pytest.approx(p, rel=1e-4)


LORA_TARGETS = {"gpt2": ("c_attn",), "gpt_neox": ("query_key_value",)}  # fused projections; the rest name q and v


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_fvg_terms_on_a_lora_model_of_every_architecture(arch):
    """On a fresh LoRA model (B = 0, no dropout) the student is the frozen model: L_FV is 0, L_KL is the KL from
    the plain to the FV-steered logits of two direct passes, and the gradient reaches the adapters only (GPT-2's
    fused Conv1D, NeoX's fused qkv, GPT-J's parallel block, GQA)."""
    from forgetlab.models.lora import wrap_lora

    torch.manual_seed(0)
    model = random_model(tiny_config(arch, 60, n_layers=3))
    g = torch.Generator().manual_seed(1)
    encoded = [(torch.randint(3, 60, (n,), generator=g).tolist(), 5) for n in (7, 9, 6, 8)]
    batch = collate(encoded, pad_id=2)
    heads, layer = [(2, 0), (1, 1), (0, 0)], 1
    vector = 3 * torch.randn(adapt(model).hidden_size, generator=g)
    cache = build_teacher_cache(adapt(model), [batch], vector, layer=layer, heads=heads, alpha=2.0)
    with torch.no_grad():
        plain = model(**batch.model_inputs()).logits[:, -1]
        with add_to_residual(adapt(model), vector, layer, 2.0):
            steered = model(**batch.model_inputs()).logits[:, -1]
    student = wrap_lora(model, LORA_TARGETS.get(arch, ("q_proj", "v_proj")), dropout=0.0)
    adapter = adapt(student)
    rows = torch.tensor([3, 1])
    picked = {k: v[rows] for k, v in batch.model_inputs().items()}
    with capture_heads(adapter, heads) as got:
        logits = student(**picked).logits[:, -1]
    l_fv, l_kl = fvg_terms(logits, got["heads"], cache, rows, temperature=2.0)
    assert l_fv.item() == pytest.approx(0.0, abs=1e-10)
    p, q = F.log_softmax(steered[rows] / 2, -1), F.log_softmax(plain[rows] / 2, -1)
    by_hand = (q.exp() * (q - p)).sum(-1).mean()
    assert l_kl.item() == pytest.approx(by_hand.item(), rel=1e-4) and l_kl.item() > 1e-4
    (l_fv + l_kl).backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
