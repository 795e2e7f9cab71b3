"""LoRA wrapping through PEFT: target checks, GPT-2's transposed Conv1D, the merged weights."""

import pytest
import torch

from forgetlab.models.lora import merged_lora_weights, wrap_lora
from forgetlab.models.zoo import random_model, tiny_config


def test_a_lora_target_the_model_lacks_is_named():
    model = random_model(tiny_config("llama", 40))
    with pytest.raises(ValueError, match=r"lora_targets \['c_attn'\].*q_proj"):
        wrap_lora(model, ("c_attn",))


def test_lora_on_gpt2_conv1d_is_set_up_transposed_and_trains_the_true_delta():
    """GPT-2's Conv1D keeps its weight as (in, out): the adapter must know (``fan_in_fan_out``), without PEFT's warning,
    and its merged delta is (α/r)·(B·A)ᵀ in that layout."""
    import warnings

    model = random_model(tiny_config("gpt2", 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        wrapped = wrap_lora(model, ("c_attn",), r=4, alpha=8)
    layer = wrapped.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    merged = merged_lora_weights(wrapped)
    name = next(k for k in merged if k.endswith("h.0.attn.c_attn.weight"))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(merged[name], layer.base_layer.weight + 2.0 * (b @ a).T, atol=1e-6)
