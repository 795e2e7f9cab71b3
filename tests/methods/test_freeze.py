"""Freeze selects layers by index: freezing layer 1 of 12 must not touch layers 10 and 11."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from forgetlab.methods import MethodConfig, freeze_parameters
from forgetlab.methods.freeze import bottom_layers

CONFIGS = {
    "llama": LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2),
    "gpt_neox": GPTNeoXConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2),
    "gpt2": GPT2Config(vocab_size=50, n_embd=16, n_layer=12, n_head=2),
}
LAYER_PREFIX = {"llama": "model.layers.", "gpt_neox": "gpt_neox.layers.", "gpt2": "transformer.h."}


def frozen_layer_indices(model, prefix):
    return sorted({int(n[len(prefix):].split(".")[0]) for n, p in model.named_parameters()
                   if n.startswith(prefix) and not p.requires_grad})


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_freezing_layer_1_freezes_exactly_layer_1(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch])
    names = freeze_parameters(model, [1], embedding=False)
    assert frozen_layer_indices(model, LAYER_PREFIX[arch]) == [1]
    assert names and all(n.startswith(LAYER_PREFIX[arch] + "1.") for n in names)
    # Every parameter of layer 1 is frozen; layers 10 and 11 (the reference code's victims) are not.
    layer1 = [p for n, p in model.named_parameters() if n.startswith(LAYER_PREFIX[arch] + "1.")]
    assert layer1 and not any(p.requires_grad for p in layer1)


def test_bottom_k_and_embedding():
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"])
    freeze_parameters(model, bottom_layers(3), embedding=True)
    assert frozen_layer_indices(model, "model.layers.") == [0, 1, 2]
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.lm_head.weight.requires_grad  # untied unembedding keeps training


def test_the_embedding_layer_includes_learned_positions_and_a_tied_head():
    """GPT-2's embedding output is wte + wpe: both freeze with the embedding, and its head (tied to wte) with them;
    layer norms and everything above layer k keep training."""
    model = AutoModelForCausalLM.from_config(CONFIGS["gpt2"])
    names = freeze_parameters(model, bottom_layers(1), embedding=True)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(names)
    assert not model.lm_head.weight.requires_grad and model.lm_head.weight is model.transformer.wte.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.ln_f.weight" in trainable and all(not n.startswith("transformer.h.0.") for n in trainable)
    assert frozen_layer_indices(model, "transformer.h.") == [0]


def test_out_of_range_layer_is_a_clear_error():
    model = AutoModelForCausalLM.from_config(CONFIGS["gpt2"])
    with pytest.raises(ValueError, match=r"layers 0..11"):
        freeze_parameters(model, [12])


def test_method_config_validation():
    MethodConfig(name="freeze", freeze_layers=2).validate(n_layers=4)
    with pytest.raises(ValueError, match="outside 0..4"):
        MethodConfig(name="freeze", freeze_layers=5).validate(n_layers=4)
    with pytest.raises(ValueError, match="unknown"):
        MethodConfig(name="lamol").validate(n_layers=4)
    MethodConfig(name="ewc", ewc_strength=1e4).validate(n_layers=4)
    with pytest.raises(ValueError, match="needs --ewc-strength > 0"):
        MethodConfig(name="ewc").validate(n_layers=4)
    with pytest.raises(ValueError, match="needs --method ewc"):
        MethodConfig(name="freeze", freeze_layers=1, ewc_strength=10).validate(n_layers=4)
    with pytest.raises(ValueError, match="needs --method freeze"):
        MethodConfig(name="seq", freeze_layers=1).validate(n_layers=4)
    with pytest.raises(ValueError, match="fraction"):
        MethodConfig(replay=1.5).validate(n_layers=4)
