"""Synthetic biography world (Zheng et al., ICLR 2025, "spurious forgetting").

A population of invented people with six independent attributes. People
0..P-1 appear in pretraining text (several paraphrased entries each); task 0 is
QA about them (a train half to fine-tune, a test half to measure extraction),
and tasks 1..N are QA about fresh people never seen in pretraining, learned
one after another. Everything is derived from ``config.seed`` so a world can be
rebuilt exactly; entries of a person depend only on (seed, person id).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from forgetlab.worlds.biography_templates import (
    ANSWER_CUE,
    MAX_TEMPLATES_PER_ATTRIBUTE,
    QUESTION_TEMPLATES,
    SENTENCE_TEMPLATES,
)
from forgetlab.utils.io import atomic_path
from forgetlab.worlds.names import make_word_pool

ATTRIBUTES: tuple[str, ...] = (
    "birth_date",
    "birth_city",
    "university",
    "major",
    "company",
    "company_city",
)

MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
DAYS_PER_MONTH = 28  # every month uses days 1..28, as in the paper
GENDERS: tuple[str, str] = ("male", "female")
PRONOUNS: dict[str, dict[str, str]] = {
    "male": {"subj": "he", "poss": "his"},
    "female": {"subj": "she", "poss": "her"},
}

WORLD_JSON_FORMAT = "forgetlab.biography_world"
WORLD_JSON_VERSION = 1

# Entry randomness is drawn per fixed-size block of person ids, so a person's
# entries never depend on which other ids are requested. Changing this
# constant changes every generated corpus.
_ENTRY_BLOCK = 1024
_ENTRY_STREAM = 0xB105
_CORPUS_STREAM = 0xC0DE
_POOL_NAMES: tuple[str, ...] = (
    "first_names", "middle_names", "last_names", "birth_cities",
    "universities", "majors", "companies", "company_cities",
)

_WORD_RE = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]")


def split_words(text: str) -> list[str]:
    """Split text into the word/punctuation tokens that ``word_list`` covers.

    Runs of letters/digits are words; every other non-space character is its
    own token (so "Name's" -> "Name", "'", "s" and "1952." -> "1952", ".").
    """
    return _WORD_RE.findall(text)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class BiographyWorldConfig:
    """Everything that determines a biography world; the world is a pure function of it."""

    seed: int = field(default=0, metadata=_help("Master seed; pools, people and entries derive from it."))
    n_pretrain_people: int = field(
        default=800, metadata=_help("People 0..P-1, the only ones that appear in pretraining text.")
    )
    n_new_people_per_task: int = field(
        default=500, metadata=_help("People per new task 1..N; never in pretraining text.")
    )
    n_new_tasks: int = field(default=1, metadata=_help("Number N of new-people QA tasks (0 allowed)."))
    task0_train_fraction: float = field(
        default=0.5,
        metadata=_help(
            "Share of pretraining people (lowest ids) whose QA is task-0 train; the rest is "
            "task-0 test, used to measure knowledge extraction."
        ),
    )
    entries_per_person: int = field(default=5, metadata=_help("Biography entries per pretraining person."))
    shuffle_entries: bool = field(
        default=True,
        metadata=_help(
            "Pretraining corpus in a seeded random entry order. False keeps a person's entries next to "
            "each other, so one packed context holds several and the model learns to copy values from "
            "the previous entry instead of storing them (extraction then fails; ablation)."
        ),
    )
    permute_sentences: bool = field(
        default=True,
        metadata=_help("Shuffle the 6 sentences of each entry; False keeps ATTRIBUTES order (ablation)."),
    )
    templates_per_attribute: int = field(
        default=50,
        metadata=_help(
            "Paraphrases used per attribute (1..50, the first ones of each pool). Templates are drawn "
            "without replacement across a person's entries; if fewer templates than entries, a random "
            "order of all templates is cycled so each is reused as evenly as possible."
        ),
    )
    full_name: bool = field(
        default=True,
        metadata=_help("Full name in every sentence; False uses it only in an entry's first sentence."),
    )
    n_first_names: int = field(default=400, metadata=_help("Size of the first-name pool."))
    n_middle_names: int = field(default=400, metadata=_help("Size of the middle-name pool."))
    n_last_names: int = field(default=1000, metadata=_help("Size of the last-name pool."))
    n_birth_cities: int = field(default=200, metadata=_help("Size of the birth-city pool."))
    n_universities: int = field(default=300, metadata=_help("Size of the university pool."))
    n_majors: int = field(default=100, metadata=_help("Size of the major pool."))
    n_companies: int = field(default=263, metadata=_help("Size of the company pool."))
    n_company_cities: int = field(
        default=100, metadata=_help("Headquarters-city pool, separate from birth cities.")
    )
    year_min: int = field(default=1900, metadata=_help("Earliest birth year (inclusive)."))
    year_max: int = field(default=2099, metadata=_help("Latest birth year (inclusive)."))

    @property
    def n_people(self) -> int:
        """Total people: pretraining people plus all new-task people."""
        return self.n_pretrain_people + self.n_new_tasks * self.n_new_people_per_task

    @property
    def n_task0_train(self) -> int:
        """How many of the pretraining people form the task-0 QA train split."""
        return int(self.n_pretrain_people * self.task0_train_fraction)

    def validate(self) -> "BiographyWorldConfig":
        """Raise ValueError (one line: field, bad value, fix) if the config cannot build a world."""

        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"BiographyWorldConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise bad(f.name, "use True or False.")
            elif f.type in ("int", int):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise bad(f.name, "use an integer.")
            elif f.type in ("float", float):
                if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                    raise bad(f.name, "use a number.")
        if self.seed < 0:
            raise bad("seed", "use a non-negative integer.")
        positive = (
            "n_new_people_per_task", "entries_per_person", "n_first_names", "n_middle_names",
            "n_last_names", "n_birth_cities", "n_universities", "n_majors", "n_companies",
            "n_company_cities",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, "use a positive integer (>= 1).")
        if self.n_pretrain_people < 2:
            raise bad("n_pretrain_people", "use at least 2 so task-0 train and test are both non-empty.")
        if self.n_new_tasks < 0:
            raise bad("n_new_tasks", "use 0 or more.")
        if not 0.0 < self.task0_train_fraction < 1.0:
            raise bad("task0_train_fraction", "use a fraction strictly between 0 and 1, e.g. 0.5.")
        if not 1 <= self.n_task0_train <= self.n_pretrain_people - 1:
            raise bad(
                "task0_train_fraction",
                f"it leaves an empty task-0 split for n_pretrain_people={self.n_pretrain_people}; "
                "move it towards 0.5 or add people.",
            )
        if not 1 <= self.templates_per_attribute <= MAX_TEMPLATES_PER_ATTRIBUTE:
            raise bad("templates_per_attribute", f"use 1..{MAX_TEMPLATES_PER_ATTRIBUTE}.")
        if self.year_min < 1:
            raise bad("year_min", "use a year >= 1.")
        if self.year_max > 9999:
            raise bad("year_max", "use a year <= 9999.")
        if self.year_min > self.year_max:
            raise bad("year_min", f"it exceeds year_max={self.year_max}; make year_min <= year_max.")
        combos = self.n_first_names * self.n_middle_names * self.n_last_names
        if combos < self.n_people:
            raise bad(
                "n_last_names",
                f"first*middle*last = {combos} name combinations < {self.n_people} people; "
                "enlarge the name pools so every person gets a unique name.",
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for world.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BiographyWorldConfig":
        """Inverse of ``to_json``; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BiographyWorldConfig: unknown keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Person:
    """One invented person; attribute fields are the exact strings used in text."""

    id: int
    first: str
    middle: str
    last: str
    gender: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    company: str
    company_city: str

    @property
    def full_name(self) -> str:
        return f"{self.first} {self.middle} {self.last}"

    def value(self, attribute: str) -> str:
        """The value string of one of ATTRIBUTES."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; use one of {ATTRIBUTES}.")
        return getattr(self, attribute)


@dataclass(frozen=True, slots=True)
class QAExample:
    """One QA pair; prompt ends with "\\nAnswer:" and answer starts with a space."""

    person_id: int
    attribute: str
    prompt: str
    answer: str


def _percent_escape(text: str) -> str:
    return text.replace("%", "%%")


class _CompiledTemplate:
    """A template pre-split for fast %-formatting and pronoun variants.

    Pronoun variants are made by substituting the placeholder itself, never by
    replacing substrings in generated text.
    """

    __slots__ = ("named", "value_first", "uses_poss", "pronoun")

    def __init__(self, template: str) -> None:
        i_val = template.index("{value}")
        uses_poss = "{poss}" in template
        slot = "{poss}" if uses_poss else "{subj}"
        i_name = template.index(slot)
        self.uses_poss = uses_poss
        self.value_first = i_val < i_name
        self.named = _percent_escape(template).replace("{value}", "%s").replace(slot, "%s")
        initial = i_name == 0
        self.pronoun: dict[str, str] = {}
        for gender in GENDERS:
            word = PRONOUNS[gender]["poss" if uses_poss else "subj"]
            if initial:
                word = word.capitalize()
            self.pronoun[gender] = _percent_escape(template).replace(slot, word).replace("{value}", "%s")


class BiographyWorld:
    """People, splits and the text generators for one configured world."""

    def __init__(
        self,
        config: BiographyWorldConfig,
        people: list[Person],
        splits: dict[str, list[int]],
    ) -> None:
        config.validate()
        if len(people) != config.n_people:
            raise ValueError(f"BiographyWorld: got {len(people)} people, config needs {config.n_people}.")
        for i, p in enumerate(people):
            if p.id != i:
                raise ValueError(f"BiographyWorld: people[{i}].id={p.id}; ids must be 0..n-1 in order.")
        self.config = config
        self.people = people
        self.splits = splits
        self._values: list[tuple[str, ...]] = [
            tuple(getattr(p, a) for a in ATTRIBUTES) for p in people
        ]
        t = config.templates_per_attribute
        self._templates: list[list[_CompiledTemplate]] = [
            [_CompiledTemplate(s) for s in SENTENCE_TEMPLATES[a][:t]] for a in ATTRIBUTES
        ]

    # ------------------------------------------------------------------ text
    def _check_ids(self, person_ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in person_ids]
        n = len(self.people)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"person id {i} out of range 0..{n - 1}.")
        return ids

    def _block_draws(self, block: int) -> tuple[list, list]:
        """Template choices [person][attr][entry] and sentence orders [person][entry][pos] for a block."""
        cfg = self.config
        k, t, n_attr = cfg.entries_per_person, cfg.templates_per_attribute, len(ATTRIBUTES)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _ENTRY_STREAM, block]))
        b = _ENTRY_BLOCK
        perms = rng.permuted(np.broadcast_to(np.arange(t), (b * n_attr, t)), axis=-1)
        cols = np.arange(k) % t  # cycles only when t < k
        choice = perms[:, cols].reshape(b, n_attr, k)
        if cfg.permute_sentences:
            order = rng.permuted(np.broadcast_to(np.arange(n_attr), (b * k, n_attr)), axis=-1)
            order = order.reshape(b, k, n_attr)
        else:
            order = np.broadcast_to(np.arange(n_attr), (b, k, n_attr))
        return choice.tolist(), order.tolist()

    def pretraining_corpus(self) -> list[str]:
        """Every pretraining entry, in the order a model reads them (see ``shuffle_entries``)."""
        entries = self.biography_entries(self.splits["pretrain"])
        if self.config.shuffle_entries:
            rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, _CORPUS_STREAM]))
            entries = [entries[i] for i in rng.permutation(len(entries))]
        return entries

    def biography_entries(self, person_ids: Iterable[int]) -> list[str]:
        """entries_per_person entries per person, person-major; deterministic per (seed, id)."""
        ids = self._check_ids(person_ids)
        cfg = self.config
        full = cfg.full_name
        templates = self._templates
        people = self.people
        values = self._values
        out: list[str] = []
        cache_block, choice, order = -1, [], []
        for pid in ids:
            block, local = divmod(pid, _ENTRY_BLOCK)
            if block != cache_block:
                choice, order = self._block_draws(block)
                cache_block = block
            p = people[pid]
            vals = values[pid]
            subj = f"{p.first} {p.middle} {p.last}"
            poss = subj + "'s"
            gender = p.gender
            ch = choice[local]
            for e, ord_e in enumerate(order[local]):
                sentences = []
                for pos, a in enumerate(ord_e):
                    tpl = templates[a][ch[a][e]]
                    if full or pos == 0:
                        name = poss if tpl.uses_poss else subj
                        if tpl.value_first:
                            sentences.append(tpl.named % (vals[a], name))
                        else:
                            sentences.append(tpl.named % (name, vals[a]))
                    else:
                        sentences.append(tpl.pronoun[gender] % vals[a])
                out.append(" ".join(sentences))
        return out

    def qa_examples(
        self, person_ids: Iterable[int], attributes: Sequence[str] = ATTRIBUTES
    ) -> list[QAExample]:
        """One QA pair per (person, attribute), person-major in the given attribute order."""
        ids = self._check_ids(person_ids)
        attrs = list(attributes)
        for a in attrs:
            if a not in ATTRIBUTES:
                raise ValueError(f"unknown attribute {a!r}; use one of {ATTRIBUTES}.")
        idx = [ATTRIBUTES.index(a) for a in attrs]
        out: list[QAExample] = []
        for pid in ids:
            p = self.people[pid]
            name = p.full_name
            vals = self._values[pid]
            for a, j in zip(attrs, idx):
                out.append(
                    QAExample(
                        person_id=pid,
                        attribute=a,
                        prompt=QUESTION_TEMPLATES[a].format(name=name) + ANSWER_CUE,
                        answer=" " + vals[j],
                    )
                )
        return out

    def word_list(self) -> list[str]:
        """Sorted set of every token (per ``split_words``) that entries and QA can contain.

        Built from templates, pronouns, the world's people and the configured
        date ranges, so a word-level tokenizer can be fit without the corpus.
        """
        cfg = self.config
        words: set[str] = set()
        texts: list[str] = []
        for a in ATTRIBUTES:
            for tpl in SENTENCE_TEMPLATES[a][: cfg.templates_per_attribute]:
                texts.append(tpl.replace("{subj}", " ").replace("{poss}", " ").replace("{value}", " "))
            texts.append(QUESTION_TEMPLATES[a].replace("{name}", " ") + ANSWER_CUE)
        for g in GENDERS:
            for w in PRONOUNS[g].values():
                texts.append(w + " " + w.capitalize())
        texts.append("'s")
        texts.extend(MONTHS)
        texts.extend(str(d) for d in range(1, DAYS_PER_MONTH + 1))
        texts.extend(str(y) for y in range(cfg.year_min, cfg.year_max + 1))
        texts.append(",")
        for text in texts:
            words.update(split_words(text))
        for p in self.people:
            words.update((p.first, p.middle, p.last))
            for v in self._values[p.id]:
                words.update(split_words(v))
        return sorted(words)

    # ------------------------------------------------------------------ json
    def to_json(self) -> dict[str, Any]:
        """Config, splits and people as plain JSON types (people as a list of records)."""
        return {
            "format": WORLD_JSON_FORMAT,
            "version": WORLD_JSON_VERSION,
            "config": self.config.to_json(),
            "splits": {k: list(v) for k, v in self.splits.items()},
            "people": [
                {f: getattr(p, f) for f in Person.__dataclass_fields__} for p in self.people
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BiographyWorld":
        """Rebuild a world saved with ``to_json`` (no regeneration, so edits are kept)."""
        if data.get("format") != WORLD_JSON_FORMAT:
            raise ValueError(
                f"not a biography world: format={data.get('format')!r}, expected {WORLD_JSON_FORMAT!r}."
            )
        if data.get("version") != WORLD_JSON_VERSION:
            raise ValueError(
                f"unsupported biography world version {data.get('version')!r}; "
                f"this code reads version {WORLD_JSON_VERSION}."
            )
        config = BiographyWorldConfig.from_json(data["config"])
        people = [Person(**rec) for rec in data["people"]]
        splits = {k: [int(i) for i in v] for k, v in data["splits"].items()}
        return cls(config, people, splits)


def _template_vocabulary() -> set[str]:
    """Capitalised forms of every fixed word, so generated names never collide with them."""
    words: set[str] = set()
    for a in ATTRIBUTES:
        for tpl in SENTENCE_TEMPLATES[a]:
            words.update(split_words(tpl.replace("{", " ").replace("}", " ")))
        words.update(split_words(QUESTION_TEMPLATES[a]))
    words.update(MONTHS)
    words.update(("He", "She", "His", "Her", "Answer", "University", "Subj", "Poss", "Value", "Name"))
    return {w.capitalize() for w in words if w.isalpha()}


def _build_pools(cfg: BiographyWorldConfig, rng: np.random.Generator) -> dict[str, list[str]]:
    """Mutually disjoint word pools, each from its own seed drawn from the world rng."""
    sizes = {
        "first_names": cfg.n_first_names,
        "middle_names": cfg.n_middle_names,
        "last_names": cfg.n_last_names,
        "birth_cities": cfg.n_birth_cities,
        "universities": cfg.n_universities,
        "majors": cfg.n_majors,
        "companies": cfg.n_companies,
        "company_cities": cfg.n_company_cities,
    }
    seeds = rng.integers(0, 2**63 - 1, size=len(_POOL_NAMES))
    used = _template_vocabulary()
    pools: dict[str, list[str]] = {}
    for name, seed in zip(_POOL_NAMES, seeds):
        words = make_word_pool(sizes[name], int(seed), exclude=used)
        used.update(words)
        pools[name] = words
    pools["universities"] = [w + " University" for w in pools["universities"]]
    return pools


def generate_world(config: BiographyWorldConfig) -> BiographyWorld:
    """Build the people and splits of a world; text is generated lazily by the world."""
    cfg = config.validate()
    rng = np.random.default_rng(cfg.seed)
    pools = _build_pools(cfg, rng)
    n = cfg.n_people
    nf, nm, nl = cfg.n_first_names, cfg.n_middle_names, cfg.n_last_names
    flat = rng.choice(nf * nm * nl, size=n, replace=False)  # unique full names
    first_i, rest = np.divmod(flat, nm * nl)
    middle_i, last_i = np.divmod(rest, nl)
    gender_i = rng.integers(0, 2, size=n)
    month_i = rng.integers(0, 12, size=n)
    day = rng.integers(1, DAYS_PER_MONTH + 1, size=n)
    year = rng.integers(cfg.year_min, cfg.year_max + 1, size=n)
    city_i = rng.integers(0, cfg.n_birth_cities, size=n)
    uni_i = rng.integers(0, cfg.n_universities, size=n)
    major_i = rng.integers(0, cfg.n_majors, size=n)
    company_i = rng.integers(0, cfg.n_companies, size=n)
    # Each company has one fixed headquarters city, so company_city is a function of company.
    hq = rng.integers(0, cfg.n_company_cities, size=cfg.n_companies)
    hq_city = [pools["company_cities"][int(j)] for j in hq]

    firsts, middles, lasts = pools["first_names"], pools["middle_names"], pools["last_names"]
    cities, unis, majors, companies = (
        pools["birth_cities"], pools["universities"], pools["majors"], pools["companies"]
    )
    cols = zip(
        first_i.tolist(), middle_i.tolist(), last_i.tolist(), gender_i.tolist(), month_i.tolist(),
        day.tolist(), year.tolist(), city_i.tolist(), uni_i.tolist(), major_i.tolist(),
        company_i.tolist(),
    )
    people = [
        Person(
            id=pid,
            first=firsts[f],
            middle=middles[m],
            last=lasts[la],
            gender=GENDERS[g],
            birth_date=f"{MONTHS[mo]} {d}, {y}",
            birth_city=cities[c],
            university=unis[u],
            major=majors[mj],
            company=companies[co],
            company_city=hq_city[co],
        )
        for pid, (f, m, la, g, mo, d, y, c, u, mj, co) in enumerate(cols)
    ]
    p_count, n_train = cfg.n_pretrain_people, cfg.n_task0_train
    splits: dict[str, list[int]] = {
        "pretrain": list(range(p_count)),
        "task0_train": list(range(n_train)),
        "task0_test": list(range(n_train, p_count)),
    }
    for t in range(1, cfg.n_new_tasks + 1):
        start = p_count + (t - 1) * cfg.n_new_people_per_task
        splits[f"task{t}"] = list(range(start, start + cfg.n_new_people_per_task))
    return BiographyWorld(cfg, people, splits)


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        write(fh)


def _write_qa(path: Path, examples: list[QAExample]) -> None:
    def write(fh: Any) -> None:
        for ex in examples:
            fh.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")

    _atomic_write(path, write)


def write_world(world: BiographyWorld, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write world.json, pretrain.txt and qa_<split>.jsonl files; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    path = out / "world.json"
    data = world.to_json()
    _atomic_write(path, lambda fh: json.dump(data, fh, ensure_ascii=False))
    written["world"] = path

    path = out / "pretrain.txt"

    def write_pretrain(fh: Any) -> None:
        for entry in world.pretraining_corpus():
            fh.write(entry)
            fh.write("\n")

    _atomic_write(path, write_pretrain)
    written["pretrain"] = path
    return {**written, **write_qa_files(world, out)}


def write_qa_files(world: BiographyWorld, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write a qa_<split>.jsonl file (``{"prompt", "answer"}`` rows) for every split but pretraining; returns
    qa_<split> -> path. What the diagnostics read, without the (large) pretraining text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, ids in world.splits.items():
        if split == "pretrain":
            continue
        path = out / f"qa_{split}.jsonl"
        _write_qa(path, world.qa_examples(ids))
        written[f"qa_{split}"] = path
    return written
