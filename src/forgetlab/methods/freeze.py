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
    """Set ``requires_grad=False`` on the given decoder layers (and the embedding layer); return frozen names.

    The embedding layer is every embedding table outside the decoder layers: the token embedding and, where a model
    learns them, position (GPT-2's ``wpe``, OPT's) and token-type embeddings, which the embedding's output sums.
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
        inside = {id(m) for layer in stack for m in layer.modules()}
        tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and id(m) not in inside]
        for module in [model.get_input_embeddings(), *tables]:
            frozen_ids.update(id(p) for p in module.parameters())
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen_ids:
            p.requires_grad_(False)
            names.append(name)
    return names


def bottom_layers(k: int) -> list[int]:
    return list(range(k))
