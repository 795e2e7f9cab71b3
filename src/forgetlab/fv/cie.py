"""Mean head activations and the causal indirect effect (CIE) of every attention head.

CIE_{l,j} = P(y | counterfactual prompt, head (l,j)'s last-token output := its clean mean)
          - P(y | counterfactual prompt), per prompt (Todd et al.; papers.md §1). Three engines:

- ``naive``: one patched forward pass of the whole prompt per (layer, head) — the reference.
- ``exact``: the same numbers from one cached counterfactual pass plus one single-token step in which
  every (layer, head) patch is a row. Patching touches only the last position and attention is
  causal, so every earlier position is unchanged and only the last token needs recomputing, against
  the shared cached prefix (``forgetlab.fv.prefix_attention``). Rows are chunked to bound memory.
- ``attribution``: first-order approximation (ā − z)·∂P/∂z from one forward and one backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from forgetlab.fv.hooks import edit_head_inputs
from forgetlab.fv.prefix_attention import SharedPrefix, cached_key_values, shared_prefix
from forgetlab.fv.prompts import PromptBatch
from forgetlab.models.adapter import ModelAdapter

ENGINES = ("exact", "naive", "attribution")


def _target_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


@torch.no_grad()
def mean_head_activations(adapter: ModelAdapter, batches: Iterable[PromptBatch], progress: bool = False) -> torch.Tensor:
    """ā (n_layers, n_heads, head_dim), float32: each head's last-token output averaged over prompts."""
    total = torch.zeros(adapter.n_layers, adapter.n_heads * adapter.head_dim, dtype=torch.float64)
    count = 0

    def read(layer: int, x: torch.Tensor) -> None:
        total[layer] += x[:, -1].double().sum(0).cpu()

    was_training = adapter.model.training
    adapter.model.eval()  # no dropout in ā (a model handed over in training mode, e.g. with LoRA dropout)
    try:
        with edit_head_inputs(adapter, read):
            for batch in tqdm(list(batches), desc="mean activations", disable=not progress, leave=False):
                adapter.model(**batch.model_inputs())
                count += len(batch)
    finally:
        adapter.model.train(was_training)
    if count == 0:
        raise ValueError("no prompts to average head activations over")
    return (total / count).float().view(adapter.n_layers, adapter.n_heads, adapter.head_dim)


def causal_indirect_effect(adapter: ModelAdapter, batches: Iterable[PromptBatch], mean_acts: torch.Tensor,
                           engine: str = "exact", max_rows: int = 4096, progress: bool = False) -> torch.Tensor:
    """CIE per prompt, (n_prompts, n_layers, n_heads) float32, for counterfactual (shuffled-label) prompts."""
    if engine not in ENGINES:
        raise ValueError(f"unknown CIE engine {engine!r}; use one of {', '.join(ENGINES)}")
    expected = (adapter.n_layers, adapter.n_heads, adapter.head_dim)
    if tuple(mean_acts.shape) != expected:
        raise ValueError(f"mean activations have shape {tuple(mean_acts.shape)}, but the model needs {expected}")
    run = {"exact": _cie_exact, "naive": _cie_naive, "attribution": _cie_attribution}[engine]
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        out = [run(adapter, b, mean_acts, max_rows) for b in tqdm(list(batches), desc=f"CIE ({engine})",
                                                                  disable=not progress, leave=False)]
    finally:
        adapter.model.train(was_training)
    return torch.cat(out).cpu()


def _mean_for(mean_acts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mean_acts.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _cie_naive(adapter: ModelAdapter, batch: PromptBatch, mean_acts: torch.Tensor, max_rows: int) -> torch.Tensor:
    model, n_heads, d = adapter.model, adapter.n_heads, adapter.head_dim
    base = _target_probs(model(**batch.model_inputs()).logits[:, -1], batch.targets)
    out = torch.zeros(len(batch), adapter.n_layers, n_heads)
    for layer in range(adapter.n_layers):
        for head in range(n_heads):
            def patch(l: int, x: torch.Tensor, head=head) -> torch.Tensor:
                x = x.clone()
                x[:, -1, head * d:(head + 1) * d] = _mean_for(mean_acts[l, head], x)
                return x
            with edit_head_inputs(adapter, patch, layers=[layer]):
                logits = model(**batch.model_inputs()).logits[:, -1]
            out[:, layer, head] = (_target_probs(logits, batch.targets) - base).cpu()
    return out


def _expand_rows(obj, n_prompts: int, rows: int):
    """Repeat every per-prompt tensor (dim 0 == n_prompts, 2+ dims) ``rows`` times, in nested args too."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat_interleave(rows, dim=0) if obj.dim() >= 2 and obj.shape[0] == n_prompts else obj
    if isinstance(obj, tuple):
        return tuple(_expand_rows(o, n_prompts, rows) for o in obj)
    if isinstance(obj, list):
        return [_expand_rows(o, n_prompts, rows) for o in obj]
    if isinstance(obj, dict):
        return {k: _expand_rows(v, n_prompts, rows) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _counterfactual_prefix(adapter: ModelAdapter, batch: PromptBatch) -> tuple[torch.Tensor, list]:
    """P(target) on the counterfactual prompts, and each layer's cached keys/values."""
    result = adapter.model(**batch.model_inputs(), use_cache=True)
    base = _target_probs(result.logits[:, -1], batch.targets)
    cache = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
    kv = [cached_key_values(cache, layer) for layer in range(adapter.n_layers)]
    kept = min(k.shape[2] for k, _ in kv)
    if kept < batch.input_ids.shape[1]:  # a sliding-window layer caches only the window's last positions
        raise ValueError(f"the exact CIE engine needs every prompt position cached, but this model keeps {kept} of "
                         f"{batch.input_ids.shape[1]} (a sliding attention window shorter than the prompts); use "
                         "engine='naive' (--engine naive) or shorter prompts")
    return base, kv


def _prefix_for(adapter: ModelAdapter, batch: PromptBatch, kv: list, prompts: slice) -> SharedPrefix:
    return SharedPrefix(keys=[k[prompts, :, :-1] for k, _ in kv], values=[v[prompts, :, :-1] for _, v in kv],
                        keep=batch.attention_mask[prompts, :-1].bool(), layer_of=adapter.layer_of)


@torch.no_grad()
def _cie_exact(adapter: ModelAdapter, batch: PromptBatch, mean_acts: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Rows start at their patched layer: at layer l the batch holds the H new rows patched at l plus the
    rows patched below l, so the layers under a patch are never recomputed. Falls back to running every
    row through the whole model where the model's top (final norm, unembedding) is not plain."""
    model, n_layers, n_heads, d = adapter.model, adapter.n_layers, adapter.n_heads, adapter.head_dim
    if adapter.final_norm is None:
        return _cie_exact_full(adapter, batch, mean_acts, max_rows)
    n_prompts = len(batch)
    base, kv = _counterfactual_prefix(adapter, batch)
    means = mean_acts.to(device=batch.input_ids.device, dtype=next(model.parameters()).dtype)
    last_ids, last_pos = batch.input_ids[:, -1:], batch.position_ids[:, -1:]
    heads = torch.arange(n_heads, device=means.device)
    out = torch.zeros(n_prompts, n_layers * n_heads + 1, device=means.device)
    per_step = max(1, min(n_prompts, max_rows // (n_layers * n_heads + 1)))
    for p0 in range(0, n_prompts, per_step):
        ps = slice(p0, min(n_prompts, p0 + per_step))
        n_p = ps.stop - ps.start
        calls: list[tuple] = []

        def capture(module, args, kwargs):
            calls.append((args, kwargs))

        handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in adapter.layers]
        try:
            with shared_prefix(model, adapter, _prefix_for(adapter, batch, kv, ps)):
                model(input_ids=last_ids[ps], position_ids=last_pos[ps], use_cache=False)
                hidden = calls[0][0][0][:, None]  # (P, 1 clean row, 1, D): the clean last token entering layer 0
                for layer in range(n_layers):
                    args, kwargs = calls[layer]
                    new = args[0][:, None].expand(n_p, n_heads, 1, args[0].shape[-1])
                    hidden = torch.cat([hidden, new], dim=1)
                    rows = hidden.shape[1]

                    def patch(_: int, x: torch.Tensor, layer=layer, rows=rows) -> torch.Tensor:
                        x = x.clone()
                        x.view(n_p, rows, n_heads, d)[:, rows - n_heads + heads, heads] = means[layer]
                        return x

                    with edit_head_inputs(adapter, patch, layers=[layer]):
                        result = adapter.layers[layer](hidden.reshape(n_p * rows, 1, -1),
                                                       *_expand_rows(args[1:], n_p, rows), **_expand_rows(kwargs, n_p, rows))
                    hidden = (result[0] if isinstance(result, tuple) else result).view(n_p, rows, 1, -1)
        finally:
            for h in handles:
                h.remove()
        logits = model.get_output_embeddings()(adapter.final_norm(hidden.reshape(n_p * hidden.shape[1], 1, -1)))[:, -1]
        out[ps] = _target_probs(logits, batch.targets[ps].repeat_interleave(hidden.shape[1])).view(n_p, -1)
    rtol, atol = (1e-3, 1e-7) if means.dtype == torch.float32 else (0.1, 1e-5)
    if not torch.allclose(out[:, 0], base, rtol=rtol, atol=atol):  # the model's top is more than norm + unembedding
        warnings.warn(f"{type(model).__name__}: the layer-by-layer exact CIE path does not reproduce the model's output; "
                      "using the whole-model path (same numbers, about twice the compute)")
        return _cie_exact_full(adapter, batch, mean_acts, max_rows)
    return (out[:, 1:] - base[:, None]).view(n_prompts, n_layers, n_heads).cpu()


@torch.no_grad()
def _cie_exact_full(adapter: ModelAdapter, batch: PromptBatch, mean_acts: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Every (layer, head) patch is a row of one single-token step through the whole model."""
    model, n_layers, n_heads, d = adapter.model, adapter.n_layers, adapter.n_heads, adapter.head_dim
    n_prompts = len(batch)
    base, kv = _counterfactual_prefix(adapter, batch)
    means = mean_acts.to(device=batch.input_ids.device, dtype=next(model.parameters()).dtype)
    last_ids, last_pos = batch.input_ids[:, -1:], batch.position_ids[:, -1:]
    patches = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    prompts_per_step = max(1, min(n_prompts, max_rows // len(patches)))
    rows_per_step = min(len(patches), max(1, max_rows // prompts_per_step))
    out = torch.zeros(n_prompts, n_layers * n_heads, device=means.device)
    for p0 in range(0, n_prompts, prompts_per_step):
        ps = slice(p0, min(n_prompts, p0 + prompts_per_step))
        n_p = ps.stop - ps.start
        prefix = _prefix_for(adapter, batch, kv, ps)
        for r0 in range(0, len(patches), rows_per_step):
            chunk = patches[r0:r0 + rows_per_step]
            n_r = len(chunk)
            by_layer: dict[int, tuple[list[int], list[int]]] = {}
            for row, (layer, head) in enumerate(chunk):
                by_layer.setdefault(layer, ([], []))
                by_layer[layer][0].append(row)
                by_layer[layer][1].append(head)

            def patch(layer: int, x: torch.Tensor, by_layer=by_layer, n_p=n_p, n_r=n_r) -> torch.Tensor:
                rows, heads = by_layer[layer]
                x = x.clone()
                x.view(n_p, n_r, n_heads, d)[:, rows, heads] = means[layer, heads]
                return x

            ids = last_ids[ps].repeat_interleave(n_r, dim=0)
            pos = last_pos[ps].repeat_interleave(n_r, dim=0)
            with shared_prefix(model, adapter, prefix), edit_head_inputs(adapter, patch, layers=sorted(by_layer)):
                logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, -1]
            probs = _target_probs(logits, batch.targets[ps].repeat_interleave(n_r)).view(n_p, n_r)
            out[ps, r0:r0 + n_r] = probs - base[ps, None]
    return out.view(n_prompts, n_layers, n_heads).cpu()


def _cie_attribution(adapter: ModelAdapter, batch: PromptBatch, mean_acts: torch.Tensor, max_rows: int) -> torch.Tensor:
    model, n_heads, d = adapter.model, adapter.n_heads, adapter.head_dim
    device = batch.input_ids.device
    dtype = next(model.parameters()).dtype
    probes = [torch.zeros(len(batch), n_heads * d, device=device, dtype=dtype, requires_grad=True)
              for _ in range(adapter.n_layers)]
    seen: dict[int, torch.Tensor] = {}

    def probe(layer: int, x: torch.Tensor) -> torch.Tensor:
        seen[layer] = x[:, -1].detach()
        return torch.cat([x[:, :-1], (x[:, -1] + probes[layer])[:, None]], dim=1)

    with torch.enable_grad(), edit_head_inputs(adapter, probe):
        logits = model(**batch.model_inputs()).logits[:, -1]
        total = _target_probs(logits, batch.targets).sum()
        grads = torch.autograd.grad(total, probes)
    out = torch.zeros(len(batch), adapter.n_layers, n_heads)
    for layer, grad in enumerate(grads):
        delta = _mean_for(mean_acts[layer], seen[layer]).reshape(1, -1) - seen[layer]
        out[:, layer] = (delta.float() * grad.float()).view(len(batch), n_heads, d).sum(-1).cpu()
    return out
