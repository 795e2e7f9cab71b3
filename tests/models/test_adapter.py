"""The head adapter on every tiny architecture, on PEFT LoRA wrappers and with gradient checkpointing.

Numbers are checked against the modules' weights read directly (nn.Linear stores (out, in), GPT-2's
Conv1D (in, out)), never against the adapter's own arithmetic.
"""

import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from forgetlab.fv.cie import causal_indirect_effect, mean_head_activations
from forgetlab.fv.prompts import PromptBatch, collate
from forgetlab.models.adapter import adapt
from forgetlab.models.build import enable_activation_checkpointing
from forgetlab.models.zoo import TINY_ARCHITECTURES, random_model, tiny_config

VOCAB = 64
D_MODEL, N_HEADS, N_LAYERS = 64, 4, 3

# Where the attention output projection of layer l lives, spelled out per architecture.
O_PROJ_PATH = {
    "llama": "model.layers.{l}.self_attn.o_proj", "llama_gqa": "model.layers.{l}.self_attn.o_proj",
    "mistral": "model.layers.{l}.self_attn.o_proj", "qwen2": "model.layers.{l}.self_attn.o_proj",
    "qwen3": "model.layers.{l}.self_attn.o_proj", "gpt2": "transformer.h.{l}.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.{l}.attention.dense", "gptj": "transformer.h.{l}.attn.out_proj",
}
FINAL_NORM_PATH = {"llama": "model.norm", "llama_gqa": "model.norm", "mistral": "model.norm", "qwen2": "model.norm",
                   "qwen3": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
                   "gptj": "transformer.ln_f"}


def model_of(arch: str, init_range: float | None = None, seed: int = 0):
    config = tiny_config(arch, VOCAB, n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL)
    if init_range is not None:
        config.initializer_range = init_range
    return random_model(config, seed=seed)


def randomise_biases(model, seed: int = 1) -> None:
    """Zero-initialised biases would hide a bias wrongly included in W_O·x."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))


def manual_w_o(proj: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W_O·x from the stored weight, no bias."""
    if isinstance(proj, Conv1D):
        return x @ proj.weight              # (in, out)
    assert isinstance(proj, torch.nn.Linear)
    return x @ proj.weight.T                # (out, in)


def token_batch(model, lengths=(6, 9, 4), seed: int = 0) -> PromptBatch:
    """Left-padded random prompts (BOS first) whose targets are the model's own top tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = [[0] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]
    batch = collate([(ids, 0) for ids in rows], pad_id=2)
    with torch.no_grad():
        targets = model(**batch.model_inputs()).logits[:, -1].argmax(-1)
    return PromptBatch(batch.input_ids, batch.attention_mask, targets)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_shapes_and_module_found(arch):
    model = model_of(arch)
    a = adapt(model)
    expected_head_dim = D_MODEL // N_HEADS + 8 if arch == "qwen3" else D_MODEL // N_HEADS
    assert (a.n_layers, a.n_heads, a.head_dim, a.hidden_size) == (N_LAYERS, N_HEADS, expected_head_dim, D_MODEL)
    modules = dict(model.named_modules())
    for layer in range(N_LAYERS):
        assert a.o_projs[layer] is modules[O_PROJ_PATH[arch].format(l=layer)]
        assert any(m is a.o_projs[layer] for m in a.attentions[layer].modules())
        assert any(m is a.attentions[layer] for m in a.layers[layer].modules())
    assert a.final_norm is modules[FINAL_NORM_PATH[arch]]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_o_proj_input_is_the_concatenated_heads(arch):
    model = model_of(arch)
    a = adapt(model)
    seen = []
    handles = [p.register_forward_pre_hook(lambda mod, args, l=l: seen.append((l, tuple(args[0].shape))))
               for l, p in enumerate(a.o_projs)]
    with torch.no_grad():
        model(input_ids=torch.tensor([[0, 5, 9, 11, 7]]))
    for h in handles:
        h.remove()
    # each projection runs once per forward, on (B, T, n_heads * head_dim)
    assert seen == [(l, (1, 5, N_HEADS * a.head_dim)) for l in range(N_LAYERS)]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_head_outputs_to_residual_is_w_o_times_x(arch):
    model = model_of(arch)
    randomise_biases(model)
    a = adapt(model)
    x = torch.randn(5, a.n_heads * a.head_dim, generator=torch.Generator().manual_seed(3))
    for layer in range(a.n_layers):
        got = a.head_outputs_to_residual(layer, x)
        want = manual_w_o(a.o_projs[layer], x)
        assert got.shape == (5, D_MODEL)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_w_o_of_a_bfloat16_projection_with_a_large_bias_is_its_float32_product(arch):
    """proj(x) − proj(0) in bfloat16 rounds W_O·x + b at b's scale, so a bias far larger than W_O·x swamps it; the
    float32 copy gives W_O·x of the bfloat16 weights to float32 precision."""
    model = model_of(arch)
    a = adapt(model)
    with torch.no_grad():
        for proj in a.o_projs:
            proj.bias.fill_(50.0)
    model.to(torch.bfloat16)
    x = torch.randn(3, a.n_heads * a.head_dim, generator=torch.Generator().manual_seed(6))  # W_O·x about 0.1–0.3
    for layer in range(a.n_layers):
        proj = a.o_projs[layer]
        weight = proj.weight.double()  # the bfloat16 weights, exactly
        want = x.double() @ (weight if isinstance(proj, Conv1D) else weight.T)
        got = a.head_outputs_to_residual(layer, x)
        assert got.dtype == torch.float32 and proj.weight.dtype == torch.bfloat16  # the model itself is untouched
        # float32 cancels the bias to about 50 · 6e-8; bfloat16 only to 50 · 4e-3, larger than W_O·x itself
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def _lora(model, targets, dropout=0.0, **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False, **kw)
    return peft.get_peft_model(model, config)


def _lora_delta(proj, x: torch.Tensor) -> torch.Tensor:
    """scaling · B·A·x from the LoRA factors (A: (r, in), B: (out, r) for Linear and Conv1D alike)."""
    A, B = proj.lora_A["default"].weight, proj.lora_B["default"].weight
    return proj.scaling["default"] * (x @ A.T @ B.T)


@pytest.mark.parametrize("arch, targets, extra", [
    ("llama", ["q_proj", "v_proj", "o_proj"], {}),
    ("gpt2", ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
])
def test_lora_wrapped_projection(arch, targets, extra):
    base = model_of(arch)
    randomise_biases(base)
    wrapped = _lora(base, targets, **extra)
    a = adapt(wrapped)
    assert (a.n_layers, a.n_heads, a.head_dim) == (N_LAYERS, N_HEADS, D_MODEL // N_HEADS)
    x = torch.randn(3, a.n_heads * a.head_dim, generator=torch.Generator().manual_seed(4))
    for layer in range(a.n_layers):
        proj = a.o_projs[layer]
        assert isinstance(proj, peft.tuners.lora.LoraLayer), type(proj)
        base_only = manual_w_o(proj.base_layer, x)
        want = base_only + _lora_delta(proj, x)
        assert (want - base_only).abs().max() > 1e-2  # the LoRA update is really there
        got = a.head_outputs_to_residual(layer, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # merging the adapter into the base weight must not change W_O
    before = [a.head_outputs_to_residual(layer, x) for layer in range(a.n_layers)]
    wrapped.merge_adapter()
    for layer in range(a.n_layers):
        torch.testing.assert_close(a.head_outputs_to_residual(layer, x), before[layer], rtol=1e-5, atol=1e-5)


def test_w_o_of_a_lora_projection_ignores_its_dropout_in_training_mode():
    wrapped = _lora(model_of("llama"), ["o_proj"], dropout=0.5)
    wrapped.train()
    a = adapt(wrapped)
    x = torch.randn(3, a.n_heads * a.head_dim, generator=torch.Generator().manual_seed(4))
    proj = a.o_projs[0]
    want = manual_w_o(proj.base_layer, x) + _lora_delta(proj, x)
    for _ in range(2):
        torch.testing.assert_close(a.head_outputs_to_residual(0, x), want, rtol=1e-5, atol=1e-5)
    assert proj.training and wrapped.training  # the caller's mode is given back


def test_lora_and_gradient_checkpointing_keep_cie_exact():
    base = model_of("llama", init_range=0.2)
    wrapped = _lora(base, ["q_proj", "v_proj", "o_proj"])
    enable_activation_checkpointing(wrapped)
    wrapped.train()
    a = adapt(wrapped)
    assert a.final_norm is base.model.norm
    batch = token_batch(wrapped)
    assert (batch.attention_mask == 0).any()
    calls = []
    handle = a.o_projs[0].register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    mean = mean_head_activations(a, [batch])
    handle.remove()
    assert len(calls) == 1 and mean.shape == (N_LAYERS, N_HEADS, D_MODEL // N_HEADS)
    naive = causal_indirect_effect(a, [batch], mean, engine="naive")
    with warnings.catch_warnings():  # the layer-by-layer path itself, not its whole-model fallback
        warnings.filterwarnings("error", message=".*layer-by-layer exact CIE path.*")
        exact = causal_indirect_effect(a, [batch], mean, engine="exact", max_rows=7)
    assert naive.abs().max() > 1e-3
    assert (naive - exact).abs().max() <= 1e-5
    assert wrapped.training  # the CIE put the model back in training mode


class _Config(PretrainedConfig):
    model_type = "toy"


class _Toy(torch.nn.Module):
    """A decoder-shaped module whose pieces can be left out one at a time."""

    def __init__(self, attention: bool = True, o_proj: str = "o_proj", heads: int | None = 4):
        super().__init__()
        self.config = _Config(**({"num_attention_heads": heads} if heads is not None else {}))
        self.embed = torch.nn.Embedding(10, 8)
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Linear(8, 8)
        if attention:
            layer.self_attn = torch.nn.Module()
            setattr(layer.self_attn, o_proj, torch.nn.Linear(8, 8))
        self.layers = torch.nn.ModuleList([layer])

    def get_input_embeddings(self):
        return self.embed


@pytest.mark.parametrize("model, message", [
    (torch.nn.Sequential(torch.nn.Linear(4, 4)), "cannot find the decoder layers of Sequential: expected a ModuleList named 'layers' or 'h'"),
    (BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)), "cannot find the decoder layers of BertForMaskedLM"),
    (_Toy(attention=False), "decoder layer 0 has no attention module named one of self_attn, attn, attention"),
    (_Toy(o_proj="proj"), "has no output projection named one of o_proj, dense, c_proj, out_proj"),
    (_Toy(heads=None), "names no num_attention_heads"),
    (_Toy(heads=3), "takes 8 features, not a multiple of 3 heads"),
])
def test_unsupported_models_name_what_is_missing(model, message):
    with pytest.raises(ValueError, match="not supported|not a multiple") as err:
        adapt(model)
    assert message in str(err.value)


def test_w_o_of_a_lora_projection_leaves_an_eval_model_in_eval_mode():
    """Reading W_O of a model in eval mode must not switch its projection's LoRA dropout on: afterwards the model's
    output is still deterministic and the projection still in eval mode."""
    wrapped = _lora(model_of("llama"), ["o_proj"], dropout=0.5)
    wrapped.eval()
    a = adapt(wrapped)
    x = torch.randn(3, a.n_heads * a.head_dim, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[0, 5, 9, 11, 7]])
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
    a.head_outputs_to_residual(0, x)
    assert not any(m.training for m in a.o_projs[0].modules())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(wrapped(input_ids=ids).logits, before, rtol=0, atol=0)


def test_head_width_of_a_conv1d_projection_is_its_input_side():
    """transformers' Conv1D stores its weight as (in, out): a projection from 16 head features to 8 hidden ones has
    head_dim 16 / 4 heads = 4, whatever its output width (GPT-2's own c_proj is square and cannot tell)."""
    toy = _Toy()
    toy.layers[0].self_attn.o_proj = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs
    a = adapt(toy)
    assert (a.n_heads, a.head_dim, a.hidden_size) == (4, 4, 8)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.head_outputs_to_residual(0, x), x @ toy.layers[0].self_attn.o_proj.weight)


def test_a_multimodal_models_text_layers_and_a_narrow_embeddings_residual_width():
    """Gemma 3 builds its vision tower (SigLIP ``layers`` with attention) before its language model: the adapter must
    take the text decoder's layers. OPT-350m embeds in 512 and projects up to a 1024-wide residual stream: the FV
    lives in the residual stream, so hidden_size is the attention output's width, not the embedding's."""
    from transformers import Gemma3Config, OPTConfig

    text = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    gemma = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision))
    adapter = adapt(gemma)
    assert adapter.layers is gemma.get_decoder().layers and len(adapter.layers) == 2
    assert (adapter.n_heads, adapter.head_dim, adapter.hidden_size) == (4, 16, 64)
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=100, hidden_size=64, word_embed_proj_dim=32,
                                                     num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                                     max_position_embeddings=64))
    adapter = adapt(opt)
    assert adapter.hidden_size == 64 != opt.get_input_embeddings().embedding_dim
    with torch.no_grad():  # the width the decoder layers really output
        hidden = opt(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states[1]
    assert hidden.shape[-1] == adapter.hidden_size
