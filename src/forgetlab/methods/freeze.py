"""Freeze: keep the input embedding and chosen decoder layers fixed while learning a new task.

The spurious-forgetting paper freezes the embedding and the bottom k layers. Layers are chosen by
index in the model's layer list, never by parameter-name substrings: the reference code matched
``'layers.1'`` and so also froze layers 10-19.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from forgetlab.models.build import decoder_layers


def freeze_parameters(model: torch.nn.Module, layers: Iterable[int], embedding: bool = True) -> list[str]:
    """Set ``requires_grad=False`` on the given decoder layers (and the input embedding); return frozen names.

    A checkpoint that ties its unembedding to the input embedding (GPT-2, many small models) has one tensor for
    both, so freezing the embedding freezes the output head too; forgetlab's own models are untied."""
    stack = decoder_layers(model)
    layers = sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"cannot freeze layers {bad}: the model has layers 0..{len(stack) - 1}")
    frozen_ids: set[int] = set()
    for i in layers:
        frozen_ids.update(id(p) for p in stack[i].parameters())
    if embedding:
        frozen_ids.update(id(p) for p in model.get_input_embeddings().parameters())
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen_ids:
            p.requires_grad_(False)
            names.append(name)
    return names


def bottom_layers(k: int) -> list[int]:
    return list(range(k))
