"""Randomly initialised models of real architectures, built from configs (no downloads).

Tests need every architecture the function-vector tools claim to support, and benchmarks need the
*shape* of a 7B model without its weights; both come from ``transformers`` configs here. ``tiny``
shapes are for unit tests (a few layers, fast on a CPU); named shapes reproduce published models.
"""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen3Config)

TINY_ARCHITECTURES = ("llama", "llama_gqa", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gptj")
SHAPES = ("llama-2-7b", "llama-3-8b")


def tiny_config(architecture: str, vocab_size: int, n_layers: int = 3, n_heads: int = 4, d_model: int = 64) -> PretrainedConfig:
    """A small config of a real architecture; dropout off so patched and clean runs are comparable."""
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    llama_like = dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      intermediate_size=2 * d_model, max_position_embeddings=512, **common)
    if architecture == "llama":
        return LlamaConfig(**llama_like)
    if architecture == "llama_gqa":
        return LlamaConfig(num_key_value_heads=max(1, n_heads // 2), **llama_like)
    if architecture == "mistral":
        return MistralConfig(num_key_value_heads=max(1, n_heads // 2), sliding_window=4096, **llama_like)
    if architecture == "qwen2":
        return Qwen2Config(num_key_value_heads=max(1, n_heads // 2), **llama_like)
    if architecture == "qwen3":  # explicit head_dim different from hidden / heads, and q/k norms
        return Qwen3Config(num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads + 8, **llama_like)
    if architecture == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=512, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             intermediate_size=4 * d_model, max_position_embeddings=512, rotary_pct=0.25,
                             use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0, **common)
    if architecture == "gptj":
        return GPTJConfig(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=512, rotary_dim=8,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    raise ValueError(f"unknown tiny architecture {architecture!r}; use one of {', '.join(TINY_ARCHITECTURES)}")


def shape_config(shape: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The config of a published model's shape (random weights are built from it, never downloaded)."""
    if shape == "llama-2-7b":
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=vocab_size or 32000, max_position_embeddings=4096,
                           rms_norm_eps=1e-5)
    if shape == "llama-3-8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=vocab_size or 128256, max_position_embeddings=8192,
                           rope_theta=500000.0, rms_norm_eps=1e-5)
    raise ValueError(f"unknown model shape {shape!r}; use one of {', '.join(SHAPES)}")


def random_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> PreTrainedModel:
    """A seeded random model in eval mode, created directly on ``device`` (a 7B model never touches host RAM)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
