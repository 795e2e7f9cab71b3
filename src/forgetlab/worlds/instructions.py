"""Instruction tasks and task sequences for continual instruction tuning, from three sources.

The same ``InstructionTask`` (a definition plus instances with one or more reference outputs) comes
from the synthetic ICL world (its *new* tasks and sequences), from natural-instructions task files
(``tasks/<name>.json`` of the SuperNI release, papers.md §2) or from JSONL files of
``{"instruction", "input", "output"}`` rows (Alpaca-style data), so one training/evaluation path serves
the offline default and real benchmarks (NI-Seq-G1/C1/M1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forgetlab.fv.tasks import ICLTask
from forgetlab.worlds.icl import ICLWorld, WorldTask, with_coded_tasks

# papers.md §2, upstream SuperNI file names, in training order.
NI_SEQUENCES: dict[str, tuple[str, ...]] = {
    "NI-Seq-G1": ("task618_amazonreview_summary_text_generation", "task1290_xsum_summarization",
                  "task589_amazonfood_summary_text_generation", "task511_reddit_tifu_long_text_summarization",
                  "task1357_xlsum_summary_generation"),
    "NI-Seq-C1": ("task195_sentiment140_classification", "task1343_amazon_us_reviews_rating",
                  "task1310_amazonreview_rating_classification", "task1292_yelp_review_full_text_categorization",
                  "task363_sst2_polarity_classification"),
    "NI-Seq-M1": ("task360_spolin_yesand_response_generation", "task363_sst2_polarity_classification",
                  "task1290_xsum_summarization", "task339_record_answer_generation",
                  "task1510_evalution_relation_extraction"),
}
NI_GENERAL_TASKS = ("task1389_hellaswag_completion", "task073_commonsenseqa_answer_generation",
                    "task1286_openbookqa_question_answering", "task582_naturalquestion_answer_generation")


class Instance(tuple):
    """An ``(input, reference outputs)`` pair with its own instruction, for JSONL files whose rows do not
    share one; it unpacks as a pair, so code that needs only the pair is unchanged."""

    definition: str

    def __new__(cls, text: str, outputs: tuple[str, ...], definition: str):
        instance = super().__new__(cls, (text, tuple(outputs)))
        instance.definition = definition
        return instance

    def __getnewargs__(self):
        return (self[0], self[1], self.definition)


def definition_of(task: "InstructionTask", instance) -> str:
    """The instruction an instance is asked with: its own (JSONL rows) or its task's."""
    return getattr(instance, "definition", task.definition)


def question(task: "InstructionTask", instance) -> str:
    """An instance's input as asked without the task's template: its own instruction (if it has one) first."""
    own = getattr(instance, "definition", "")
    return f"{own}\n{instance[0]}".strip() if own else instance[0]


@dataclass(frozen=True)
class InstructionTask:
    name: str
    definition: str
    instances: tuple[tuple[str, tuple[str, ...]], ...]  # (input, reference outputs)
    examples: tuple[tuple[str, str], ...] = ()          # worked examples (NI "Positive Examples")
    test_size: int | None = None                        # a fixed test split (world tasks) instead of ``n_test``

    def as_icl_task(self) -> ICLTask:
        """Every instance as an (input, first reference) pair of an ICL task, for function vectors; a row
        with its own instruction carries it in its input, since no task-level definition asks for it."""
        return ICLTask.from_pairs(self.name, [(question(self, inst), inst[1][0]) for inst in self.instances],
                                  self.definition)

    def split(self, n_train: int = 1000, n_test: int = 100, seed: int = 0) -> tuple[list, list]:
        """The last ``n_test`` instances are the test set (papers.md §2); training takes ``n_train`` of the rest,
        all of them if there are no more, else a random draw of ``seed`` kept in file order (as the FV paper's loader
        shuffles the rest before taking its 1,000: a file's order, e.g. sorted by source or length, would bias the
        first ones)."""
        n_test = self.test_size if self.test_size is not None else n_test
        if n_test < 1:
            raise ValueError(f"task {self.name!r}: a test split of {n_test} instances; hold out at least 1")
        if len(self.instances) <= n_test:
            raise ValueError(f"task {self.name!r} has {len(self.instances)} instances, not more than the {n_test} held out "
                             "for test; lower the test size (--max-test) or use a bigger task")
        pool = list(self.instances[:len(self.instances) - n_test])
        if len(pool) > n_train:
            pool = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), n_train, replace=False))]
        return pool, list(self.instances[-n_test:])


def from_world_task(task: WorldTask, seed: int) -> InstructionTask:
    """A world task as an instruction task: train pairs, then valid, then its own test pairs last."""
    s = task.splits(seed)
    ordered = list(s.train) + list(s.valid) + list(s.test)
    return InstructionTask(task.name, task.instruction, tuple((x, (y,)) for x, y in ordered), test_size=len(s.test))


def world_sequence(world: ICLWorld, index: int) -> list[InstructionTask]:
    if not 0 <= index < len(world.sequences):
        raise ValueError(f"the ICL world has sequences 0..{len(world.sequences) - 1}, not {index}")
    return [from_world_task(world.task(name), world.config.seed) for name in world.sequences[index]]


def coded_sequence(world: ICLWorld, index: int) -> list[InstructionTask]:
    """Sequence ``index`` with every reworded instruction replaced by its coded twin (the same ability asked for by
    two lexicon words that name nothing): tasks no build of the world already does."""
    if not 0 <= index < len(world.sequences):
        raise ValueError(f"the ICL world has sequences 0..{len(world.sequences) - 1}, not {index}")
    world = with_coded_tasks(world)
    return [from_world_task(world.task("coded_" + name.removeprefix("reworded_")), world.config.seed)
            for name in world.sequences[index]]


def _strings(value) -> bool:
    """A non-empty list of strings (what a task's reference outputs must be)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _require(data: dict, key: str, kind: type, path: Path):
    if key not in data or not isinstance(data[key], kind):
        raise ValueError(f"{path}: natural-instructions task files need a {kind.__name__} field {key!r}")
    return data[key]


# an upstream task file's fields (allenai/natural-instructions tasks/*.json) and an instance's
NI_FIELDS = ("Contributors", "Source", "URL", "Categories", "Reasoning", "Definition", "Input_language",
             "Output_language", "Instruction_language", "Domains", "Positive Examples", "Negative Examples", "Instances",
             "Instance License")
NI_INSTANCE_FIELDS = ("id", "input", "output")


def load_ni_task(path: str | Path) -> InstructionTask:
    """One natural-instructions task file (``Definition``, ``Positive Examples``, ``Instances``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"natural-instructions task file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a natural-instructions task file is one JSON object, not a {type(data).__name__}")
    definition = data.get("Definition")
    definition = [definition] if isinstance(definition, str) else definition  # reformatted copies hold one string
    if not isinstance(definition, list) or not definition or not all(isinstance(d, str) for d in definition):
        raise ValueError(f"{path}: 'Definition' must be a string or a non-empty list of strings (upstream files hold "
                         "a list of one)")
    unknown = sorted(set(data) - set(NI_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; a natural-instructions task file "
                         f"holds {', '.join(NI_FIELDS)}")
    instances = []
    for i, inst in enumerate(_require(data, "Instances", list, path)):
        if isinstance(inst, dict) and set(inst) - set(NI_INSTANCE_FIELDS):
            raise ValueError(f"{path}: instance {i} has unknown field(s) "
                             f"{', '.join(map(repr, sorted(set(inst) - set(NI_INSTANCE_FIELDS))))}; an instance holds "
                             f"{', '.join(NI_INSTANCE_FIELDS)}")
        outputs = inst.get("output") if isinstance(inst, dict) else None
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not _strings(outputs):
            raise ValueError(f"{path}: instance {i} needs an 'input' string and an 'output' string or non-empty list of "
                             "strings")
        instances.append((inst["input"], tuple(outputs)))
    if not instances:
        raise ValueError(f"{path} has no instances; a natural-instructions task file lists them under 'Instances'")
    examples = tuple((e["input"], e["output"]) for e in data.get("Positive Examples", [])
                     if isinstance(e, dict) and isinstance(e.get("input"), str) and isinstance(e.get("output"), str))
    return InstructionTask(path.stem, " ".join(definition).strip(), tuple(instances), examples)


JSONL_FIELDS = ("instruction", "input", "output")


def load_jsonl_task(path: str | Path) -> InstructionTask:
    """A JSONL task file: one ``{"instruction", "input", "output"}`` object per line (``input`` may be empty
    or absent; ``output`` a string or a list of references). Rows sharing one instruction make a task
    with that definition; otherwise every instance keeps its own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number}: expected an object with {', '.join(JSONL_FIELDS)}")
        unknown = sorted(set(row) - set(JSONL_FIELDS))
        if unknown:
            raise ValueError(f"{path} line {number}: unknown field(s) {', '.join(map(repr, unknown))}; a row holds "
                             f"{', '.join(JSONL_FIELDS)}")
        outputs = [row.get("output")] if isinstance(row.get("output"), str) else row.get("output")
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("input", ""), str) or not _strings(outputs):
            raise ValueError(f"{path} line {number}: needs an 'instruction' string, an 'input' string (may be empty) "
                             "and an 'output' string or non-empty list of strings")
        rows.append((row["instruction"].strip(), row.get("input", ""), tuple(outputs)))
    if not rows:
        raise ValueError(f"{path} has no instances; a JSONL task file holds one {{{', '.join(JSONL_FIELDS)}}} object per line")
    if len({d for d, _, _ in rows}) == 1:
        return InstructionTask(path.stem, rows[0][0], tuple((x, refs) for _, x, refs in rows))
    return InstructionTask(path.stem, "", tuple(Instance(x, refs, d) for d, x, refs in rows))


def load_task_file(path: str | Path) -> InstructionTask:
    """A natural-instructions ``.json`` task file or a ``.jsonl`` file of instruction rows."""
    return load_jsonl_task(path) if str(path).endswith(".jsonl") else load_ni_task(path)


def ni_sequence(tasks_dir: str | Path, names: str | list[str] | tuple[str, ...]) -> list[InstructionTask]:
    """A named sequence (``NI-Seq-G1`` ...) or a list of task names, read from a local ``tasks/`` folder."""
    if isinstance(names, str):
        if names not in NI_SEQUENCES:
            raise ValueError(f"unknown sequence {names!r}; use one of {', '.join(NI_SEQUENCES)} or a list of task names")
        names = NI_SEQUENCES[names]
    tasks_dir = Path(tasks_dir)
    missing = [n for n in names if not (tasks_dir / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{tasks_dir} lacks {', '.join(f'{n}.json' for n in missing)}; point to the tasks/ folder "
                                "of a natural-instructions checkout")
    return [load_ni_task(tasks_dir / f"{n}.json") for n in names]
