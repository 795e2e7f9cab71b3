"""The shared-prefix attention function against attention written out per row, head and key position.

The CIE tests check the exact engine end to end on the tiny architectures, none of which uses a short sliding
window, logit soft-capping or a scaling other than head_dim^-0.5 (Mistral's window is 4096, Gemma caps logits and
scales by its own query_pre_attn_scalar); here those arguments are exercised on random tensors.
"""

import math

import pytest
import torch

from forgetlab.fv import prefix_attention
from forgetlab.fv.prefix_attention import SharedPrefix, shared_prefix_attention

P, R, H, HKV, S, D = 2, 3, 4, 2, 5, 8  # prompts, rows per prompt, query heads, key/value heads, prefix length, head dim


def naive(query, key, value, keys, values, keep, scale, softcap, window):
    """Row b = p·R + r, head h reads key/value head h // (H / HKV): scores against prompt p's prefix positions
    0..S-1 that are real (and, under a window, within the last ``window`` positions counting its own, S) and its
    own key at position S, softmax over those, weighted sum of the values."""
    out = torch.zeros(P * R, 1, H, D, dtype=torch.float64)
    group = H // HKV
    for b in range(P * R):
        p = b // R
        for h in range(H):
            kv = h // group
            q = query[b, h, 0].double()
            cand = [(keys[p, kv, j], values[p, kv, j]) for j in range(S)
                    if keep[p, j] and (window is None or S - j < window)] + [(key[b, kv, 0], value[b, kv, 0])]
            scores = []
            for k, _ in cand:
                s = float(q @ k.double()) * scale
                scores.append(softcap * math.tanh(s / softcap) if softcap is not None else s)
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            out[b, 0, h] = sum(w / total * v.double() for w, (_, v) in zip(weights, cand))
    return out


@pytest.mark.parametrize("scaling, softcap, window", [
    (None, None, None), (0.3, None, None), (None, 2.0, None), (None, None, 3), (0.3, 2.0, 4), (None, None, S + 1),
])
def test_shared_prefix_attention_equals_attention_written_out(scaling, softcap, window):
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(P * R, n, 1, D, generator=g) for n in (H, HKV, HKV))
    keys, values = torch.randn(P, HKV, S, D, generator=g), torch.randn(P, HKV, S, D, generator=g)
    keep = torch.tensor([[False, False, True, True, True], [True, True, True, False, True]])  # left pad; a gap
    module = torch.nn.Module()
    token = prefix_attention._ACTIVE.set(SharedPrefix([keys], [values], keep, {id(module): 0}))
    try:
        got, weights = shared_prefix_attention(module, query, key, value, None, scaling=scaling, softcap=softcap,
                                               sliding_window=window)
    finally:
        prefix_attention._ACTIVE.reset(token)
    want = naive(query, key, value, keys, values, keep, D ** -0.5 if scaling is None else scaling, softcap, window)
    assert got.shape == (P * R, 1, H, D) and weights is None
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_outside_its_context_it_refuses():
    x = torch.zeros(2, H, 1, D)
    with pytest.raises(RuntimeError, match="outside"):
        shared_prefix_attention(torch.nn.Module(), x, x[:, :HKV], x[:, :HKV], None)
