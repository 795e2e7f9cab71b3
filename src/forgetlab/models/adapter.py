"""One interface to the attention heads of any Hugging Face causal LM.

Function-vector work needs, per decoder layer, the attention output projection and its *input*: the
concatenated head outputs, which is where a head's activation is read and patched. The module names
differ by architecture (``o_proj``, ``dense``, ``c_proj``, ``out_proj``), GPT-2 uses a transposed
``Conv1D`` and PEFT wraps modules in LoRA layers, so this module finds them structurally and derives
the head width from the projection itself (``in_features // n_heads``), never from ``hidden_size``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import PreTrainedModel

from forgetlab.models.build import decoder_layers

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUTPUT_PROJECTION_NAMES = ("o_proj", "dense", "c_proj", "out_proj")
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm")


def _projection_in_features(module: torch.nn.Module) -> int | None:
    if isinstance(getattr(module, "in_features", None), int):  # nn.Linear and PEFT LoRA layers
        return module.in_features
    base = getattr(module, "base_layer", None)
    if base is not None:
        return _projection_in_features(base)
    weight = getattr(module, "weight", None)
    if weight is not None and hasattr(module, "nf"):  # transformers' Conv1D stores weight as (in, out)
        return weight.shape[0]
    return None


def _projection_out_features(module: torch.nn.Module) -> int:
    if isinstance(getattr(module, "out_features", None), int):  # nn.Linear and PEFT LoRA layers
        return module.out_features
    base = getattr(module, "base_layer", None)
    if base is not None:
        return _projection_out_features(base)
    return module.weight.shape[1]  # transformers' Conv1D stores weight as (in, out)


@dataclass
class ModelAdapter:
    """Where the heads of a model live: ``o_projs[l]`` consumes the ``n_heads * head_dim`` head outputs."""

    model: PreTrainedModel
    layers: torch.nn.ModuleList
    attentions: list[torch.nn.Module]
    o_projs: list[torch.nn.Module]
    n_heads: int
    head_dim: int
    hidden_size: int
    final_norm: torch.nn.Module | None = None  # after the last layer, before the unembedding (None: not found)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def architecture(self) -> str:
        """The model's class, through PEFT's wrapper (``LlamaForCausalLM``): which models an FV taken here fits."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return type(model).__name__

    @cached_property
    def layer_of(self) -> dict[int, int]:
        """Map ``id(module)`` of every submodule of a decoder layer to that layer's index (built once)."""
        return {id(m): index for index, layer in enumerate(self.layers) for m in layer.modules()}

    @torch.no_grad()
    def head_outputs_to_residual(self, layer: int, head_inputs: torch.Tensor) -> torch.Tensor:
        """W_O · x for rows x of concatenated head outputs (no bias), through the real module.

        Calling the module (minus its value at zero) handles Linear, Conv1D and merged-or-not LoRA
        alike, so the function vector uses exactly the weights the forward pass uses. The module runs in eval
        mode: a LoRA adapter's dropout on this projection would otherwise make the vector random. A bfloat16 or
        float16 projection runs as a float32 copy: its bias would not cancel exactly in the half-precision difference.
        """
        proj = self.o_projs[layer]
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in proj.parameters()):
            proj = copy.deepcopy(proj).float()  # one projection (32 MB of a 7B model), only while an FV is built
        x = head_inputs.to(next(proj.parameters()).dtype)
        was_training = proj.training
        proj.eval()
        try:
            return proj(x) - proj(torch.zeros_like(x))
        finally:
            proj.train(was_training)


def adapt(model: PreTrainedModel) -> ModelAdapter:
    """Find layers, attention modules, output projections and head sizes; one clear error otherwise."""
    name = type(model).__name__
    try:
        layers = decoder_layers(model)
    except ValueError as err:
        raise ValueError(f"{name} is not supported by the function-vector tools: {err}") from None
    attentions, o_projs = [], []
    for index, layer in enumerate(layers):
        attention = next((getattr(layer, n) for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
        if attention is None:
            raise ValueError(f"{name} is not supported: decoder layer {index} has no attention module named one of "
                             f"{', '.join(ATTENTION_NAMES)}")
        proj = next((getattr(attention, n) for n in OUTPUT_PROJECTION_NAMES if isinstance(getattr(attention, n, None), torch.nn.Module)), None)
        if proj is None or _projection_in_features(proj) is None:
            raise ValueError(f"{name} is not supported: the attention of layer {index} ({type(attention).__name__}) has no "
                             f"output projection named one of {', '.join(OUTPUT_PROJECTION_NAMES)}")
        attentions.append(attention)
        o_projs.append(proj)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = next((getattr(config, n) for n in ("num_attention_heads", "n_head", "num_heads") if isinstance(getattr(config, n, None), int)), None)
    if n_heads is None:
        raise ValueError(f"{name} is not supported: its config names no num_attention_heads / n_head")
    in_features = _projection_in_features(o_projs[0])
    if in_features % n_heads:
        raise ValueError(f"{name}: the attention output projection takes {in_features} features, not a multiple of "
                         f"{n_heads} heads")
    hidden = _projection_out_features(o_projs[0])  # the residual stream (OPT-350m embeds narrower and projects up)
    return ModelAdapter(model=model, layers=layers, attentions=attentions, o_projs=o_projs, n_heads=n_heads,
                        head_dim=in_features // n_heads, hidden_size=hidden, final_norm=_final_norm(model, layers))


def _final_norm(model: PreTrainedModel, layers: torch.nn.ModuleList) -> torch.nn.Module | None:
    """The norm that the module owning the layer stack applies after it (``norm``, ``ln_f``, ...)."""
    path = next(name for name, module in model.named_modules() if module is layers)
    owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    return next((getattr(owner, n) for n in FINAL_NORM_NAMES if isinstance(getattr(owner, n, None), torch.nn.Module)), None)

