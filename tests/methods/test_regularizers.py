"""Baseline loss terms against hand computations."""

import math

import pytest
import torch

from forgetlab.methods.regularizers import diagonal_fisher, distillation_kl, ewc_penalty, lora_orthogonality, lwf_loss
from forgetlab.models.zoo import random_model, tiny_config


class Linear1(torch.nn.Module):
    """loss = mean((w·x − y)²): gradient 2·mean((w·x − y)·x) is known in closed form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, x, labels):
        return type("Out", (), {"loss": ((x @ self.w - labels) ** 2).mean()})()


def test_fisher_is_the_mean_squared_gradient():
    model = Linear1()
    batches = [{"x": torch.tensor([[1.0, 2.0]]), "labels": torch.tensor([0.0])},
               {"x": torch.tensor([[0.0, 1.0]]), "labels": torch.tensor([1.0])}]
    fisher = diagonal_fisher(model, batches)
    w = model.w.detach()
    grads = [2 * (b["x"][0] @ w - b["labels"][0]) * b["x"][0] for b in batches]
    assert torch.allclose(fisher["w"], (grads[0] ** 2 + grads[1] ** 2) / 2)
    assert model.w.grad is None
    # one batch of both rows: still the mean of the per-example squares, not the square of the batch gradient
    together = diagonal_fisher(model, [{"x": torch.cat([b["x"] for b in batches]),
                                        "labels": torch.cat([b["labels"] for b in batches])}])
    assert torch.allclose(together["w"], fisher["w"])
    assert not torch.allclose(together["w"], ((grads[0] + grads[1]) / 2) ** 2)


def test_ewc_penalty_by_hand():
    model = Linear1()  # θ = (0.5, −1)
    fisher = {"w": torch.tensor([2.0, 0.5])}
    anchor = {"w": torch.tensor([0.0, 0.0])}
    # 0.5 * 3 * (2*0.25 + 0.5*1) = 1.5
    assert ewc_penalty(model, fisher, anchor, strength=3.0).item() == pytest.approx(1.5)
    ewc_penalty(model, fisher, anchor, 1.0).backward()
    assert torch.allclose(model.w.grad, fisher["w"] * model.w.detach())  # d/dθ = F (θ − θ*)
    # a nonzero anchor θ* = (1, 1): θ − θ* = (−0.5, −2), so 0.5 * 3 * (2*0.25 + 0.5*4) = 3.75
    anchor = {"w": torch.tensor([1.0, 1.0])}
    assert ewc_penalty(model, fisher, anchor, strength=3.0).item() == pytest.approx(3.75)
    model.w.grad = None
    ewc_penalty(model, fisher, anchor, 1.0).backward()
    assert torch.allclose(model.w.grad, torch.tensor([2.0 * -0.5, 0.5 * -2.0]))


def test_distillation_kl_by_hand_and_masking():
    teacher = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])  # p = (1/4, 3/4) and (1/2, 1/2), T = 1
    student = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
    kl_first = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_kl(student, teacher, temperature=1.0).item() == pytest.approx(kl_first / 2)
    mask = torch.tensor([[True], [False]])
    assert distillation_kl(student, teacher, mask, temperature=1.0).item() == pytest.approx(kl_first)
    assert distillation_kl(teacher, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)
    # temperature scales logits and multiplies by T², with a mask as without one
    assert distillation_kl(student, teacher * 2, temperature=2.0).item() == pytest.approx(4 * kl_first / 2, rel=1e-6)
    assert distillation_kl(student, teacher * 2, mask, temperature=2.0).item() == pytest.approx(4 * kl_first, rel=1e-6)


def test_lora_orthogonality_is_zero_for_orthogonal_subspaces():
    q = torch.linalg.qr(torch.randn(8, 8))[0]
    prev, orth, same = q[:, :2].T, q[:, 2:4].T, q[:, :2].T
    assert lora_orthogonality([prev], [orth]).item() == pytest.approx(0.0, abs=1e-10)
    assert lora_orthogonality([prev], [same]).item() == pytest.approx(2.0, abs=1e-5)  # ‖I₂‖²_F
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    assert lora_orthogonality([a, a], [b, b]).item() == pytest.approx(2 * ((a @ b.T) ** 2).sum().item(), rel=1e-5)


def test_lora_orthogonality_abs_is_the_released_codes_sum_of_absolute_overlaps():
    # A_prev = [[1, 0, 0], [0, 1, 0]], A_cur = [[0.5, -2, 0]]: overlaps 0.5 and -2, so |·| sums to 2.5, squares to 4.25
    prev, cur = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([[0.5, -2.0, 0]])
    assert lora_orthogonality([prev], [cur], "abs").item() == pytest.approx(2.5)
    assert lora_orthogonality([prev], [cur]).item() == pytest.approx(4.25)
    assert lora_orthogonality([prev], [torch.tensor([[0, 0, 3.0]])], "abs").item() == 0.0
    with pytest.raises(ValueError, match="olora penalty 'l1' is unknown"):
        lora_orthogonality([prev], [cur], "l1")


def test_lwf_loss_is_the_kl_to_the_model_without_its_adapter():
    """Against a hand computation with the base model kept apart before LoRA was added."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from forgetlab.models.lora import lora_a_matrices
    from forgetlab.train.data import qa_dataset

    base = random_model(tiny_config("llama", 40), seed=2)
    teacher = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch = qa_dataset([[5, 6, 7], [8, 9]], [[10, 11], [12]], eos_id=1, pad_id=2).batch(torch.arange(2))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert lwf_loss(model, batch, model(**inputs).logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # B starts at 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.5)
    student = model(**inputs).logits
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1][keep] / 2
    s_logits = student[:, :-1][keep] / 2
    p_t = torch.softmax(t_logits, -1)
    hand = 4 * (p_t * (torch.log_softmax(t_logits, -1) - torch.log_softmax(s_logits, -1))).sum(-1).mean()
    assert lwf_loss(model, batch, student, 2.0).item() == pytest.approx(hand.item(), rel=1e-5)
    a = lora_a_matrices(model)
    assert len(a) == 2 * 3 and all(m.shape == (4, 64) for m in a.values())  # q and v of 3 layers, (r, in)
