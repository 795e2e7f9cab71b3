"""Loss terms of the continual-learning baselines (EWC, LwF, O-LoRA), as pure functions of tensors.

Each is the core of one baseline of the FV paper's comparison; a training loop adds them to the
language-modelling loss. Kept free of any trainer state so each can be checked by hand; only LwF's runs a model
(the previous one: the LoRA model with its adapter off).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from forgetlab.train.data import IGNORE


def diagonal_fisher(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher (EWC): the mean over *examples* of the squared gradient of each example's
    LM loss (its mean answer-token loss, what the model returns).

    Squaring a mini-batch's mean gradient instead, a common shortcut, underestimates it by about the batch
    size once the model fits the data (per-example gradients then cancel in the mean), so one λ would mean
    different things at different batch sizes. Batches are model inputs with ``labels``, every tensor with
    the examples first; only trainable parameters get an entry.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        for i in range(len(batch["labels"])):
            model.zero_grad(set_to_none=True)
            model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise ValueError("diagonal_fisher needs at least one example")
    return {n: f / count for n, f in fisher.items()}


def ewc_penalty(model: torch.nn.Module, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                strength: float) -> torch.Tensor:
    """(strength / 2) · Σ F_i (θ_i − θ*_i)² over the parameters that have a Fisher entry."""
    total = None
    for n, p in model.named_parameters():
        if n in fisher:
            term = (fisher[n].to(p.device) * (p.float() - anchor[n].to(p.device).float()) ** 2).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("ewc_penalty: no parameter of the model has a Fisher entry")
    return 0.5 * strength * total


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 2.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the positions where ``mask`` is true.

    LwF uses it against the previous model's outputs (Hinton's T², so the gradient scale does not depend
    on T; FV-guided training uses the FV paper's own KL, ``methods.fvg.fvg_kl``). Logits are (..., vocab);
    ``mask`` has the leading shape.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if mask is not None:
        mask = mask.to(kl.dtype)
        return t * t * (kl * mask).sum() / mask.sum().clamp(min=1)
    return t * t * kl.mean()


OLORA_PENALTIES = ("squared", "abs")


def lwf_loss(model, batch: dict, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from the previous model (this LoRA model with its adapter off) to the current one on the answer tokens."""
    keep = batch["labels"][:, 1:] != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        teacher = model(**inputs).logits[:, :-1][keep]
    model.train(was_training)
    return distillation_kl(student_logits[:, :-1][keep], teacher, temperature=temperature)


def lora_orthogonality(previous: Iterable[torch.Tensor], current: Iterable[torch.Tensor],
                       penalty: str = "squared") -> torch.Tensor:
    """O-LoRA: Σ over adapted modules of ‖A_prev A_curᵀ‖²_F (the paper's equation), or with ``penalty="abs"`` the sum
    of the entries' absolute values (O-LoRA's released code, for which its λ₁ = 0.5 was tuned: at a 7B model's
    sizes the overlaps are small, so their squares are far smaller still). LoRA ``A`` matrices have shape (r, in).

    Zero exactly when the current adapter's input subspace is orthogonal to the earlier tasks'.
    """
    if penalty not in OLORA_PENALTIES:
        raise ValueError(f"olora penalty {penalty!r} is unknown; use one of {', '.join(OLORA_PENALTIES)}")
    total = None
    for a_prev, a_cur in zip(previous, current, strict=True):
        overlap = a_prev.to(a_cur.device, a_cur.dtype) @ a_cur.T
        term = overlap.pow(2).sum() if penalty == "squared" else overlap.abs().sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("lora_orthogonality needs at least one pair of LoRA A matrices")
    return total
