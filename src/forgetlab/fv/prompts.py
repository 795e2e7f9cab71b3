"""Prompts to token ids: the answer's first token taken *in context*, left-padded batches.

The target of a prompt is the first token of ``answer_sep + answer`` as the tokenizer splits the
whole string ``prompt + answer_sep + answer`` (a BPE tokenizer may merge differently in isolation).
Batches are left-padded, so the last prompt token sits at position -1 of every row and positions
count from each row's first real token, as ``generate`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from forgetlab.eval.exact_match import left_pad
from forgetlab.fv.tasks import ICLPrompt, PromptFormat
from forgetlab.models.tokenizers import pad_id, split_in_context


@dataclass
class PromptBatch:
    input_ids: torch.Tensor        # (B, T), left-padded
    attention_mask: torch.Tensor   # (B, T), 1 on real tokens
    targets: torch.Tensor          # (B,), first answer token

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_prompt(tokenizer, prompt: ICLPrompt, fmt: PromptFormat) -> tuple[list[int], int, list[int]]:
    """Prompt ids, the first answer token in context, and all answer ids in context."""
    ids, answer = split_in_context(tokenizer, fmt.text(prompt), fmt.answer_sep + prompt.answer)
    prefix = [tokenizer.bos_token_id] if fmt.bos and tokenizer.bos_token_id is not None else []
    return prefix + ids, answer[0], answer


def collate(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> PromptBatch:
    input_ids, mask = left_pad([ids for ids, _ in encoded], pad_id)
    return PromptBatch(input_ids, mask, torch.tensor([t for _, t in encoded], dtype=torch.long))


def batches(tokenizer, prompts: Sequence[ICLPrompt], fmt: PromptFormat, batch_size: int,
            device: torch.device | str = "cpu") -> Iterator[PromptBatch]:
    pad = pad_id(tokenizer)
    encoded = [encode_prompt(tokenizer, p, fmt)[:2] for p in prompts]
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start:start + batch_size], pad).to(device)
