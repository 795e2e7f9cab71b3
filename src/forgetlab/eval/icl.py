"""In-context-learning scores of a model on a task: few-shot, instructed and bare zero-shot, shuffled.

All four read the first answer token (top-1), which for a word-level world is the whole answer.
Queries come from the task's test split; demonstrations from its train split.
"""

from __future__ import annotations

import torch

from forgetlab.fv.evaluate import first_token_correct
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import ICLPrompt, ICLTask, PromptFormat, counterfactuals, sample_prompts
from forgetlab.models.adapter import ModelAdapter

PROMPT_KINDS = ("ten_shot", "zero_shot_instruction", "zero_shot_bare", "shuffled_ten_shot")


def icl_prompts(task: ICLTask, n: int, shots: int = 10, seed: int = 0, split_seed: int = 0) -> dict[str, list[ICLPrompt]]:
    """The four prompt kinds over the same ``n`` test queries."""
    few = sample_prompts(task.splits(split_seed), n, shots, seed, query_split="test", task_name=task.name)
    return {"ten_shot": few,
            "zero_shot_instruction": [p.zero_shot().with_instruction(task.instruction) for p in few],
            "zero_shot_bare": [p.zero_shot() for p in few],
            "shuffled_ten_shot": counterfactuals(few, seed)}


@torch.no_grad()
def accuracy(adapter: ModelAdapter, tokenizer, prompts: list[ICLPrompt], fmt: PromptFormat = PromptFormat(),
             batch_size: int = 64) -> float:
    device = next(adapter.model.parameters()).device
    hits = torch.cat([first_token_correct(adapter, b) for b in batches(tokenizer, prompts, fmt, batch_size, device)])
    return int(hits.sum()) / len(hits)  # exact, as the FV drift's own scores (a float32 mean is off in the 8th digit)


def icl_scores(adapter: ModelAdapter, tokenizer, task: ICLTask, n: int = 40, shots: int = 10, seed: int = 0,
               split_seed: int = 0, kinds: tuple[str, ...] = PROMPT_KINDS) -> dict[str, float]:
    was_training = adapter.model.training
    adapter.model.eval()
    prompts = icl_prompts(task, n, shots, seed, split_seed)
    out = {kind: accuracy(adapter, tokenizer, prompts[kind]) for kind in kinds}
    adapter.model.train(was_training)
    return out
