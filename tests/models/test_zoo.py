"""Named model shapes against the published models' parameter totals (built on the meta device: nothing is allocated),
and the tiny configs of every architecture the function-vector tools claim."""

import pytest

from forgetlab.models.zoo import SHAPES, TINY_ARCHITECTURES, random_model, shape_config, tiny_config

# Parameter totals as published for the real checkpoints (untied input and output embeddings in both).
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_have_the_published_parameter_totals(shape):
    """A typo in a width, a layer count or the key/value heads changes the total: 6,738,415,616 for Llama-2-7B
    (32 layers of 4·4096² attention + 3·4096·11008 MLP + 2 norms, 2·32000·4096 embeddings, a final norm) and
    8,030,261,248 for Llama-3-8B (grouped keys/values of 8 heads: 2·4096² + 2·4096·1024 attention, MLP width 14336,
    vocabulary 128256)."""
    model = random_model(shape_config(shape), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert n_params(model) == PUBLISHED[shape]


def test_shape_details_that_the_totals_do_not_pin():
    """Context length and RoPE base differ between the two Llamas, the norm's epsilon does not; the head layout is
    fixed by the total only together with the key/value width, so it is read from the modules."""
    l2, l3 = shape_config("llama-2-7b"), shape_config("llama-3-8b")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    assert l2.max_position_embeddings == 4096 and l3.max_position_embeddings == 8192
    for config, theta in ((l2, 10000.0), (l3, 500000.0)):  # the base the model's rotary embedding really uses
        inv_freq = LlamaRotaryEmbedding(config).inv_freq
        assert inv_freq.shape == (64,) and inv_freq[1].item() == pytest.approx(theta ** (-2 / 128), rel=1e-5)
    attn = random_model(l3, device="meta").model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (4096, 4096) and tuple(attn.k_proj.weight.shape) == (1024, 4096)
    assert not l2.tie_word_embeddings and not l3.tie_word_embeddings
    assert l2.rms_norm_eps == l3.rms_norm_eps == 1e-5  # both published configs (LlamaConfig's default is 1e-6)


def test_a_shape_with_another_vocabulary_changes_only_the_embeddings():
    """vocab_size replaces the published one in both the input embedding and the output head (4096 wide each)."""
    model = random_model(shape_config("llama-2-7b", vocab_size=1000), device="meta")
    assert n_params(model) == PUBLISHED["llama-2-7b"] - 2 * (32000 - 1000) * 4096
    with pytest.raises(ValueError, match="unknown model shape 'gpt-5'; use one of llama-2-7b, llama-3-8b"):
        shape_config("gpt-5")


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_tiny_configs_build_with_the_layers_and_vocabulary_asked(architecture):
    """Every tiny architecture builds, with the asked depth and a 97-word vocabulary in and out."""
    model = random_model(tiny_config(architecture, vocab_size=97, n_layers=2), device="meta")
    assert model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().weight.shape[0] == 97 == model.get_output_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight  # untied
