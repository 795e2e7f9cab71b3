"""In-context-learning tasks: string -> string pairs, deterministic splits, k-shot prompts.

The format follows Todd et al.'s function-vector code (papers.md §1): a task is a JSON array of
``{"input", "output"}`` objects, split 70/21/9 into train/test/valid; demonstrations come from
train and queries from valid (or any split the caller names). Prompts are data (``ICLPrompt``);
turning them into text and token ids is ``forgetlab.fv.prompts``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Pair = tuple[str, str]
SPLIT_FRACTIONS = {"train": 0.70, "test": 0.21, "valid": 0.09}


@dataclass(frozen=True)
class ICLTask:
    name: str
    pairs: tuple[Pair, ...]
    instruction: str = ""  # one sentence saying what the task is (zero-shot-with-instruction prompts)

    @classmethod
    def from_pairs(cls, name: str, pairs: Iterable[Pair | dict], instruction: str = "") -> "ICLTask":
        """From ``(input, output)`` tuples or ``{"input", "output"}`` dicts (the JSON format)."""
        out = []
        for i, item in enumerate(pairs):
            if isinstance(item, dict):
                if not isinstance(item.get("input"), str) or not isinstance(item.get("output"), str):
                    raise ValueError(f"task {name!r}: item {i} needs string fields 'input' and 'output', got {item!r}")
                item = (item["input"], item["output"])
            if len(item) != 2 or not all(isinstance(s, str) for s in item):
                raise ValueError(f"task {name!r}: item {i} must be an (input, output) pair of strings, got {item!r}")
            out.append((item[0], item[1]))
        if not out:
            raise ValueError(f"task {name!r} has no examples")
        return cls(name, tuple(out), instruction)

    def splits(self, seed: int = 0) -> "TaskSplits":
        """70/21/9 train/test/valid, the same for a given seed on every machine."""
        order = np.random.default_rng(seed).permutation(len(self.pairs))
        n_train = int(round(SPLIT_FRACTIONS["train"] * len(order)))
        n_test = int(round(SPLIT_FRACTIONS["test"] * len(order)))
        pick = lambda idx: tuple(self.pairs[i] for i in idx)  # noqa: E731
        return TaskSplits(train=pick(order[:n_train]), test=pick(order[n_train:n_train + n_test]),
                          valid=pick(order[n_train + n_test:]))


@dataclass(frozen=True)
class TaskSplits:
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    valid: tuple[Pair, ...]

    def split(self, name: str) -> tuple[Pair, ...]:
        if name not in SPLIT_FRACTIONS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLIT_FRACTIONS)}")
        return getattr(self, name)


def load_task(path: str | Path, name: str | None = None) -> ICLTask:
    """Read a JSON array of ``{"input", "output"}`` objects; the task name defaults to the file stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist; pass a JSON array of {{\"input\", \"output\"}} objects")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"task file {path} is not valid JSON ({err}); it must be an array of {{\"input\", \"output\"}} objects") from None
    if not isinstance(data, list):
        raise ValueError(f"task file {path} holds a {type(data).__name__}, not an array of {{\"input\", \"output\"}} objects")
    return ICLTask.from_pairs(name or path.stem, data)


@dataclass(frozen=True)
class ICLPrompt:
    """k demonstrations and one query, optionally after an instruction sentence."""

    demos: tuple[Pair, ...]
    query: str
    answer: str
    instruction: str = ""

    def shuffled(self, rng: np.random.Generator) -> "ICLPrompt":
        """The counterfactual: demonstration labels permuted, query and answer unchanged.

        A permutation that leaves the labels as they were (the identity, half of all draws with two shots, or one
        that only swaps equal labels) is drawn again, so the prompt differs from its original whenever its labels
        are not all the same; at least half of all draws differ, so this ends quickly.
        """
        labels = [y for _, y in self.demos]
        shuffled, movable = labels, len(set(labels)) > 1
        while movable and shuffled == labels:
            shuffled = [labels[j] for j in rng.permutation(len(labels))]
        return ICLPrompt(tuple((x, y) for (x, _), y in zip(self.demos, shuffled)), self.query, self.answer,
                         self.instruction)

    def zero_shot(self) -> "ICLPrompt":
        """The bare query: no demonstrations, no instruction."""
        return ICLPrompt((), self.query, self.answer)

    def with_instruction(self, instruction: str) -> "ICLPrompt":
        return ICLPrompt(self.demos, self.query, self.answer, instruction)


def sample_prompts(splits: TaskSplits, n: int, shots: int = 10, seed: int = 0, query_split: str = "valid",
                   demo_split: str = "train", task_name: str = "task") -> list[ICLPrompt]:
    """``n`` prompts: queries cycle through a shuffled ``query_split``; demos are drawn without replacement, never one
    with the query's input (a task file may repeat a pair, or an input with another answer, across its splits)."""
    queries, demos = splits.split(query_split), splits.split(demo_split)
    if not queries:
        raise ValueError(f"task {task_name!r} has no {query_split} examples to query; it needs more examples")
    usable = len(demos) - (1 if demo_split == query_split else 0)
    if usable < shots:
        raise ValueError(f"task {task_name!r} has {len(demos)} {demo_split} examples, fewer than the {shots} shots asked"
                         f"{' besides the query' if demo_split == query_split else ''}; use --shots {max(0, usable)} or a "
                         "bigger task")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(queries))
    prompts = []
    for i in range(n):
        q = queries[order[i % len(order)]]
        pool = [d for d in demos if d[0] != q[0]]
        if len(pool) < shots:
            raise ValueError(f"task {task_name!r}: its query {q[0]!r} leaves {len(pool)} {demo_split} examples with "
                             f"another input, fewer than the {shots} shots asked; remove repeated inputs or lower --shots")
        chosen = rng.choice(len(pool), size=shots, replace=False) if shots else []
        prompts.append(ICLPrompt(tuple(pool[j] for j in chosen), q[0], q[1]))
    return prompts


def counterfactuals(prompts: Sequence[ICLPrompt], seed: int = 0) -> list[ICLPrompt]:
    rng = np.random.default_rng(seed + 7919)
    return [p.shuffled(rng) for p in prompts]


@dataclass(frozen=True)
class PromptFormat:
    """``BOS + Σ "Q: x\\nA: y\\n\\n" + "Q: x_q\\nA:"``; the answer follows ``answer_sep`` (a space)."""

    input_prefix: str = field(default="Q: ", metadata={"help": "text before each input"})
    output_prefix: str = field(default="\nA:", metadata={"help": "text between input and output"})
    answer_sep: str = field(default=" ", metadata={"help": "text between output prefix and the output"})
    example_sep: str = field(default="\n\n", metadata={"help": "text after each demonstration"})
    instruction_sep: str = field(default="\n", metadata={"help": "text after an instruction sentence"})
    bos: bool = field(default=True, metadata={"help": "start with the tokenizer's BOS token"})

    def text(self, prompt: ICLPrompt) -> str:
        head = f"{prompt.instruction}{self.instruction_sep}" if prompt.instruction else ""
        demos = "".join(f"{self.input_prefix}{x}{self.output_prefix}{self.answer_sep}{y}{self.example_sep}"
                        for x, y in prompt.demos)
        return f"{head}{demos}{self.input_prefix}{prompt.query}{self.output_prefix}"
