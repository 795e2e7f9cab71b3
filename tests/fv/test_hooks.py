"""Residual-stream interventions: where the vector lands, gradients, generation and the batched sweep.

The residual stream is read with forward pre-hooks on the next layer (and the final norm) rather
than ``output_hidden_states``: transformers 5 records hidden states with its own forward hooks,
installed on the first such call, so whether they see an edit depends on hook order.
"""

from contextlib import contextmanager

import pytest
import torch

from forgetlab.fv.evaluate import first_token_correct, sweep_layers
from forgetlab.fv.hooks import add_to_residual, edit_head_inputs, function_vector_sweep
from forgetlab.fv.prompts import PromptBatch, batches
from forgetlab.fv.tasks import PromptFormat, sample_prompts


@contextmanager
def residual_inputs(adapter):
    """Record the input of every decoder layer and of the final norm (the last layer's output)."""
    seen = {}
    modules = list(adapter.layers) + [adapter.model.model.norm]

    def record(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, []).append(x.detach().clone())
        return hook
    handles = [m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def random_ids(n_rows=2, length=7, vocab=64, seed=0):
    return torch.randint(3, vocab, (n_rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_vector_is_added_at_the_last_position_of_one_layer_only(layer, make_adapter):
    a = make_adapter("llama", vocab=64)
    ids = random_ids()
    v = torch.randn(a.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), residual_inputs(a) as clean:
        a.model(input_ids=ids)
    with torch.no_grad(), residual_inputs(a) as edited, add_to_residual(a, v, layer, alpha=2.5):
        a.model(input_ids=ids)
    # input of module i is the output of layer i-1; module n_layers is the final norm
    for i in range(a.n_layers + 1):
        before, after = clean[i][0], edited[i][0]
        if i <= layer:
            assert torch.equal(before, after), i  # earlier layers untouched
        elif i == layer + 1:
            assert torch.equal(before[:, :-1], after[:, :-1])
            torch.testing.assert_close(after[:, -1] - before[:, -1], 2.5 * v.expand(2, -1), rtol=0, atol=1e-5)
        else:
            assert torch.equal(before[:, :-1], after[:, :-1])  # causal: only the last position moves
            assert (after[:, -1] - before[:, -1]).abs().max() > 1e-3


def test_rows_restrict_the_edit(make_adapter):
    a = make_adapter("llama", vocab=64)
    ids = random_ids(n_rows=4)
    v = torch.randn(a.hidden_size)
    with torch.no_grad():
        clean = a.model(input_ids=ids).logits
        with add_to_residual(a, v, 1, rows=slice(1, 3)):
            edited = a.model(input_ids=ids).logits
    assert torch.equal(clean[[0, 3]], edited[[0, 3]])
    assert (clean[1:3, -1] - edited[1:3, -1]).abs().max() > 1e-3
    assert torch.equal(clean[1:3, :-1], edited[1:3, :-1])


def test_positions_put_the_vector_at_one_position_per_row(make_adapter):
    """``positions`` (FV guidance: the prompt end of each prompt+answer row) edits row i at positions[i] only: the
    next layer's input differs from the clean one by alpha * v there and nowhere else, not at the other rows' ends."""
    a = make_adapter("llama", vocab=64)
    ids = random_ids(n_rows=3, length=7)
    v = torch.randn(a.hidden_size, generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([1, 4, 6])
    with torch.no_grad(), residual_inputs(a) as clean:
        a.model(input_ids=ids)
    with torch.no_grad(), residual_inputs(a) as edited, add_to_residual(a, v, 1, alpha=-2.0, positions=positions):
        a.model(input_ids=ids)
    diff = edited[2][0] - clean[2][0]  # input of layer 2 = output of layer 1
    want = torch.zeros_like(diff)
    for row, pos in enumerate([1, 4, 6]):
        want[row, pos] = -2.0 * v
    torch.testing.assert_close(diff, want, rtol=0, atol=1e-5)


def test_hooks_are_removed_on_exit_even_after_an_error(make_adapter):
    a = make_adapter("llama", vocab=64)
    with pytest.raises(RuntimeError, match="boom"):
        with add_to_residual(a, torch.ones(a.hidden_size), 0), edit_head_inputs(a, lambda l, x: x * 0):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in a.layers)
    assert all(not p._forward_pre_hooks for p in a.o_projs)


def test_gradients_flow_to_the_vector(make_adapter):
    a = make_adapter("llama", vocab=64)
    ids = random_ids()
    v = torch.zeros(a.hidden_size, requires_grad=True)
    with add_to_residual(a, v, 1, alpha=0.5):
        logp = torch.log_softmax(a.model(input_ids=ids).logits[:, -1], -1)[:, 5].sum()
    logp.backward()
    assert v.grad is not None and v.grad.abs().max() > 0
    # d logp / d v = alpha * (d logp / d residual at the last position): check one coordinate numerically
    eps, i = 1e-2, int(v.grad.abs().argmax())
    bump = torch.zeros(a.hidden_size)
    bump[i] = eps
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            with add_to_residual(a, sign * bump, 1, alpha=0.5):
                values.append(torch.log_softmax(a.model(input_ids=ids).logits[:, -1], -1)[:, 5].sum())
    assert float((values[0] - values[1]) / (2 * eps)) == pytest.approx(float(v.grad[i]), rel=1e-2)


def test_the_vector_is_added_at_every_generated_step(make_adapter):
    a = make_adapter("llama", vocab=64)
    ids = random_ids(n_rows=1, length=5)
    v = torch.randn(a.hidden_size) * 3
    before, after = [], []
    pre = a.layers[1].register_forward_hook(lambda m, args, out: before.append((out[0] if isinstance(out, tuple) else out).clone()))
    with add_to_residual(a, v, 1):
        post = a.layers[1].register_forward_hook(lambda m, args, out: after.append((out[0] if isinstance(out, tuple) else out).clone()))
        with torch.no_grad():
            out = a.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   pad_token_id=2)
        post.remove()
    pre.remove()
    assert out.shape[1] == 5 + 4
    assert [x.shape[1] for x in after] == [5, 1, 1, 1]  # the prompt, then one cached token per step
    for b, c in zip(before, after):
        torch.testing.assert_close(c[:, -1] - b[:, -1], v[None], rtol=0, atol=1e-5)
        assert torch.equal(b[:, :-1], c[:, :-1])
    # and it changes what is generated, compared with no vector
    with torch.no_grad():
        plain = a.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=2)
        with add_to_residual(a, v * 10, 1):
            pushed = a.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                      do_sample=False, pad_token_id=2)
    assert not torch.equal(plain, pushed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_sweep_matches_one_layer_at_a_time(arch, make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter(arch, init_range=0.2, vocab=len(bpe_tokenizer))
    prompts = [p.zero_shot() for p in sample_prompts(upper_task.splits(0), 5, shots=0, seed=0)]
    batch_list = list(batches(bpe_tokenizer, prompts, PromptFormat(), batch_size=3))  # 3 + 2, left-padded
    v = torch.randn(a.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    layers = list(range(a.n_layers))

    # one layer at a time, by hand
    looped_logits, looped_pred = {}, {}
    with torch.no_grad():
        for layer in layers:
            with add_to_residual(a, v, layer):
                logits = [a.model(**b.model_inputs()).logits[:, -1] for b in batch_list]
            looped_logits[layer] = torch.cat(logits)
            looped_pred[layer] = looped_logits[layer].argmax(-1)
    assert len({tuple(p.tolist()) for p in looped_pred.values()}) > 1, "the layers must disagree for a real test"

    # the raw batched context: copy i of the batch gets the vector at layers[i]
    b = batch_list[0]
    n = len(b)
    rep = PromptBatch(b.input_ids.repeat(len(layers), 1), b.attention_mask.repeat(len(layers), 1), b.targets.repeat(len(layers)))
    with torch.no_grad(), function_vector_sweep(a, v, layers, batch_rows=n):
        swept = a.model(**rep.model_inputs()).logits[:, -1].view(len(layers), n, -1)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(swept[i], looped_logits[layer][:n], rtol=1e-4, atol=1e-4)

    # sweep_layers' accuracies, with targets that make each layer score differently
    targets = looped_pred[layers[0]]
    retargeted, start = [], 0
    for b in batch_list:
        retargeted.append(PromptBatch(b.input_ids, b.attention_mask, targets[start:start + len(b)]))
        start += len(b)
    want = [float((looped_pred[layer] == targets).float().mean()) for layer in layers]
    for per_pass in (1, 2, 8):  # 2 layers per pass: groups of 2 + 1
        assert sweep_layers(a, retargeted, v, layers, layers_per_pass=per_pass) == pytest.approx(want)
    assert want[0] == 1.0 and min(want) < 1.0
    # without a vector nothing is added: first_token_correct agrees with a plain argmax
    plain = torch.cat([first_token_correct(a, b) for b in retargeted])
    with torch.no_grad():
        manual = torch.cat([a.model(**b.model_inputs()).logits[:, -1].argmax(-1) == b.targets for b in retargeted])
    assert torch.equal(plain, manual)


@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_layer_out_of_range(layer, make_adapter):
    a = make_adapter("llama", vocab=64)
    with pytest.raises(ValueError, match=r"layer .* is out of range; the model has layers 0..2"):
        with add_to_residual(a, torch.zeros(a.hidden_size), layer):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with function_vector_sweep(a, torch.zeros(a.hidden_size), [0, layer], batch_rows=1):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with edit_head_inputs(a, lambda l, x: None, layers=[0, layer]):
            pass
    assert all(not layer._forward_hooks for layer in a.layers)
    assert all(not p._forward_pre_hooks for p in a.o_projs)  # layer 0's hook did not stay behind
