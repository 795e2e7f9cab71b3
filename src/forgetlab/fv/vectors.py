"""Top heads, universal heads and function vectors from a CIE matrix and mean head activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forgetlab.models.adapter import ModelAdapter

Head = tuple[int, int]


def top_heads(cie: torch.Tensor, k: int = 10) -> list[Head]:
    """The ``k`` (layer, head) pairs of highest mean CIE, best first; ``cie`` is (L, H) or (N, L, H)."""
    matrix = cie.mean(0) if cie.dim() == 3 else cie
    n_layers, n_heads = matrix.shape
    if not 1 <= k <= n_layers * n_heads:
        raise ValueError(f"top-k={k} is out of range: the model has {n_layers * n_heads} heads "
                         f"({n_layers} layers x {n_heads}); choose 1..{n_layers * n_heads}")
    order = torch.argsort(matrix.flatten(), descending=True, stable=True)[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def universal_heads(cies: Sequence[torch.Tensor], k: int = 10) -> list[Head]:
    """Heads with the highest CIE averaged over tasks (each task's (L, H) mean weighted equally)."""
    if not cies:
        raise ValueError("universal heads need the CIE of at least one task")
    return top_heads(torch.stack([c.mean(0) if c.dim() == 3 else c for c in cies]).mean(0), k)


def function_vector(adapter: ModelAdapter, mean_acts: torch.Tensor, heads: Sequence[Head]) -> torch.Tensor:
    """v = Σ_{(l,j)∈heads} W_O^{(l)}[:, slice j] · ā_{l,j} (no bias), float32, shape (hidden,)."""
    d = adapter.head_dim
    device = next(adapter.model.parameters()).device
    vector = torch.zeros(adapter.hidden_size, dtype=torch.float32, device=device)
    for layer in sorted({l for l, _ in heads}):
        x = torch.zeros(1, adapter.n_heads * d, dtype=torch.float32, device=device)
        for l, j in heads:
            if l == layer:
                x[0, j * d:(j + 1) * d] = mean_acts[l, j].to(device)
        vector += adapter.head_outputs_to_residual(layer, x)[0].float()
    return vector.cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two function vectors (e.g. of one task before and after fine-tuning)."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))
