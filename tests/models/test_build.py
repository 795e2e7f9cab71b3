"""From-scratch model shapes, seeds and special-token ids, and which checkpoint directories load, checked against
values worked out by hand (the HF config read back, never the builder's own arithmetic)."""

import warnings

import pytest
import torch

from forgetlab.models.build import ModelConfig, build_model, check_checkpoint, load_model


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 48, "n_layers": 1, "n_heads": 2, "max_positions": 16, **kw})


@pytest.mark.parametrize("architecture, d_model, d_ff, want", [
    # Llama: 8/3 · d_model rounded *up* to a multiple of 64 (LLaMA's SwiGLU width): 8·128/3 = 341.3 -> 384,
    # 8·96/3 = 256 exactly -> 256, 8·48/3 = 128 -> 128, 8·40/3 = 106.7 -> 128
    ("llama", 128, 0, 384), ("llama", 96, 0, 256), ("llama", 48, 0, 128), ("llama", 40, 0, 128),
    ("gpt_neox", 48, 0, 192),  # NeoX: 4 · d_model
    ("llama", 48, 100, 100), ("gpt_neox", 48, 100, 100),  # an explicit d_ff wins on both
])
def test_mlp_width_defaults_and_explicit_d_ff(architecture, d_model, d_ff, want):
    """``d_ff=0`` means 8/3·d_model rounded up to 64 (Llama) or 4·d_model (NeoX); any other value is the width."""
    n_heads = 2
    model = build_model(small(architecture=architecture, d_model=d_model, n_heads=n_heads, d_ff=d_ff), 20, 0, 1, 2, seed=0)
    assert model.config.intermediate_size == want
    up = next(m for name, m in model.named_modules() if name.endswith(("mlp.up_proj", "mlp.dense_h_to_4h")))
    assert up.weight.shape == (want, d_model)


@pytest.mark.parametrize("setting, message", [
    ({"checkpoint": "/no/such/model"}, "model.checkpoint='/no/such/model' has no config.json; pass a Hugging Face "
                                       "checkpoint (or PEFT adapter) directory"),
    ({"architecture": "gpt2"}, "model.architecture='gpt2' is unknown; use one of gpt_neox, llama"),
    ({"d_model": 0}, "model.d_model=0 must be positive"),
    ({"n_layers": -1}, "model.n_layers=-1 must be positive"),
    ({"n_heads": 0}, "model.n_heads=0 must be positive"),
    ({"max_positions": 0}, "model.max_positions=0 must be positive"),
    ({"d_ff": -1}, "model.d_ff=-1 must not be negative (0 gives the architecture's default width)"),
    ({"d_model": 48, "n_heads": 5}, "model.d_model=48 is not divisible by n_heads=5; change one of them"),
])
def test_every_invalid_model_config_is_refused_in_one_line(setting, message):
    """Each check of ``ModelConfig.validate``, before any tensor is made (build_model runs it first)."""
    with pytest.raises(ValueError) as err:
        small(**setting).validate()
    assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^model\."):
        build_model(small(**setting), 20, 0, 1, 2, seed=0)


def test_a_checkpoint_with_fewer_embeddings_than_the_tokenizer_has_tokens_is_refused(tmp_path):
    build_model(small(), 20, 0, 1, 2, seed=0).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(checkpoint=str(tmp_path / "m")), 21, 0, 1, 2, seed=0)
    assert str(err.value) == (f"model.checkpoint={tmp_path / 'm'} has 20 embeddings but its tokenizer has 21 tokens; "
                              "save the matching tokenizer with it")
    same = build_model(ModelConfig(checkpoint=str(tmp_path / "m")), 20, 0, 1, 2, seed=0)
    assert same.get_input_embeddings().num_embeddings == 20


def test_special_token_ids_and_untied_unembedding():
    """pad/eos/bos ids land in the config under their own names (generation stops at eos), and the unembedding
    is a matrix of its own."""
    for architecture in ("llama", "gpt_neox"):
        model = build_model(small(architecture=architecture), 20, 3, 5, 7, seed=0)
        assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (3, 5, 7)
        assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_the_seed_alone_decides_the_initial_weights():
    """Same seed: identical weights whatever the global random state was before; another seed: other weights."""
    torch.manual_seed(123)
    a = build_model(small(), 20, 0, 1, 2, seed=4).state_dict()
    torch.rand(10)
    b = build_model(small(), 20, 0, 1, 2, seed=4).state_dict()
    c = build_model(small(), 20, 0, 1, 2, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_check_checkpoint_accepts_each_weight_format_and_load_model_keeps_the_dtype(tmp_path):
    """A checkpoint saved as pytorch_model.bin (older or non-safetensors saves) is loadable; so is safetensors.
    ``load_model(path, dtype)`` returns weights in that dtype, float32 by default."""
    model = build_model(small(), 20, 0, 1, 2, seed=0)
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model.save_pretrained(tmp_path / "st")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file() and not list((tmp_path / "bin").glob("*.safetensors"))
    for name in ("bin", "st"):
        check_checkpoint(tmp_path / name)
    assert {p.dtype for p in load_model(tmp_path / "st").parameters()} == {torch.float32}
    half = load_model(tmp_path / "st", torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    w = model.get_input_embeddings().weight
    assert torch.equal(half.get_input_embeddings().weight, w.to(torch.bfloat16))
    (tmp_path / "st" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        check_checkpoint(tmp_path / "st")


def test_a_peft_adapter_directory_loads_as_its_base_with_the_update_merged_by_hand(tmp_path):
    """A LoRA run saved by PEFT holds only the adapter. Loading it gives the base with W + (α/r)·B·A in each target
    (computed here by hand from the saved factors), every other weight the base's; the tokenizer falls back to the
    base's; bad adapter directories are one clear error; analyze angles reads it like a full checkpoint."""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from forgetlab.cli.main import app
    from forgetlab.models.build import adapter_base, load_tokenizer
    from forgetlab.models.tokenizers import build_word_tokenizer
    from forgetlab.models.zoo import random_model, tiny_config

    tok = build_word_tokenizer([f"w{i}" for i in range(20)])
    base_dir = tmp_path / "base"
    random_model(tiny_config("llama", len(tok), n_layers=2), seed=0).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    rank, alpha = 4, 8
    peft = get_peft_model(load_model(base_dir), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0))
    with torch.no_grad():  # B starts at zero; give it values so the merge changes something
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    adapter_dir = tmp_path / "adapter"
    peft.save_pretrained(adapter_dir)
    assert not (adapter_dir / "config.json").exists() and adapter_base(adapter_dir) == str(base_dir)

    with warnings.catch_warnings(record=True) as seen:  # PEFT's use of a deprecated transformers property stays quiet
        warnings.simplefilter("always")
        merged, base = load_model(adapter_dir).state_dict(), load_model(base_dir).state_dict()
        from forgetlab.models.lora import wrap_lora

        wrap_lora(load_model(base_dir), ("q_proj",))
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        a_key = next((k for k in factors if k.endswith(f"{module}.lora_A.weight")), None)
        expected = weight if a_key is None else \
            weight + (alpha / rank) * factors[a_key.replace("lora_A", "lora_B")] @ factors[a_key]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert sum(k.endswith("lora_A.weight") for k in factors) == 4  # q and v of two layers
    assert load_tokenizer(adapter_dir).get_vocab() == tok.get_vocab()
    check_checkpoint(adapter_dir)

    out = tmp_path / "angles"
    result = CliRunner().invoke(app, ["analyze", "angles", "--a1", str(base_dir), "--a2", str(adapter_dir), "--b1",
                                      str(base_dir), "--b2", str(adapter_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "angles.json").read_text())["rows"]
    for r in rows:  # B = A: each LoRA update lies in its own subspace (0°), of at most the LoRA rank
        if r["component"] in ("q", "v"):
            assert 1 <= r["rank_b"] <= rank and r["mean_angle_deg"] == pytest.approx(0.0, abs=1e-3)
        else:
            assert r["rank_b"] == 0

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="PEFT adapter directory without adapter weights"):
        check_checkpoint(no_weights)
    lost_base = tmp_path / "lost_base"
    lost_base.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (lost_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    (lost_base / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"the base model of --model {lost_base}, {tmp_path / 'gone'} is not"):
        check_checkpoint(lost_base)
