"""Plain torch hooks on the head outputs and the residual stream (no interpretability dependency).

Head outputs are read and patched at the *input* of each layer's attention output projection
(forward pre-hooks, so PEFT-wrapped and Conv1D projections behave alike); function vectors are added
to the *output* of a decoder layer (forward hooks). Every edit is out of place, so gradients flow
through it (FV-guided training backpropagates through an intervention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from forgetlab.models.adapter import ModelAdapter

HeadInputEdit = Callable[[int, torch.Tensor], torch.Tensor | None]


@contextmanager
def edit_head_inputs(adapter: ModelAdapter, edit: HeadInputEdit, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Call ``edit(layer, x)`` on the input ``x`` (B, T, n_heads*head_dim) of each output projection.

    ``edit`` returns a replacement tensor or ``None`` (only read). Hooks are removed on exit.
    """
    handles = []
    try:  # registering inside: a bad layer index leaves no hook of the layers before it behind
        for layer in range(adapter.n_layers) if layers is None else layers:
            if not 0 <= layer < adapter.n_layers:
                raise ValueError(f"layer {layer} is out of range; the model has layers 0..{adapter.n_layers - 1}")

            def hook(module, args, kwargs, layer=layer):
                new = edit(layer, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            handles.append(adapter.o_projs[layer].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextmanager
def add_to_residual(adapter: ModelAdapter, vector: torch.Tensor, layer: int, alpha: float = 1.0,
                    rows: torch.Tensor | slice | None = None, positions: torch.Tensor | None = None) -> Iterator[None]:
    """Add ``alpha * vector`` to the output of decoder layer ``layer`` at the last position.

    During generation with a cache every step's input is one new token, so the last position is the
    last prompt token on the first call and each generated token afterwards. ``rows`` restricts the
    edit to some batch rows (used to sweep layers in one batched pass); ``positions`` (one index per
    row) moves it from the last position, e.g. to the prompt end of a prompt+answer row. Use
    ``alpha=-1`` to subtract.
    """
    if not 0 <= layer < adapter.n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has layers 0..{adapter.n_layers - 1}")
    if positions is not None and rows is not None:
        raise ValueError("add_to_residual: give rows or positions, not both")
    sel = slice(None) if rows is None else rows

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        delta = torch.zeros_like(hidden)
        if positions is None:
            delta[sel, -1] = alpha * vector.to(hidden.dtype)
        else:
            delta[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)] = alpha * vector.to(hidden.dtype)
        return _replace_hidden(output, hidden + delta)

    handle = adapter.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def function_vector_sweep(adapter: ModelAdapter, vector: torch.Tensor, layers: Sequence[int], batch_rows: int,
                          alpha: float = 1.0) -> Iterator[None]:
    """One batched pass for a layer sweep: the input batch is ``len(layers)`` copies of ``batch_rows`` rows
    and copy ``i`` gets the vector at ``layers[i]``."""
    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.enter_context(add_to_residual(adapter, vector, layer, alpha, rows=slice(i * batch_rows, (i + 1) * batch_rows)))
        yield

