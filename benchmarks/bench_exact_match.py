"""Exact-match evaluation: batched ``greedy_exact_match`` vs one ``model.generate`` call per question, and vs
the usual batched ``model.generate`` on left-padded prompts.

Why: exact match is evaluated many times per phase (dense evaluation right after a task switch), so
forgetlab decodes all questions of a batch together (left-padded prompts, key/value cache, a row is
decided as soon as it leaves the answer, the batch stops once every row is decided). This script
checks that the batched path gives *exactly* the per-question results of the plain approach, greedy
``model.generate`` with ``max_new_tokens = len(answer) + 1`` whose continuation must equal
``answer + [eos]``, on the same model and the same N questions, and how much faster it is
(goal: ``ratio batched/per-question >= 10``). The usual faster way, ``generate`` on a left-padded batch of the
same size for as many tokens as the batch's longest answer needs, is timed too: what batching alone gives, and
what stopping each batch once every row is decided adds on top.

The questions are a seeded sample of the preset world's task-0 test people. By default the model is a
randomly initialised model of the preset's shape; ``--model DIR`` loads a trained checkpoint of the
same world instead. With a random model almost every row is decided at the first answer token, so
the batched path stops early; a trained model answers more tokens correctly and is the harder case.

    python benchmarks/bench_exact_match.py [--preset cpu-demo] [--n 300] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import torch

from forgetlab.eval.exact_match import greedy_exact_match
from forgetlab.experiments.presets import preset_config
from forgetlab.models.build import build_model, load_model
from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.worlds.biography import generate_world

GOAL = 10.0


class ForwardCounter:
    """Counts forward calls of a model (prefill and each cached decoding step count once)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self._hook = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._hook.remove()


@torch.no_grad()
def per_question(model, prompts, answers, eos_id: int, pad_id: int, device) -> tuple[list[bool], list[bool]]:
    """The plain way: one greedy ``generate`` per question; exact = continuation == answer + eos."""
    exact, first = [], []
    for prompt, answer in zip(prompts, answers):
        target = list(answer) + [eos_id]
        ids = torch.tensor([list(prompt)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target),
                             do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id)
        continuation = out[0, ids.shape[1]:].tolist()
        exact.append(continuation == target)
        first.append(bool(continuation) and continuation[0] == target[0])
    return exact, first


@torch.no_grad()
def batched_generate(model, prompts, answers, eos_id: int, pad_id: int, device, batch_size: int) -> tuple[list[bool], list[bool]]:
    """The usual batched way: left-padded prompts, one greedy ``generate`` per batch for the longest answer + eos
    (prompts sorted by length first, as ``greedy_exact_match`` sorts them, so neither side pays more padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    exact, first = [False] * len(prompts), [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows, targets = [prompts[i] for i in idx], [list(answers[i]) + [eos_id] for i in idx]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                             max_new_tokens=max(map(len, targets)), eos_token_id=eos_id, pad_token_id=pad_id)
        for j, (i, target) in enumerate(zip(idx, targets)):
            continuation = out[j, width:].tolist()
            exact[i] = continuation[:len(target)] == target
            first[i] = bool(continuation) and continuation[0] == target[0]
    return exact, first


def check_vocabulary(model_dir: Path, tokenizer, model) -> None:
    """Refuse a checkpoint trained on another world: its token ids would not mean our words."""
    if model.config.vocab_size != len(tokenizer):
        raise SystemExit(f"--model {model_dir}: vocab_size={model.config.vocab_size} but this world's tokenizer has "
                         f"{len(tokenizer)} tokens; pass the --preset/--seed the checkpoint was trained with")
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        saved = json.loads(tok_file.read_text())["model"]["vocab"]
        if saved != tokenizer.get_vocab():
            raise SystemExit(f"--model {model_dir}: its tokenizer differs from this world's; "
                             "pass the --preset/--seed the checkpoint was trained with")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo", help="world (and model shape) to take the questions from")
    parser.add_argument("--seed", type=int, default=0, help="world seed, model seed and question sample seed")
    parser.add_argument("--n", type=int, default=300, help="questions (from task-0 test people)")
    parser.add_argument("--model", type=Path, default=None, help="trained HF checkpoint dir of the same world")
    parser.add_argument("--batch-size", type=int, default=0, help="questions decoded together (0 = the preset's)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cfg = preset_config(args.preset, seed=args.seed)
    batch_size = args.batch_size or cfg.eval.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = generate_world(cfg.world)
    tokenizer = build_word_tokenizer(world.word_list())
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    examples = world.qa_examples(world.splits["task0_test"])
    if args.n > len(examples):
        parser.error(f"--n {args.n}: the {args.preset} world has only {len(examples)} task-0 test questions")
    examples = [examples[i] for i in sorted(random.Random(args.seed).sample(range(len(examples)), args.n))]
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]

    if args.model is not None:
        model = load_model(args.model)
        check_vocabulary(args.model, tokenizer, model)
        source = f"checkpoint {args.model}"
    else:
        model = build_model(cfg.model, len(tokenizer), pad, eos, tokenizer.bos_token_id, args.seed)
        source = f"random init, {args.preset} shape"
    model.to(device).eval()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}  "
          f"[torch threads={torch.get_num_threads()}]  model: {source} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    print(f"questions: {args.n} from task-0 test people of {args.preset} (seed {args.seed}); "
          f"answer tokens mean {sum(map(len, answers)) / len(answers):.2f}, max {max(map(len, answers))}; "
          f"batch size {batch_size}")

    # Untimed warmup of both paths on a few questions.
    greedy_exact_match(model, prompts[:8], answers[:8], eos_id=eos, pad_id=pad, batch_size=batch_size)
    per_question(model, prompts[:2], answers[:2], eos, pad, device)
    batched_generate(model, prompts[:8], answers[:8], eos, pad, device, batch_size)

    counter = ForwardCounter(model)
    t0 = time.perf_counter()
    batched = greedy_exact_match(model, prompts, answers, eos_id=eos, pad_id=pad, batch_size=batch_size)
    t1 = time.perf_counter()
    batched_calls = counter.calls
    single_exact, single_first = per_question(model, prompts, answers, eos, pad, device)
    t2 = time.perf_counter()
    single_calls = counter.calls - batched_calls
    usual_exact, usual_first = batched_generate(model, prompts, answers, eos, pad, device, batch_size)
    t3 = time.perf_counter()
    usual_calls = counter.calls - batched_calls - single_calls
    counter.remove()

    bad_exact = [i for i in range(args.n) if batched.exact[i] != single_exact[i]]
    bad_first = [i for i in range(args.n) if batched.first_token[i] != single_first[i]]
    if bad_exact or bad_first:
        print(f"MISMATCH: exact differs at {bad_exact[:20]}, first token differs at {bad_first[:20]}")
    assert not bad_exact, f"{len(bad_exact)} of {args.n} questions differ in exact match"
    assert not bad_first, f"{len(bad_first)} of {args.n} questions differ in first-token accuracy"

    em, ft = sum(single_exact) / args.n, sum(single_first) / args.n
    print(f"identical per-question results: yes ({args.n} questions; em={em:.3f}, first_token={ft:.3f})")
    differ = sum(u != s for u, s in zip(usual_exact, single_exact))  # padding may round a near-tie another way
    print(f"batched generate agrees with per-question generate on {args.n - differ} of {args.n} questions")
    sb, sq, su = t1 - t0, t2 - t1, t3 - t2
    print(f"{'method':<26}{'seconds':>10}{'questions/s':>14}{'forward calls':>15}")
    print(f"{'batched greedy_exact_match':<26}{sb:>10.3f}{args.n / sb:>14,.1f}{batched_calls:>15,}")
    print(f"{'per-question generate':<26}{sq:>10.3f}{args.n / sq:>14,.1f}{single_calls:>15,}")
    print(f"{'batched generate':<26}{su:>10.3f}{args.n / su:>14,.1f}{usual_calls:>15,}")
    ratio = sq / sb
    # a random model decides almost every row at its first token, where the batched check stops early: the goal is
    # judged on a trained checkpoint only
    verdict = ("met" if ratio >= GOAL else "NOT met") if args.model is not None else "judged with --model only"
    print(f"ratio batched/per-question = {ratio:.1f}  (goal >= {GOAL:.0f}: {verdict}); "
          f"ratio batched/batched generate = {su / sb:.1f}")


if __name__ == "__main__":
    main()
