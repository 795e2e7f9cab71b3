"""Build small causal LMs from scratch, or load any local Hugging Face checkpoint.

The spurious-forgetting paper pretrains a GPT-NeoX (Pythia-160m shape) from scratch; Llama is the
other architecture people reach for. Both come from ``transformers`` configs, so every checkpoint
forgetlab writes is a normal HF directory that ``AutoModelForCausalLM.from_pretrained`` reads.
A PEFT adapter directory (what a LoRA run saved by PEFT or the HF Trainer holds) loads as its base model with the
adapter merged in, so LoRA runs can be analysed like full fine-tunes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, PreTrainedModel

ARCHITECTURES = ("gpt_neox", "llama")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def adapter_base(path: str | Path) -> str | None:
    """The base model a PEFT adapter directory names (``base_model_name_or_path``: a path, also one relative to the
    adapter's directory, or a hub name), or None for a full checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}/{ADAPTER_CONFIG} is not a JSON object; save the adapter again") from None
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path; set it to the base model's directory")
    # a relative base is first looked for from the adapter's own directory (the chain of adapters `cit run` saves,
    # which must not pick up a folder of the same name under the working directory), then as PEFT reads it
    beside = path / base
    if not Path(base).is_absolute() and beside.exists():
        return str(beside)
    return str(base)


def check_checkpoint(path: str | Path, what: str = "--model") -> None:
    """One line before any work if ``path`` is not a loadable local checkpoint: no config.json, one that does not
    parse, or no weight file (a half-copied download). A PEFT adapter directory needs its adapter weights and, when
    its base is a local path, a loadable base there."""
    from transformers import AutoConfig

    path = Path(path)
    base = adapter_base(path)
    if base is not None:
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
            raise FileNotFoundError(f"{what} {path} is a PEFT adapter directory without adapter weights "
                                    f"({' or '.join(ADAPTER_WEIGHTS)}); copy the whole directory")
        if Path(base).exists() or base.startswith((".", "/")):  # a local path (a hub name is left to the loader)
            check_checkpoint(base, f"the base model of {what} {path},")
        return
    if not (path / "config.json").is_file():
        older = path.with_name(path.name + ".old")
        if not path.exists() and (older / "config.json").is_file():  # replace_dir was killed between its renames
            raise FileNotFoundError(f"{what} {path} is missing, but a save killed while replacing it left the "
                                    f"previous copy in {older}; pass that, or rerun the job that writes it")
        raise FileNotFoundError(f"{what} {path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"{what} {path}: config.json cannot be read ({detail})") from None
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{what} {path} has no weights (model.safetensors or pytorch_model.bin); "
                                "copy the whole checkpoint directory")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a from-scratch model; ``checkpoint`` instead loads a local HF model directory."""

    architecture: str = field(default="llama", metadata={"help": "gpt_neox | llama"})
    d_model: int = field(default=128, metadata={"help": "hidden size"})
    n_layers: int = field(default=4, metadata={"help": "decoder layers"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    d_ff: int = field(default=0, metadata={"help": "MLP width; 0 means 4*d_model (NeoX) or 8/3*d_model (Llama)"})
    max_positions: int = field(default=256, metadata={"help": "context length"})
    checkpoint: str = field(default="", metadata={"help": "local HF checkpoint dir to start from instead"})

    def validate(self) -> None:
        if self.checkpoint:
            if not Path(self.checkpoint, "config.json").is_file() and adapter_base(self.checkpoint) is None:
                raise ValueError(f"model.checkpoint={self.checkpoint!r} has no config.json; pass a Hugging Face checkpoint "
                                 "(or PEFT adapter) directory")
            return
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={self.architecture!r} is unknown; use one of {', '.join(ARCHITECTURES)}")
        for name in ("d_model", "n_layers", "n_heads", "max_positions"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if not self.d_ff >= 0:
            raise ValueError(f"model.d_ff={self.d_ff} must not be negative (0 gives the architecture's default width)")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; change one of them")


def build_model(config: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, bos_id: int, seed: int) -> PreTrainedModel:
    """A randomly initialised model (seeded), or the checkpoint named in the config."""
    config.validate()
    if config.checkpoint:
        model = load_model(config.checkpoint)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ValueError(f"model.checkpoint={config.checkpoint} has {model.get_input_embeddings().num_embeddings} "
                             f"embeddings but its tokenizer has {vocab_size} tokens; save the matching tokenizer with it")
        return model
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
                  num_attention_heads=config.n_heads, max_position_embeddings=config.max_positions,
                  pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id, tie_word_embeddings=False)
    if config.architecture == "gpt_neox":
        hf_config = GPTNeoXConfig(intermediate_size=config.d_ff or 4 * config.d_model, rotary_pct=0.25,
                                  use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0, **common)
    else:
        d_ff = config.d_ff or int(8 * config.d_model / 3 + 63) // 64 * 64
        hf_config = LlamaConfig(intermediate_size=d_ff, num_key_value_heads=config.n_heads, **common)
    model = AutoModelForCausalLM.from_config(hf_config)
    return model


@contextmanager
def peft_without_upstream_deprecation() -> Iterator[None]:
    """PEFT reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
    wrap or adapter load; it is PEFT's to change, not the user's, so it is silenced here (and only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local HF checkpoint, in float32 unless asked (training keeps fp32 master weights; a LoRA run
    on a 7B model may keep its frozen base in bfloat16, half the memory). A PEFT adapter directory gives its base
    with the adapter merged: a plain model with the base's parameter names."""
    base = adapter_base(path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return merge_adapter(load_model(base, dtype), path)


def merge_adapter(model: PreTrainedModel, path: str | Path) -> PreTrainedModel:
    """``model`` with the PEFT adapter in ``path`` merged into its weights, in place (``model`` must be the adapter's
    base: what :func:`load_model` gives for the base it names)."""
    from peft import PeftModel

    with peft_without_upstream_deprecation():
        merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return merged.requires_grad_(True)  # PEFT froze the base for the adapter; a loaded model trains like any other


def config_source(path: str | Path) -> str:
    """Where a checkpoint's config.json is: the directory itself, or a PEFT adapter's base model (down a chain of
    adapters, each on the one before)."""
    base = adapter_base(path)
    return str(path) if base is None else config_source(base)


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a checkpoint; for a PEFT adapter directory saved without one, its base model's."""
    from transformers import AutoTokenizer

    base = adapter_base(path)
    if base is not None and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(base)
    return AutoTokenizer.from_pretrained(str(path))


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass, non-reentrant (so tensors read by hooks keep their gradients),
    through whichever name this transformers version has (``gradient_checkpointing_enable`` before v5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers, found structurally rather than by parameter-name substrings.

    The first ``ModuleList`` named ``layers`` or ``h`` in the text decoder (``get_decoder()``, where the model names
    one: a multimodal model's vision tower also has ``layers``, built first), else anywhere in the module tree, so
    wrappers (PEFT) that nest the HF model deeper are handled without per-wrapper code.
    """
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    for root in ([decoder] if isinstance(decoder, torch.nn.Module) else []) + [model]:
        for path, module in root.named_modules():
            if isinstance(module, torch.nn.ModuleList) and path.rsplit(".", 1)[-1] in ("layers", "h") and len(module):
                return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList named 'layers' or 'h'")
