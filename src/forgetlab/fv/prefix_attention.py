"""Attention for many one-token rows that share one cached prompt prefix.

The exact CIE engine runs every (layer, head) patch of a prompt as a row of one single-token step.
All rows of a prompt attend to the same counterfactual prefix, so instead of copying its keys and
values per row (L·H copies of a 7B cache would not fit), this attention function multiplies the
rows' queries against the one shared prefix and adds each row's own key/value for the last
position. It is registered with ``transformers``' ``AttentionInterface``; the model's own modules
still compute projections, rotary embeddings and q/k norms, so nothing is re-implemented per model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel

from forgetlab.models.adapter import ModelAdapter

NAME = "forgetlab_shared_prefix"


@dataclass
class SharedPrefix:
    """Per layer the prefix keys/values (P, n_kv_heads, S, head_dim) and which prefix positions are real."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    keep: torch.Tensor                 # (P, S) bool
    layer_of: dict[int, int]           # id(attention submodule) -> layer index


_ACTIVE: ContextVar[SharedPrefix | None] = ContextVar("forgetlab_shared_prefix", default=None)


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    """query (B, H, 1, d), key/value (B, Hkv, 1, d) with B = P·R rows; returns (B, 1, H, d)."""
    prefix = _ACTIVE.get()
    if prefix is None:
        raise RuntimeError("shared_prefix_attention called outside forgetlab.fv.prefix_attention.shared_prefix()")
    layer = prefix.layer_of[id(module)]
    keys, values, keep = prefix.keys[layer], prefix.values[layer], prefix.keep
    n_prompts, n_kv, s, d = keys.shape
    b, h, q_len, _ = query.shape
    if q_len != 1 or b % n_prompts:
        raise RuntimeError(f"shared-prefix attention expects one token per row and {n_prompts} prompts, got {tuple(query.shape)}")
    rows, group = b // n_prompts, h // n_kv
    scale = d ** -0.5 if scaling is None else scaling
    q = query.view(n_prompts, rows, n_kv, group, d).permute(0, 2, 1, 3, 4)          # (P, Hkv, R, g, d)
    k_self = key.view(n_prompts, rows, n_kv, 1, d).permute(0, 2, 1, 3, 4)            # (P, Hkv, R, 1, d)
    v_self = value.view(n_prompts, rows, n_kv, 1, value.shape[-1]).permute(0, 2, 1, 3, 4)
    scores_prefix = torch.matmul(q.reshape(n_prompts, n_kv, rows * group, d), keys.transpose(-1, -2)).float() * scale
    scores_self = (q * k_self).sum(-1, keepdim=True).float().reshape(n_prompts, n_kv, rows * group, 1) * scale
    scores = torch.cat([scores_prefix, scores_self], dim=-1)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = keep
    if sliding_window is not None and s + 1 > sliding_window:
        allowed = allowed & (torch.arange(s, device=keep.device) >= s + 1 - sliding_window)
    scores[..., :s] = scores[..., :s].masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs[..., :s], values).view(n_prompts, n_kv, rows, group, -1)
    out = out + probs[..., s:].reshape(n_prompts, n_kv, rows, group, 1) * v_self
    return out.permute(0, 2, 1, 3, 4).reshape(b, 1, h, -1), None


AttentionInterface.register(NAME, shared_prefix_attention)


def _attention_configs(model: PreTrainedModel, adapter: ModelAdapter) -> list:
    configs = {id(model.config): model.config}
    for attention in adapter.attentions:
        config = getattr(attention, "config", None)
        if config is not None:
            configs[id(config)] = config
    return list(configs.values())


@contextmanager
def shared_prefix(model: PreTrainedModel, adapter: ModelAdapter, prefix: SharedPrefix) -> Iterator[None]:
    """Route the model's attention through ``shared_prefix_attention`` for the duration of the block."""
    configs = _attention_configs(model, adapter)
    saved = [c._attn_implementation for c in configs]
    token = _ACTIVE.set(prefix)
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl
        _ACTIVE.reset(token)


def cached_key_values(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer from a ``transformers`` cache object (several API generations)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]
