"""Does a function vector carry its task? Zero-shot and shuffled-label accuracy with and without it.

Scores are the first answer token's top-1 accuracy (cheap, from one pass) and the generated-string
match (greedy decoding with the vector added at the last prompt token and every generated token).
The layer sweep runs all layers in batched passes: the batch holds one copy of the prompts per layer
and each copy gets the vector at its own layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from forgetlab.fv.hooks import add_to_residual, function_vector_sweep
from forgetlab.fv.prompts import PromptBatch, batches
from forgetlab.fv.tasks import ICLPrompt, ICLTask, PromptFormat, counterfactuals, sample_prompts
from forgetlab.models.tokenizers import pad_id
from forgetlab.models.adapter import ModelAdapter


@dataclass(frozen=True)
class FVEvalSettings:
    n_prompts: int = field(default=50, metadata={"help": "test queries"})
    shots: int = field(default=10, metadata={"help": "demonstrations in the (shuffled) few-shot prompts"})
    layer: int | None = field(default=None, metadata={"help": "edit layer for generation; default: best of the sweep"})
    alpha: float = field(default=1.0, metadata={"help": "scale of the added vector (negative subtracts)"})
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = field(default=8, metadata={"help": "generation length for the string match"})
    prompt_format: PromptFormat = field(default_factory=PromptFormat)

    def validate(self) -> None:
        for name in ("n_prompts", "shots", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


@torch.no_grad()
def first_token_correct(adapter: ModelAdapter, batch: PromptBatch) -> torch.Tensor:
    logits = adapter.model(**batch.model_inputs()).logits[:, -1]
    return (logits.argmax(-1) == batch.targets).cpu()


@torch.no_grad()
def sweep_layers(adapter: ModelAdapter, batch_list: Sequence[PromptBatch], vector: torch.Tensor,
                 layers: Sequence[int], alpha: float = 1.0, layers_per_pass: int = 8) -> list[float]:
    """First-token accuracy with the vector at each layer, ``layers_per_pass`` layers per forward pass."""
    hits = torch.zeros(len(layers))
    total = 0
    for batch in batch_list:
        n = len(batch)
        for start in range(0, len(layers), layers_per_pass):
            group = list(layers[start:start + layers_per_pass])
            rep = PromptBatch(batch.input_ids.repeat(len(group), 1), batch.attention_mask.repeat(len(group), 1),
                              batch.targets.repeat(len(group)))
            with function_vector_sweep(adapter, vector.to(batch.input_ids.device), group, n, alpha):
                correct = first_token_correct(adapter, rep).view(len(group), n)
            hits[start:start + len(group)] += correct.sum(1).float()
        total += n
    return (hits / max(1, total)).tolist()


@torch.no_grad()
def generated_match(adapter: ModelAdapter, tokenizer, batch_list: Sequence[PromptBatch], answers: Sequence[str],
                    max_new_tokens: int, stop: str = "\n") -> float:
    """Fraction of prompts whose greedy continuation, cut at ``stop``, equals the answer."""
    pad = pad_id(tokenizer)
    texts = []
    for batch in batch_list:
        out = adapter.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)
        texts += tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return sum(t.split(stop)[0].strip() == a.strip() for t, a in zip(texts, answers)) / max(1, len(answers))


def _score(adapter, tokenizer, prompts: list[ICLPrompt], settings: FVEvalSettings, vector=None, layer=None) -> dict:
    device = next(adapter.model.parameters()).device
    batch_list = list(batches(tokenizer, prompts, settings.prompt_format, settings.batch_size, device))
    answers = [p.answer for p in prompts]
    edit = nullcontext() if vector is None else add_to_residual(adapter, vector.to(device), layer, settings.alpha)
    with edit:
        top1 = torch.cat([first_token_correct(adapter, b) for b in batch_list]).float().mean().item()
        match = generated_match(adapter, tokenizer, batch_list, answers, settings.max_new_tokens)
    return {"top1": top1, "string_match": match}


def evaluate_function_vector(adapter: ModelAdapter, tokenizer, task: ICLTask, vector: torch.Tensor,
                             settings: FVEvalSettings = FVEvalSettings(), layers: Sequence[int] | None = None) -> dict:
    """Zero-shot, few-shot and shuffled few-shot scores, plus zero-shot and shuffled with the vector added."""
    settings.validate()
    if vector.shape != (adapter.hidden_size,):
        raise ValueError(f"function vector has shape {tuple(vector.shape)}; this model needs ({adapter.hidden_size},)")
    layers = list(range(adapter.n_layers)) if layers is None else list(layers)
    for layer in layers + ([settings.layer] if settings.layer is not None else []):
        if not 0 <= layer < adapter.n_layers:
            raise ValueError(f"layer {layer} is out of range; the model has layers 0..{adapter.n_layers - 1}")
    was_training = adapter.model.training
    try:
        adapter.model.eval()
        splits = task.splits(settings.seed)
        few = sample_prompts(splits, settings.n_prompts, settings.shots, settings.seed + 2, query_split="test",
                             task_name=task.name)
        zero = [p.zero_shot() for p in few]
        shuffled = counterfactuals(few, settings.seed + 2)
        device = next(adapter.model.parameters()).device
        # the edit layer is chosen on valid queries, so the scores on the test queries are not a maximum over layers
        valid = [p.zero_shot() for p in sample_prompts(splits, settings.n_prompts, settings.shots, settings.seed + 3,
                                                       query_split="valid", task_name=task.name)]
        valid_batches = list(batches(tokenizer, valid, settings.prompt_format, settings.batch_size, device))
        by_layer = sweep_layers(adapter, valid_batches, vector, layers, settings.alpha)
        best = layers[max(range(len(layers)), key=lambda i: by_layer[i])]
        edit = best if settings.layer is None else settings.layer
        result = {
            "task": task.name, "n_prompts": settings.n_prompts, "shots": settings.shots, "alpha": settings.alpha,
            "layers": layers, "zero_shot_fv_top1_by_layer": by_layer, "layer_chosen_on": "valid", "best_layer": best,
            "edit_layer": edit,  # the sweep's baseline, on the same valid queries
            "zero_shot_valid_top1": torch.cat([first_token_correct(adapter, b) for b in valid_batches]).float().mean().item(),
            "zero_shot": _score(adapter, tokenizer, zero, settings),
            "zero_shot_fv": _score(adapter, tokenizer, zero, settings, vector, edit),
            "few_shot": _score(adapter, tokenizer, few, settings),
            "shuffled": _score(adapter, tokenizer, shuffled, settings),
            "shuffled_fv": _score(adapter, tokenizer, shuffled, settings, vector, edit),
        }
        return result
    finally:  # an error (a task too small for its prompts) leaves the caller's model as it was
        adapter.model.train(was_training)
