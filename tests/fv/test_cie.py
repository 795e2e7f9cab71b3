"""Mean head activations and the three CIE engines, checked against independent computations."""

import warnings

import pytest
import torch

from forgetlab.fv.cie import causal_indirect_effect, mean_head_activations
from forgetlab.fv.prompts import batches, encode_prompt
from forgetlab.fv.tasks import PromptFormat, counterfactuals, sample_prompts
from forgetlab.models.zoo import TINY_ARCHITECTURES

FMT = PromptFormat()


def clean_and_counterfactual(task, tokenizer, n_clean=6, n_cf=4, shots=3, batch_size=4):
    splits = task.splits(0)
    clean = sample_prompts(splits, n_clean, shots=shots, seed=0)
    cf = counterfactuals(sample_prompts(splits, n_cf, shots=shots, seed=1))
    return (list(batches(tokenizer, clean, FMT, batch_size)), list(batches(tokenizer, cf, FMT, batch_size)), clean, cf)


@pytest.fixture
def no_fallback():
    """Fail if the exact engine leaves its layer-by-layer path for the whole-model one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*layer-by-layer exact CIE path.*")
        yield


@pytest.mark.parametrize("path", ["layered", "whole-model"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_exact_equals_naive(arch, path, make_adapter, peaked, bpe_tokenizer, upper_task, no_fallback):
    a = make_adapter(arch, init_range=0.2, vocab=len(bpe_tokenizer))
    if path == "whole-model":
        a.final_norm = None  # what the engine does for a model whose top it cannot find
    else:
        assert a.final_norm is not None
    clean, cf, _, _ = clean_and_counterfactual(upper_task, bpe_tokenizer)
    cf = peaked(a, cf)
    assert len(cf) == 1 and (cf[0].attention_mask == 0).any(), "one left-padded batch of prompts of different lengths"
    mean = mean_head_activations(a, clean)
    naive = causal_indirect_effect(a, cf, mean, engine="naive")
    assert naive.shape == (4, a.n_layers, a.n_heads) and naive.dtype == torch.float32
    assert naive.abs().max() > 1e-3, "the comparison needs heads with a real effect"
    # 4096: all prompts in one step; 5: one prompt per step (whole-model path: its 12 patches as 5 + 5 + 2 rows);
    # 26: two prompts per step (layered path: 13 rows per prompt; whole-model path: 12)
    for max_rows in (4096, 5, 26):
        exact = causal_indirect_effect(a, cf, mean, engine="exact", max_rows=max_rows)
        assert (exact - naive).abs().max() <= 1e-5, (max_rows, (exact - naive).abs().max())


def test_exact_falls_back_when_the_model_top_is_not_norm_and_unembedding(make_adapter, peaked, bpe_tokenizer,
                                                                           upper_task):
    a = make_adapter("llama", init_range=0.2, vocab=len(bpe_tokenizer))
    clean, cf, _, _ = clean_and_counterfactual(upper_task, bpe_tokenizer)
    cf = peaked(a, cf)
    mean = mean_head_activations(a, clean)
    naive = causal_indirect_effect(a, cf, mean, engine="naive")
    a.final_norm = torch.nn.Identity()  # a wrong guess of the final norm: the self-check must notice
    with pytest.warns(UserWarning, match="does not reproduce the model's output; using the whole-model path"):
        exact = causal_indirect_effect(a, cf, mean, engine="exact", max_rows=7)
    assert (exact - naive).abs().max() <= 1e-5


def test_cie_does_not_depend_on_batching(make_adapter, peaked, bpe_tokenizer, upper_task, no_fallback):
    a = make_adapter("llama", init_range=0.2, vocab=len(bpe_tokenizer))
    clean, one_batch, _, cf_prompts = clean_and_counterfactual(upper_task, bpe_tokenizer)
    one_batch = peaked(a, one_batch)
    mean = mean_head_activations(a, clean)
    together = causal_indirect_effect(a, one_batch, mean, engine="naive")
    targets = one_batch[0].targets
    singles = list(batches(bpe_tokenizer, cf_prompts, FMT, 1))
    for i, b in enumerate(singles):  # same targets, no padding at all
        b.targets[:] = targets[i]
    for engine in ("naive", "exact"):
        alone = causal_indirect_effect(a, singles, mean, engine=engine)
        assert (alone - together).abs().max() <= 1e-5, engine


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gpt_neox"])
def test_mean_head_activations_is_the_per_prompt_average(arch, make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter(arch, vocab=len(bpe_tokenizer))
    prompts = sample_prompts(upper_task.splits(0), 7, shots=3, seed=0)
    got = mean_head_activations(a, batches(bpe_tokenizer, prompts, FMT, batch_size=3))  # 3 + 3 + 1, padded

    last = {}
    handles = [p.register_forward_pre_hook(lambda mod, args, l=l: last.__setitem__(l, args[0][0, -1].clone()))
               for l, p in enumerate(a.o_projs)]
    total = torch.zeros(a.n_layers, a.n_heads * a.head_dim, dtype=torch.float64)
    with torch.no_grad():
        for p in prompts:
            a.model(input_ids=torch.tensor([encode_prompt(bpe_tokenizer, p, FMT)[0]]))
            total += torch.stack([last[l] for l in range(a.n_layers)]).double()
    for h in handles:
        h.remove()
    want = (total / len(prompts)).float().view(a.n_layers, a.n_heads, a.head_dim)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attribution_is_the_derivative_of_the_naive_effect(arch, make_adapter, peaked, bpe_tokenizer, upper_task):
    """For one prompt with head outputs z, naive CIE with the patch z + eps·(mean - z), divided by eps,
    tends to the attribution (mean - z)·dp/dz as eps -> 0 (float64, so the limit is visible)."""
    a = make_adapter(arch, init_range=0.2, vocab=len(bpe_tokenizer))
    a.model.double()
    clean, _, _, cf_prompts = clean_and_counterfactual(upper_task, bpe_tokenizer)
    mean = mean_head_activations(a, clean)
    for b in peaked(a, list(batches(bpe_tokenizer, cf_prompts[:2], FMT, 1))):
        z = mean_head_activations(a, [b])
        attribution = causal_indirect_effect(a, [b], mean, engine="attribution")
        assert attribution.abs().max() > 1e-3
        errors = []
        for eps in (1e-2, 1e-3):
            slope = causal_indirect_effect(a, [b], z + eps * (mean - z), engine="naive") / eps
            errors.append(float((slope - attribution).abs().max() / attribution.abs().max()))
        assert errors[1] < 5e-3 and errors[1] < errors[0], errors


def test_attribution_leaves_no_parameter_gradients(make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter("llama", vocab=len(bpe_tokenizer))
    clean, cf, _, _ = clean_and_counterfactual(upper_task, bpe_tokenizer)
    out = causal_indirect_effect(a, cf, mean_head_activations(a, clean), engine="attribution")
    assert out.shape == (4, a.n_layers, a.n_heads) and torch.isfinite(out).all()
    assert all(p.grad is None for p in a.model.parameters())


def test_trained_model_learned_its_task(trained_llama):
    t = trained_llama
    first, last = sum(t.losses[:10]) / 10, sum(t.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert t.accuracy >= 0.9, t.accuracy


def test_attribution_ranks_heads_like_naive_on_a_trained_model(trained_llama, spearman, no_fallback):
    t = trained_llama
    a, splits = t.adapter, t.task.splits(0)
    clean = sample_prompts(splits, 30, shots=10, seed=0)
    cf = counterfactuals(sample_prompts(splits, 16, shots=10, seed=1))
    mean = mean_head_activations(a, batches(t.tokenizer, clean, t.fmt, 30))
    cf_batches = list(batches(t.tokenizer, cf, t.fmt, 16))
    naive = causal_indirect_effect(a, cf_batches, mean, engine="naive")
    attribution = causal_indirect_effect(a, cf_batches, mean, engine="attribution")
    exact = causal_indirect_effect(a, cf_batches, mean, engine="exact")
    assert naive.mean(0).abs().max() > 1e-2
    assert (exact - naive).abs().max() <= 1e-5
    # Measured 0.86 for this fixture (model seed 0). Not robust: the same recipe with model seeds 1-4 gives
    # 0.99, 0.32, 0.64, 0.65 -- a first-order method misranks the one or two heads with large effects.
    rho = spearman(naive.mean(0), attribution.mean(0))
    assert rho >= 0.7, rho


def test_mean_head_activations_leave_dropout_out(make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter("gpt2", vocab=len(bpe_tokenizer))
    a.model.config.attn_pdrop = a.model.config.resid_pdrop = 0.5
    for module in a.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    clean, _, _, _ = clean_and_counterfactual(upper_task, bpe_tokenizer)
    a.model.eval()
    want = mean_head_activations(a, clean)
    a.model.train()
    torch.manual_seed(1)
    assert torch.equal(mean_head_activations(a, clean), want) and a.model.training  # and handed back as found


def test_exact_engine_refuses_a_sliding_window_shorter_than_the_prompts(make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter("mistral", vocab=len(bpe_tokenizer))
    a.model.config.sliding_window = 4
    clean, cf, _, _ = clean_and_counterfactual(upper_task, bpe_tokenizer)
    mean = mean_head_activations(a, clean)
    assert cf[0].input_ids.shape[1] > 4
    with pytest.raises(ValueError, match="keeps 3 of .* sliding attention window .* engine='naive'"):
        causal_indirect_effect(a, cf, mean, engine="exact")
    assert causal_indirect_effect(a, cf, mean, engine="naive").shape == (4, a.n_layers, a.n_heads)


def test_bad_engine_and_bad_mean_shape(make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter("llama", vocab=len(bpe_tokenizer))
    clean, cf, _, _ = clean_and_counterfactual(upper_task, bpe_tokenizer)
    mean = mean_head_activations(a, clean)
    with pytest.raises(ValueError, match="unknown CIE engine 'fast'; use one of exact, naive, attribution"):
        causal_indirect_effect(a, cf, mean, engine="fast")
    for wrong in (mean[:-1], mean.view(a.n_layers, -1), mean[..., :-1]):
        with pytest.raises(ValueError, match="mean activations have shape .* but the model needs \\(3, 4, 16\\)"):
            causal_indirect_effect(a, cf, wrong, engine="exact")
    with pytest.raises(ValueError, match="no prompts"):
        mean_head_activations(a, [])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cie_equals_a_hand_patched_target_probability_difference(arch, make_adapter, bpe_tokenizer, upper_task,
                                                                  no_fallback):
    """CIE_{l,j} = P(y | cf prompt, head (l,j)'s last-token input to the output projection := clean mean)
    − P(y | cf prompt), as probabilities: computed here one unpadded prompt at a time with a plain hook on
    the model's own attention output projection, so the engines are not only compared with each other.
    The attribution engine is checked against the autograd slope of that same probability."""
    a = make_adapter(arch, init_range=0.2, vocab=len(bpe_tokenizer))
    model, d = a.model, a.head_dim
    out_proj = ([blk.self_attn.o_proj for blk in model.model.layers] if arch == "llama"
                else [blk.attn.c_proj for blk in model.transformer.h])
    splits = upper_task.splits(0)
    clean = [encode_prompt(bpe_tokenizer, p, FMT)[0] for p in sample_prompts(splits, 6, shots=3, seed=0)]
    cf_prompts = counterfactuals(sample_prompts(splits, 4, shots=3, seed=1))
    cf = [encode_prompt(bpe_tokenizer, p, FMT)[0] for p in cf_prompts]

    state = {"read": {}, "patch": None}

    def hook(layer):
        def pre(module, args):
            state["read"][layer] = args[0][0, -1].clone()
            if state["patch"] is not None and state["patch"][0] == layer:
                _, head, value = state["patch"]
                x = args[0].clone()
                x[0, -1, head * d:(head + 1) * d] = value
                return (x,)
        return pre

    def run(ids):
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double()

    handles = [m.register_forward_pre_hook(hook(l)) for l, m in enumerate(out_proj)]
    try:
        with torch.no_grad():
            total = torch.zeros(a.n_layers, a.n_heads * d, dtype=torch.float64)
            for ids in clean:  # clean mean of each head's last-token output
                run(ids)
                total += torch.stack([state["read"][l] for l in range(a.n_layers)]).double()
            mean = (total / len(clean)).float().view(a.n_layers, a.n_heads, d)
            targets = torch.stack([run(ids).argmax() for ids in cf])  # the model's own top token: a real effect
            want = torch.zeros(len(cf), a.n_layers, a.n_heads, dtype=torch.float64)
            for i, ids in enumerate(cf):
                base = torch.softmax(run(ids), -1)[targets[i]]
                for layer in range(a.n_layers):
                    for head in range(a.n_heads):
                        state["patch"] = (layer, head, mean[layer, head])
                        want[i, layer, head] = torch.softmax(run(ids), -1)[targets[i]] - base
                        state["patch"] = None
    finally:
        for h in handles:
            h.remove()
    assert want.abs().max() > 1e-2, "the comparison needs heads with a real effect"
    batch = next(batches(bpe_tokenizer, cf_prompts, FMT, 4))  # one left-padded batch
    assert (batch.attention_mask == 0).any()
    batch.targets[:] = targets
    for engine in ("naive", "exact"):
        got = causal_indirect_effect(a, [batch], mean, engine=engine)
        assert (got.double() - want).abs().max() <= 1e-5, (engine, (got.double() - want).abs().max())

    # attribution: d/dt P(y) at t = 0 for each head's last-token input set to z + t·(mean − z), by autograd
    t = torch.zeros(a.n_layers, a.n_heads, requires_grad=True)

    def blend(layer):
        def pre(module, args):
            x = args[0]
            z = x[0, -1].view(a.n_heads, d).detach()
            last = x[0, -1].view(a.n_heads, d) + t[layer][:, None] * (mean[layer] - z)
            return (torch.cat([x[:, :-1], last.reshape(1, 1, -1)], dim=1),)
        return pre

    handles = [m.register_forward_pre_hook(blend(l)) for l, m in enumerate(out_proj)]
    try:
        slopes = torch.stack([torch.autograd.grad(torch.softmax(run(ids), -1)[targets[i]], t)[0]
                              for i, ids in enumerate(cf)])
    finally:
        for h in handles:
            h.remove()
    got = causal_indirect_effect(a, [batch], mean, engine="attribution")
    assert slopes.abs().max() > 1e-2
    assert (got - slopes).abs().max() <= 1e-5, (got - slopes).abs().max()
