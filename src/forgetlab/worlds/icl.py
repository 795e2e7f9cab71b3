"""A procedural world of in-context-learning tasks over a made-up lexicon, deterministic from a seed.

Function vectors exist only in a model that does in-context learning, and no pretrained LLM can be
downloaded here, so forgetlab grows one: this module writes the tasks, ``experiments/icl_world.py``
pretrains a small model on them. Every word is one token of a word-level tokenizer, so a task's
answer is decided by its first token.

Families, in the spirit of Todd et al.'s tasks:

- **lexical** ``translate_<colour>``: the lexicon onto a "language" of its own words ("English ->
  French"-like: shared inputs, own outputs) and ``partner_<colour>``: a random derangement of the
  lexicon onto itself ("antonym"-like: inputs and outputs shared with other tasks);
- **lookup** ``<kind>_of``: lexicon -> one of a few class words of that kind ("country -> continent");
  ``entity_<n>``: an own set of entity words -> classes (inputs that no other task shares);
- **string** ``capitalize``, ``reverse``, ``first_letter``, ``last_letter`` of a word and
  ``next_letter``, ``prev_letter``, ``upper_letter`` of a letter;
- **list** ``pick_first|middle|last``, ``pick_alpha_first`` of three words (first letters distinct,
  so the answer follows from facts the model knows), ``count_words`` of a list;
- **arithmetic** ``add_<k>`` and ``sub_<k>`` modulo ``modulus``.

Most inputs are shared by several tasks (a bare ``Q: x / A:`` is ambiguous, which leaves room for a
function vector to add the task); ``entity_*`` tasks own their inputs, so both kinds can be reported.
A 10-shot prompt names its task through its outputs when they are the task's own (translations,
lookups, capitalisation) and only through the input-output relation otherwise (``partner_*``,
``pick_*``, arithmetic), the harder case for a small model.
**General** tasks are what pretraining teaches. **New** tasks are never seen in pretraining and are
reserved for continual fine-tuning: reworded instructions for known abilities ("Give the word in gold ."
for ``translate_gold``: learnable from their training pairs, so the sequences are made of them), coded
instructions for the same abilities (``coded_translate_gold``: "Give the <word> <word> ." with two lexicon
words that name nothing, so that no build already does them, which a build may for a rewording), and
harder ones — other offsets (``add_5``), compositions of general tasks (``first_letter_of_partner_red``)
and new list rules — that the small models do not learn to generalise.
Facts about atomic tokens (lexical, lookup, string, arithmetic modulo m) are all shown in
pretraining, as any corpus shows a language model its facts, and evaluation uses unseen prompts;
list tasks are rules over combinatorially many inputs and keep their test pairs out of pretraining.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from forgetlab.fv.tasks import ICLTask, TaskSplits
from forgetlab.worlds.names import make_word_pool

FAMILIES = ("lexical", "lookup", "string", "list", "arithmetic")
RULE_FAMILIES = ("list",)
COLOURS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "brown", "white", "black", "amber", "ivory")
KINDS = ("tribe", "planet", "season", "metal", "guild", "river", "clan", "star")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")


@dataclass(frozen=True)
class ICLWorldConfig:
    """Sizes of the task world (defaults: about 50 tasks, a vocabulary of about 700 words)."""

    seed: int = field(default=0, metadata={"help": "the world is a pure function of the config"})
    n_words: int = field(default=80, metadata={"help": "lexicon size: inputs shared by lexical/lookup/string tasks"})
    n_translate_tasks: int = field(default=6, metadata={"help": "general lexicon -> own-language bijections"})
    n_partner_tasks: int = field(default=2, metadata={"help": "general derangements of the lexicon onto itself"})
    n_kind_tasks: int = field(default=6, metadata={"help": "general lookups lexicon -> classes"})
    n_classes: int = field(default=6, metadata={"help": "class words per lookup task"})
    n_entity_tasks: int = field(default=4, metadata={"help": "lookups whose inputs no other task shares"})
    n_entities: int = field(default=30, metadata={"help": "inputs per entity task"})
    modulus: int = field(default=20, metadata={"help": "arithmetic on 0..modulus-1 (at most 20, as number words)"})
    n_list_pairs: int = field(default=300, metadata={"help": "pairs per list task"})
    max_count: int = field(default=6, metadata={"help": "count_words lists hold 1..max_count words"})
    n_sequences: int = field(default=3, metadata={"help": "task sequences of new tasks for continual tuning"})
    sequence_length: int = field(default=5, metadata={"help": "tasks per sequence"})

    def validate(self) -> None:
        for name in ("n_words", "n_classes", "n_entities", "modulus", "n_list_pairs", "max_count", "sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"icl world: {name}={getattr(self, name)} must be positive")
        if self.n_words < 20:
            raise ValueError(f"icl world: n_words={self.n_words} is too small for 10-shot prompts; use at least 20")
        if not 2 <= self.modulus <= len(NUMBER_WORDS):
            raise ValueError(f"icl world: modulus={self.modulus} must be in 2..{len(NUMBER_WORDS)}")
        if not 2 <= self.n_partner_tasks or self.n_partner_tasks + self.n_translate_tasks > len(COLOURS):
            raise ValueError(f"icl world: n_partner_tasks must be at least 2 (new tasks compose them) and "
                             f"n_partner_tasks + n_translate_tasks at most {len(COLOURS)}")
        if not 2 <= self.n_kind_tasks <= len(KINDS):
            raise ValueError(f"icl world: n_kind_tasks must be in 2..{len(KINDS)}")
        if self.max_count >= self.modulus:
            raise ValueError(f"icl world: max_count={self.max_count} must be below modulus={self.modulus}")


@dataclass(frozen=True)
class WorldTask:
    """A task with its family, role (general | new) and whether its inputs are shared with other tasks."""

    name: str
    family: str
    role: str
    instruction: str
    pairs: tuple[tuple[str, str], ...]
    shared_inputs: bool = True

    def as_icl_task(self) -> ICLTask:
        return ICLTask(self.name, self.pairs, self.instruction)

    def splits(self, seed: int) -> TaskSplits:
        return self.as_icl_task().splits(seed)

    def pretraining_pairs(self, seed: int) -> tuple[tuple[str, str], ...]:
        """Facts are all shown; rule tasks show their train split only."""
        return self.splits(seed).train if self.family in RULE_FAMILIES else self.pairs


@dataclass
class ICLWorld:
    config: ICLWorldConfig
    tasks: list[WorldTask]
    sequences: list[list[str]]

    def task(self, name: str) -> WorldTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"the ICL world has no task {name!r}")

    def role(self, role: str) -> list[WorldTask]:
        return [t for t in self.tasks if t.role == role]

    def words(self) -> list[str]:
        """Every word of every pair and instruction (the tokenizer's vocabulary)."""
        out: set[str] = set()
        for t in self.tasks:
            out.update(t.instruction.replace(".", " .").split())
            for x, y in t.pairs:
                out.update(x.split())
                out.update(y.split())
        return sorted(out)

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "sequences": self.sequences,
                "tasks": [{"name": t.name, "family": t.family, "role": t.role, "instruction": t.instruction,
                           "shared_inputs": t.shared_inputs, "pairs": [list(p) for p in t.pairs],
                           "splits": {k: [list(p) for p in v] for k, v in asdict(t.splits(self.config.seed)).items()}}
                          for t in self.tasks]}

    @classmethod
    def from_json(cls, data: dict) -> "ICLWorld":
        tasks = [WorldTask(t["name"], t["family"], t["role"], t["instruction"], tuple(tuple(p) for p in t["pairs"]),
                           t["shared_inputs"]) for t in data["tasks"]]
        return cls(ICLWorldConfig(**data["config"]), tasks, [list(s) for s in data["sequences"]])

    def write(self, path: str | Path) -> None:
        from forgetlab.utils.io import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> "ICLWorld":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; build the world with `forgetlab icl-world build`")
        return cls.from_json(json.loads(path.read_text()))


def _lexicon(n: int, seed: int, exclude: set[str]) -> list[str]:
    """Lower-case pseudo-words whose reversals are new words too (``reverse`` needs distinct outputs)."""
    out: list[str] = []
    taken = set(exclude)
    pool = make_word_pool(6 * n + 50, seed, 2, 2)
    for word in (w.lower() for w in pool):
        rev = word[::-1]
        if word in taken or rev in taken or rev == word or len(word) < 3:
            continue
        out.append(word)
        taken.update({word, rev, word.capitalize(), rev.capitalize()})
        if len(out) == n:
            return out
    raise ValueError(f"icl world: could not draw {n} lexicon words; lower n_words")


def _derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _distinct_lists(rng: np.random.Generator, words: list[str], n: int, length,
                    distinct_initials: bool = False) -> list[list[str]]:
    """``n`` different lists of distinct words (a task maps each input to one output)."""
    seen: set[tuple[str, ...]] = set()
    out: list[list[str]] = []
    for _ in range(50 * n):
        item = tuple(words[i] for i in rng.choice(len(words), size=length(), replace=False))
        if distinct_initials and len({w[0] for w in item}) < len(item):
            continue
        if item not in seen:
            seen.add(item)
            out.append(list(item))
            if len(out) == n:
                break
    return out


def reworded_sources(tasks: list[WorldTask]) -> list[WorldTask]:
    """The general tasks that reworded (and coded) instructions ask for, in world order."""
    names = {t.name.removeprefix("reworded_") for t in tasks if t.name.startswith("reworded_")}
    return [t for t in tasks if t.name in names]


def generate_icl_world(config: ICLWorldConfig = ICLWorldConfig()) -> ICLWorld:
    config.validate()
    rng = np.random.default_rng(config.seed)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    reserved = set(letters) | {c.upper() for c in letters} | set(NUMBER_WORDS) | set(COLOURS) | set(KINDS)
    words = _lexicon(config.n_words, config.seed, reserved)
    n_classes_total = config.n_classes * (len(KINDS) + config.n_entity_tasks)
    reversals = {x[::-1] for x in words}
    extra = [w.lower() for w in make_word_pool(n_classes_total + config.n_entity_tasks * config.n_entities
                                                + config.n_translate_tasks * config.n_words + len(words),
                                                config.seed + 1, 2, 3, exclude=reserved | set(words))]
    extra = [w for w in extra if w not in reversals]
    class_words = [w.capitalize() for w in extra[:n_classes_total]]
    entity_words = extra[n_classes_total:n_classes_total + config.n_entity_tasks * config.n_entities]
    foreign = extra[n_classes_total + len(entity_words):]
    if len(foreign) < config.n_translate_tasks * len(words):
        raise ValueError(f"icl world: could not draw {config.n_translate_tasks * len(words)} distinct translation words; "
                         "lower n_translate_tasks or n_words")
    numbers = list(NUMBER_WORDS[:config.modulus])
    tasks: list[WorldTask] = []

    def add(name, family, role, instruction, pairs, shared=True):
        tasks.append(WorldTask(name, family, role, instruction, tuple(pairs), shared))

    # lexical: derangements of the lexicon (composed by new tasks) and translations into own languages
    partners: dict[str, dict[str, str]] = {}
    for colour in COLOURS[:config.n_partner_tasks]:
        perm = _derangement(rng, len(words))
        partners[colour] = {w: words[j] for w, j in zip(words, perm)}
        add(f"partner_{colour}", "lexical", "general", f"Replace the word with its {colour} partner .",
            partners[colour].items())
    translations: dict[str, dict[str, str]] = {}
    for i, colour in enumerate(COLOURS[config.n_partner_tasks:config.n_partner_tasks + config.n_translate_tasks]):
        language = foreign[i * len(words):(i + 1) * len(words)]
        translations[colour] = dict(zip(words, language))
        add(f"translate_{colour}", "lexical", "general", f"Say the word in the {colour} language .",
            translations[colour].items())
    # lookups: lexicon -> classes of a kind; entity sets -> classes
    kind_maps: dict[str, dict[str, str]] = {}
    for i, kind in enumerate(KINDS[:config.n_kind_tasks]):
        classes = class_words[i * config.n_classes:(i + 1) * config.n_classes]
        kind_maps[kind] = {w: classes[rng.integers(len(classes))] for w in words}
        add(f"{kind}_of", "lookup", "general", f"Name the {kind} of the word .", kind_maps[kind].items())
    base = len(KINDS) * config.n_classes
    for e in range(config.n_entity_tasks):
        classes = class_words[base + e * config.n_classes: base + (e + 1) * config.n_classes]
        ents = entity_words[e * config.n_entities:(e + 1) * config.n_entities]
        add(f"entity_{e + 1}", "lookup", "general", f"Name the group of entity set {NUMBER_WORDS[e + 1]} .",
            [(x, classes[rng.integers(len(classes))]) for x in ents], shared=False)
    # string transforms of atomic tokens
    add("capitalize", "string", "general", "Write the word with a capital letter .", [(w, w.capitalize()) for w in words])
    add("reverse", "string", "general", "Write the word backwards .", [(w, w[::-1]) for w in words])
    add("first_letter", "string", "general", "Give the first letter of the word .", [(w, w[0]) for w in words])
    add("last_letter", "string", "general", "Give the last letter of the word .", [(w, w[-1]) for w in words])
    add("next_letter", "string", "general", "Give the letter after this one .",
        [(a, letters[(i + 1) % 26]) for i, a in enumerate(letters)])
    add("prev_letter", "string", "general", "Give the letter before this one .",
        [(a, letters[(i - 1) % 26]) for i, a in enumerate(letters)])
    add("upper_letter", "string", "general", "Write the letter in upper case .", [(a, a.upper()) for a in letters])
    # lists of three words with distinct first letters (``pick_alpha_first`` then follows from first letters)
    lists = _distinct_lists(rng, words, config.n_list_pairs, lambda: 3, distinct_initials=True)
    add("pick_first", "list", "general", "Pick the first word of the list .", [(" ".join(l), l[0]) for l in lists])
    add("pick_middle", "list", "general", "Pick the middle word of the list .", [(" ".join(l), l[1]) for l in lists])
    add("pick_last", "list", "general", "Pick the last word of the list .", [(" ".join(l), l[2]) for l in lists])
    add("pick_alpha_first", "list", "general", "Pick the word of the list that comes first in the alphabet .",
        [(" ".join(l), min(l)) for l in lists])
    counts = _distinct_lists(rng, words, config.n_list_pairs, lambda: int(rng.integers(1, config.max_count + 1)))
    add("count_words", "list", "general", "Count the words of the list .", [(" ".join(c), numbers[len(c)]) for c in counts])
    # arithmetic modulo m: offsets 1..3 up and 1..2 down are general, larger ones new
    m = config.modulus
    for k, role in ((1, "general"), (2, "general"), (3, "general"), (4, "new"), (5, "new"), (6, "new")):
        add(f"add_{k}", "arithmetic", role, f"Add {NUMBER_WORDS[k]} to the number .",
            [(numbers[i], numbers[(i + k) % m]) for i in range(m)])
    for k, role in ((1, "general"), (2, "general"), (3, "new"), (4, "new")):
        add(f"sub_{k}", "arithmetic", role, f"Take {NUMBER_WORDS[k]} from the number .",
            [(numbers[i], numbers[(i - k) % m]) for i in range(m)])

    # new tasks: compositions of general tasks and new list rules, never in pretraining
    first, second = COLOURS[:2]
    for colour in (first, second):
        add(f"first_letter_of_partner_{colour}", "string", "new",
            f"Give the first letter of the {colour} partner of the word .", [(w, p[0]) for w, p in partners[colour].items()])
    for colour, kind in ((first, KINDS[0]), (second, KINDS[1])):
        add(f"{kind}_of_partner_{colour}", "lookup", "new", f"Name the {kind} of the {colour} partner of the word .",
            [(w, kind_maps[kind][p]) for w, p in partners[colour].items()])
    if translations:
        language = next(iter(translations))
        add(f"translate_{language}_of_partner_{first}", "lexical", "new",
            f"Say the {first} partner of the word in the {language} language .",
            [(w, translations[language][p]) for w, p in partners[first].items()])
    add("pick_alpha_last", "list", "new", "Pick the word of the list that comes last in the alphabet .",
        [(" ".join(l), max(l)) for l in lists])
    add("capitalize_first", "list", "new", "Write the first word of the list with a capital letter .",
        [(" ".join(l), l[0].capitalize()) for l in lists])
    # reworded instructions: a known ability asked for in words pretraining never used (the learnable kind of
    # new task, as instruction tuning teaches an LLM to follow new task definitions); only known words, so
    # the vocabulary (and any model built on the world) does not change
    for colour in partners:
        add(f"reworded_partner_{colour}", "lexical", "new", f"Give the {colour} partner of the word .",
            partners[colour].items())
    for colour in translations:
        add(f"reworded_translate_{colour}", "lexical", "new", f"Give the word in {colour} .", translations[colour].items())
    add("reworded_reverse", "string", "new", "Give the word backwards .", [(w, w[::-1]) for w in words])
    # coded instructions: the same abilities asked for by two lexicon words that say nothing about them, so no
    # build can already do them and fine-tuning must teach what the code means (drawn from a generator of their
    # own: the other tasks, the vocabulary and the pretraining corpus stay as they were)
    sources = reworded_sources(tasks)
    codes = np.random.default_rng(config.seed + 2000).choice(len(words), size=(len(sources), 2), replace=False)
    for source, (i, j) in zip(sources, codes):
        add(f"coded_{source.name}", source.family, "new", f"Give the {words[i]} {words[j]} .", source.pairs)

    # sequences: reworded tasks, which the models learn from their training pairs (the compositions and new
    # rules above are not learned at these sizes; name them with ``forgetlab cit run --sequence a,b,c``)
    reworded = [t.name for t in tasks if t.name.startswith("reworded_")]
    if len(reworded) < config.sequence_length:
        raise ValueError(f"icl world: only {len(reworded)} reworded tasks for sequences of {config.sequence_length}; "
                         "raise n_translate_tasks or lower sequence_length")
    order = np.random.default_rng(config.seed + 1000).permutation(len(reworded))  # overlap only when they must
    span = config.sequence_length
    sequences = [[reworded[order[(s * span + i) % len(reworded)]] for i in range(span)] for s in range(config.n_sequences)]
    return ICLWorld(config, tasks, sequences)


def with_coded_tasks(world: ICLWorld) -> ICLWorld:
    """``world`` with its ``coded_*`` tasks; a world.json written before they existed is completed from its config
    (generation is deterministic and they change nothing else), and refused if its config no longer reproduces it."""
    if any(t.name.startswith("coded_") for t in world.tasks):
        return world
    fresh = generate_icl_world(world.config)
    same = {t.name: t for t in fresh.tasks}
    if any(same.get(t.name) != t for t in world.tasks):
        raise ValueError("this world.json was written by another version of the world generator and has no coded tasks; "
                         "rebuild it with `forgetlab icl-world build`")
    return ICLWorld(world.config, world.tasks + [t for t in fresh.tasks if t.name.startswith("coded_")], world.sequences)
