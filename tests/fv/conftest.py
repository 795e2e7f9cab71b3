"""Shared fixtures of the function-vector tests: a small task, a BPE tokenizer, tiny models, a trained model.

pytest runs with ``--import-mode=importlib``, so helpers are handed out as fixtures (callables),
not imported from a helper module.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgetlab.fv.prompts import PromptBatch, batches, encode_prompt
from forgetlab.fv.tasks import ICLTask, PromptFormat, TaskSplits, sample_prompts
from forgetlab.models.adapter import adapt
from forgetlab.models.tokenizers import build_bpe_tokenizer, build_word_tokenizer
from forgetlab.models.zoo import random_model, tiny_config

# Words of different lengths, so BPE prompts differ in length and batches need left padding.
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "car", "road", "hat", "cup",
         "pen", "box", "map", "key", "door", "lamp", "star", "rock", "leaf", "ship", "apple", "banana", "river",
         "mountain", "window", "garden")

ICL_TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "icl_tasks"


@pytest.fixture(scope="session")
def icl_tasks_dir() -> Path:
    if not (ICL_TASKS / "antonym.json").is_file():
        pytest.skip(f"fixture data {ICL_TASKS} is not available")
    return ICL_TASKS


@pytest.fixture(scope="session")
def upper_task() -> ICLTask:
    """word -> WORD, 30 pairs: splits of 21 train / 6 test / 3 valid."""
    return ICLTask.from_pairs("upper", [(w, w.upper()) for w in WORDS])


@pytest.fixture(scope="session")
def bpe_tokenizer(upper_task):
    fmt = PromptFormat()
    texts = [f"{fmt.input_prefix}{x}{fmt.output_prefix}{fmt.answer_sep}{y}{fmt.example_sep}" for x, y in upper_task.pairs]
    return build_bpe_tokenizer(texts * 4, vocab_size=330)


@pytest.fixture(scope="session")
def make_adapter():
    """``make(arch, init_range=None, seed=0, n_layers=3, vocab=330)`` -> adapter of a seeded random tiny model.

    A larger ``init_range`` (0.2-0.3) makes the random model's output distributions peaked enough for
    the CIE to be far from zero (with the default 0.02 every |CIE| is ~1e-4).
    """
    def make(arch: str, init_range: float | None = None, seed: int = 0, n_layers: int = 3, vocab: int = 330,
             n_heads: int = 4, d_model: int = 64):
        config = tiny_config(arch, vocab, n_layers=n_layers, n_heads=n_heads, d_model=d_model)
        if init_range is not None:
            config.initializer_range = init_range
        return adapt(random_model(config, seed=seed))
    return make


@pytest.fixture(scope="session")
def peaked():
    """``peaked(adapter, batch_list)``: the same batches, targets replaced by the model's top token.

    A random model gives the task's real answer token almost no probability, so its CIE is ~0 and
    an engine comparison would pass trivially; its own top token has a probability that heads move.
    """
    @torch.no_grad()
    def retarget(adapter, batch_list):
        out = []
        for b in batch_list:
            top = adapter.model(**b.model_inputs()).logits[:, -1].argmax(-1)
            out.append(PromptBatch(b.input_ids, b.attention_mask, top))
        return out
    return retarget


@pytest.fixture(scope="session")
def spearman():
    def rho(x, y) -> float:
        rx = np.argsort(np.argsort(np.asarray(x, dtype=np.float64).ravel()))
        ry = np.argsort(np.argsort(np.asarray(y, dtype=np.float64).ravel()))
        return float(np.corrcoef(rx, ry)[0, 1])
    return rho


# ---- a tiny Llama trained on 10-shot prompts of one deterministic task ---------------------------

TRAIN_WORDS = tuple(f"w{i}" for i in range(40))
TRAIN_FORMAT = PromptFormat(input_prefix="", output_prefix=" >", example_sep="\n")  # short prompts: fast training


@pytest.fixture(scope="session")
def trained_llama():
    """A 2-layer Llama trained a few seconds on 10-shot prompts of a fixed word -> word permutation.

    Trained with label smoothing, so its answers are confident (p ~ 0.8) but not saturated: at
    p ~ 1 - 1e-3 every gradient of p vanishes and no first-order method (the attribution engine)
    can rank heads, which would make the engine comparison about the model, not the engine.
    Returns adapter, tokenizer, task, prompt format, the loss curve and the 10-shot top-1 accuracy.
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(TRAIN_WORDS))
    task = ICLTask.from_pairs("permute", [(w, TRAIN_WORDS[perm[i]]) for i, w in enumerate(TRAIN_WORDS)])
    tokenizer = build_word_tokenizer([">"] + list(TRAIN_WORDS))
    adapter = adapt(random_model(tiny_config("llama", len(tokenizer), n_layers=2, n_heads=8, d_model=64), seed=0))
    model = adapter.model

    everything = TaskSplits(train=task.pairs, test=(), valid=task.pairs)
    prompts = sample_prompts(everything, 2000, shots=10, seed=1, query_split="valid", demo_split="valid")
    seqs = []
    for p in prompts:
        ids, _, answer = encode_prompt(tokenizer, p, TRAIN_FORMAT)
        seqs.append(ids + answer)
    width = max(map(len, seqs))
    data = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        data[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1

    # One thread: the same trajectory on any core count (reductions split differently across threads drift
    # apart over 300 steps), and no slowdown from oversubscribed cores on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        losses = []
        model.train()
        for _ in range(300):
            idx = torch.randint(0, len(data), (32,), generator=generator)
            x, m = data[idx], mask[idx]
            logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
            labels = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, label_smoothing=0.2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    queries = sample_prompts(task.splits(0), 40, shots=10, seed=0)
    with torch.no_grad():
        hits = [(model(**b.model_inputs()).logits[:, -1].argmax(-1) == b.targets).float()
                for b in batches(tokenizer, queries, TRAIN_FORMAT, 40)]
    return SimpleNamespace(adapter=adapter, tokenizer=tokenizer, task=task, fmt=TRAIN_FORMAT, losses=losses,
                           accuracy=float(torch.cat(hits).mean()), seconds=seconds)
