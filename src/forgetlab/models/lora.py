"""LoRA through PEFT: wrapping a model on named modules (checked first), the A matrices O-LoRA reads, and the
merged weights of a per-task checkpoint, built without a second copy of the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forgetlab.models.build import peft_without_upstream_deprecation


def check_lora_targets(model, targets: Sequence[str]) -> None:
    """Every target names a layer LoRA can adapt: a linear layer (GPT-2's Conv1D too) or an embedding."""
    from transformers.pytorch_utils import Conv1D

    kinds: dict[str, set[str]] = {}  # module name (its last part) -> the classes of the modules so named
    for n, m in model.named_modules():
        kinds.setdefault(n.rsplit(".", 1)[-1], set()).add(type(m).__name__)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))})
    fix = f"its linear layers are {linear} (set e.g. --set lora_targets=[{','.join(linear[:2])}])"
    missing = [t for t in targets if t not in kinds]
    if missing:
        raise ValueError(f"lora_targets {missing} are not modules of this {type(model).__name__}; {fix}")
    adaptable = set(linear) | {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    blocks = [t for t in targets if t not in adaptable]
    if blocks:
        raise ValueError(f"lora_targets {blocks} name {', '.join(k for t in blocks for k in sorted(kinds[t]))} "
                         f"modules of this {type(model).__name__}, which LoRA cannot adapt (it adapts linear layers); {fix}")


def wrap_lora(model, targets: Sequence[str], r: int = 8, alpha: int = 16, dropout: float = 0.1):
    """``model`` as a PEFT LoRA model on the modules named ``targets`` (the FV paper's r, α and dropout by default)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    check_lora_targets(model, targets)
    modules = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    # GPT-2's Conv1D stores its weight transposed; PEFT flips the flag per module anyway, but warns on each
    transposed = bool(modules) and all(isinstance(m, Conv1D) for m in modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM",
                        fan_in_fan_out=transposed)
    with peft_without_upstream_deprecation():
        return get_peft_model(model, config)


def lora_a_matrices(model) -> dict[str, torch.Tensor]:
    """The trainable LoRA ``A`` (r, in) of every adapted module, by module name (O-LoRA's subspaces)."""
    return {name: m.lora_A["default"].weight for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def merged_lora_weights(model) -> dict[str, torch.Tensor]:
    """The weights ``merge_and_unload`` would give a PEFT LoRA model, built one tensor at a time on the CPU.

    Saving a per-task checkpoint of a 7B model this way needs no second copy of the model on the GPU
    (``copy.deepcopy(model).merge_and_unload()`` doubles its memory); the sum is taken in the wider of the
    two dtypes and rounded to the base weight's, as PEFT's in-place merge does.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    merged = {}
    for key, value in base.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if ".lora_" in key:
            continue
        if owner.endswith(".base_layer") and owner[:-len(".base_layer")] in adapted:
            owner = owner[:-len(".base_layer")]
            if leaf == "weight":
                layer = adapted[owner]
                for name in layer.active_adapters:
                    value = (value + layer.get_delta_weight(name)).to(value.dtype)
        merged[f"{owner}.{leaf}" if owner else leaf] = value.detach().to("cpu", copy=True)
    return merged
