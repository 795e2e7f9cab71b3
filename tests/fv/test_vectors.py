"""Top heads, universal heads, function vectors (against the weights read by hand) and cosine."""

import math

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from forgetlab.fv.vectors import cosine, function_vector, top_heads, universal_heads
from forgetlab.models.adapter import adapt


def test_top_heads_on_a_hand_matrix():
    cie = torch.tensor([[0.1, 0.5, -0.2],
                        [0.3, -1.0, 0.7]])
    assert top_heads(cie, k=1) == [(1, 2)]
    assert top_heads(cie, k=4) == [(1, 2), (0, 1), (1, 0), (0, 0)]
    assert top_heads(cie, k=6)[-1] == (1, 1)


def test_top_heads_ties_keep_layer_then_head_order():
    assert top_heads(torch.zeros(2, 2), k=4) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_top_heads_average_over_prompts():
    per_prompt = torch.tensor([[[1.0, 0.0]],      # prompt 0 prefers head 0
                               [[-0.8, 0.3]],     # prompt 1 prefers head 1
                               [[0.0, 0.3]]])
    # mean: head 0 -> 0.0667, head 1 -> 0.2; the first prompt alone would give the opposite order
    assert top_heads(per_prompt, k=2) == [(0, 1), (0, 0)]


@pytest.mark.parametrize("k", [0, -1, 7])
def test_top_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"top-k=.* is out of range: the model has 6 heads \(2 layers x 3\); choose 1..6"):
        top_heads(torch.zeros(2, 3), k=k)


def test_universal_heads_weight_tasks_equally():
    task_a = torch.tensor([[[1.0, 0.0]]])                 # one prompt: head 0 = 1.0
    task_b = torch.tensor([[[0.0, 0.8]]] * 5)              # five prompts: head 1 = 0.8
    # per-task means averaged: head 0 -> 0.5, head 1 -> 0.4 (pooling the 6 prompts would give 0.17 vs 0.67)
    assert universal_heads([task_a, task_b], k=2) == [(0, 0), (0, 1)]
    # (L, H) matrices work too and give the same answer
    assert universal_heads([task_a.mean(0), task_b.mean(0)], k=2) == [(0, 0), (0, 1)]
    with pytest.raises(ValueError, match="at least one task"):
        universal_heads([], k=1)


def _w_o_slice(proj, j: int, d: int) -> torch.Tensor:
    """The (hidden, head_dim) block of W_O that head j writes through, read from the weights."""
    if isinstance(proj, Conv1D):
        return proj.weight[j * d:(j + 1) * d, :].T            # (in, out) storage
    if isinstance(proj, peft.tuners.lora.LoraLayer):
        base = proj.base_layer.weight
        A, B = proj.lora_A["default"].weight, proj.lora_B["default"].weight
        return (base + proj.scaling["default"] * B @ A)[:, j * d:(j + 1) * d]
    return proj.weight[:, j * d:(j + 1) * d]                  # (out, in) storage


HEADS = [(0, 1), (2, 3), (0, 2), (1, 0)]  # two heads in layer 0, unsorted


@pytest.mark.parametrize("arch, lora_targets", [("llama", None), ("gpt2", None), ("llama", ["q_proj", "o_proj"])])
def test_function_vector_is_the_sum_of_head_contributions(arch, lora_targets, make_adapter):
    a = make_adapter(arch, vocab=64)
    with torch.no_grad():  # nonzero biases: the vector must not include them
        for name, p in a.model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    if lora_targets:
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=lora_targets, init_lora_weights=False)
        a = adapt(peft.get_peft_model(a.model, config))
    d = a.head_dim
    mean = torch.randn(a.n_layers, a.n_heads, d, generator=torch.Generator().manual_seed(0))
    want = torch.zeros(a.hidden_size, dtype=torch.float64)
    for l, j in HEADS:
        want += _w_o_slice(a.o_projs[l], j, d).double() @ mean[l, j].double()
    got = function_vector(a, mean, HEADS)
    assert got.shape == (a.hidden_size,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # one head alone, and order of heads does not matter
    l, j = HEADS[1]
    torch.testing.assert_close(function_vector(a, mean, [(l, j)]).double(),
                               _w_o_slice(a.o_projs[l], j, d).double() @ mean[l, j].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(function_vector(a, mean, HEADS[::-1]), got)
    assert function_vector(a, mean, []).abs().max() == 0


def test_cosine_on_hand_vectors():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-2.0, -4.0, -6.0])) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0, abs=1e-12)
    assert cosine(torch.tensor([[3.0, 4.0]]), torch.tensor([4.0, 3.0])) == pytest.approx(24 / 25)
    assert isinstance(cosine(torch.ones(3), torch.ones(3)), float)
