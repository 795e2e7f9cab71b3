"""Batched greedy generation with left padding, and the answer a generation gives (its first line)."""

from __future__ import annotations

import torch

from forgetlab.eval.exact_match import left_pad
from forgetlab.models.tokenizers import pad_id
from forgetlab.train import distributed


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32, *,
             skip_blank_lines: bool = False) -> list[str]:
    """Greedy continuations, batched with left padding, cut at the first newline.

    With ``skip_blank_lines`` the answer is the first line that is not blank: a model trained to stop at eos
    (a chat model on natural-instructions prompts) often starts its answer on a new line after "Output:",
    while an ICL-world model ends every answer with a newline, so a leading one is its empty answer.
    Under several processes each generates its share of the prompts and all get every answer back.
    """
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    mine, texts = distributed.share(prompts), []
    for start in range(0, len(mine), batch_size):
        ids, mask = (t.to(device) for t in left_pad(mine[start:start + batch_size], pad))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [answer_text(t, skip_blank_lines) for t in distributed.gather_shares(texts, len(prompts))]


def answer_text(generated: str, skip_blank_lines: bool = False) -> str:
    """The answer in a generation: its first line (the first non-blank one with ``skip_blank_lines``), stripped."""
    return (generated.lstrip() if skip_blank_lines else generated).split("\n")[0].strip()
