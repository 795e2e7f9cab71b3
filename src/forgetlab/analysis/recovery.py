"""Recovery as a generic test of spurious forgetting, for any checkpoints and any QA data.

For each checkpoint: exact match on the ``eval`` rows (current), a brief fine-tune on the disjoint
``fit`` rows, exact match again (recovered); with the score ``before`` the forgetting, the spurious
share (recovered − current) / (before − current) (papers.md §4). Run the same on a checkpoint that
never learned the old task (e.g. the pretrained model) as the control: only recovery well above the
control shows that knowledge survived rather than being relearned.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from forgetlab.eval.exact_match import greedy_exact_match
from forgetlab.metrics.cl import share_or_none
from forgetlab.models.tokenizers import pad_id, special_prefix, split_in_context
from forgetlab.train.data import qa_dataset
from forgetlab.train.trainer import EvalSchedule, PhaseConfig, train_phase

DEFAULT_RECOVERY = PhaseConfig(lr=2e-4, epochs=1, batch_size=32, schedule="constant", weight_decay=0.0,
                               checkpoint_every=0, eval=EvalSchedule(dense_every=0, every=0))


def read_qa_rows(path: str | Path) -> list[dict]:
    """JSONL rows with ``prompt`` and ``answer`` strings (the format ``forgetlab biography generate`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist; pass JSONL rows of {{\"prompt\", \"answer\"}}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{path}: line {i + 1} needs string fields 'prompt' and 'answer'")
        rows.append(row)
    if not rows:
        raise ValueError(f"QA file {path} has no rows")
    return rows


def encode_qa(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (after the tokenizer's own prefix, e.g. Llama's BOS) and answer ids, the answer tokenized in
    context (as the prompt continues). A BOS that the tokenizer defines but does not add (the biography world's)
    is left out: its models never saw one."""
    prefix = special_prefix(tokenizer)
    pairs = [split_in_context(tokenizer, row["prompt"], row["answer"]) for row in rows]
    return [prefix + p for p, _ in pairs], [a for _, a in pairs]


def recover(model, tokenizer, fit_rows: list[dict], eval_rows: list[dict], cfg: PhaseConfig = DEFAULT_RECOVERY,
            seed: int = 0, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """{current, recovered, steps} for one model; the model itself is left untouched."""
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    eval_prompts, eval_answers = encode_qa(tokenizer, eval_rows)
    current = greedy_exact_match(model, eval_prompts, eval_answers, eos_id=eos, pad_id=pad).em
    fit_prompts, fit_answers = encode_qa(tokenizer, fit_rows)
    data = qa_dataset(fit_prompts, fit_answers, eos, pad)
    copy_ = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as state:
        outcome = train_phase(copy_, data, cfg, phase="recovery", state_dir=Path(state), seed=seed, log=log,
                              progress=progress)
    copy_.eval()
    recovered = greedy_exact_match(copy_, eval_prompts, eval_answers, eos_id=eos, pad_id=pad).em
    return {"current": current, "recovered": recovered, "steps": outcome.steps}


def recovery_table(checkpoints: list[str | Path], fit_rows: list[dict], eval_rows: list[dict], before: float | None,
                   cfg: PhaseConfig = DEFAULT_RECOVERY, seed: int = 0, progress: bool = False,
                   log: Callable[[str], None] = print) -> list[dict]:
    """One row per checkpoint: current, recovered, and the spurious share when ``before`` is known."""
    import torch

    from forgetlab.models.build import check_checkpoint, load_model, load_tokenizer

    for ckpt in checkpoints:  # all of them before any re-alignment
        check_checkpoint(ckpt, "checkpoint")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for ckpt in checkpoints:
        model = load_model(ckpt).to(device).eval()
        result = recover(model, load_tokenizer(ckpt), fit_rows, eval_rows, cfg, seed, progress, log)
        rows.append({"checkpoint": str(ckpt), "before": before, **result,
                     "spurious_share": share_or_none(before, result["current"], result["recovered"])})
        log(f"[recovery] {ckpt}: current {result['current']:.3f} -> recovered {result['recovered']:.3f}")
    return rows
