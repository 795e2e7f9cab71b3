"""Tests for the synthetic biography world, its templates and word pools."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, fields, replace

import numpy as np

import pytest

from forgetlab.worlds.biography import (
    ATTRIBUTES,
    MONTHS,
    BiographyWorld,
    BiographyWorldConfig,
    _build_pools,
    generate_world,
    split_words,
    write_world,
)
from forgetlab.worlds.biography_templates import (
    ANSWER_CUE,
    QUESTION_TEMPLATES,
    SENTENCE_TEMPLATES,
)
from forgetlab.worlds.names import make_word_pool

SMALL = BiographyWorldConfig(
    seed=3,
    n_pretrain_people=40,
    n_new_people_per_task=10,
    n_new_tasks=2,
    n_first_names=20,
    n_middle_names=20,
    n_last_names=30,
    n_birth_cities=15,
    n_universities=15,
    n_majors=10,
    n_companies=12,
    n_company_cities=8,
)
PRONOUN_TOKENS = {"he", "she", "his", "her", "He", "She", "His", "Her"}


@pytest.fixture(scope="module")
def world() -> BiographyWorld:
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def pronoun_world() -> BiographyWorld:
    return generate_world(replace(SMALL, full_name=False))


def sentences_of(entry: str) -> list[str]:
    return re.split(r"(?<=\.) ", entry)


def sentence_index(person, full_name: bool) -> dict[str, tuple[str, int, str]]:
    """Every sentence the person can produce -> (attribute, template index, form)."""
    name = person.full_name
    pron = {"male": ("he", "his"), "female": ("she", "her")}[person.gender]
    index: dict[str, tuple[str, int, str]] = {}
    for a in ATTRIBUTES:
        v = person.value(a)
        for i, t in enumerate(SENTENCE_TEMPLATES[a]):
            index[t.format(subj=name, poss=name + "'s", value=v)] = (a, i, "name")
            if not full_name:
                subj, poss = (w.capitalize() for w in pron) if t[0] == "{" else pron
                index[t.format(subj=subj, poss=poss, value=v)] = (a, i, "pronoun")
    return index


def parse_entries(w: BiographyWorld, pid: int) -> list[list[tuple[str, int, str]]]:
    """Map each sentence of each of the person's entries back to its template."""
    index = sentence_index(w.people[pid], w.config.full_name)
    parsed = []
    for entry in w.biography_entries([pid]):
        sents = sentences_of(entry)
        assert all(s in index for s in sents), entry
        parsed.append([index[s] for s in sents])
    return parsed


# ---------------------------------------------------------------- templates
@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_templates_are_50_distinct_and_follow_placeholder_rules(attribute: str) -> None:
    templates = SENTENCE_TEMPLATES[attribute]
    assert len(templates) == 50 and len(set(templates)) == 50
    for t in templates:
        assert t.isascii() and t.endswith(".") and "%" not in t
        assert t.count("{value}") == 1
        assert t.count("{subj}") + t.count("{poss}") == 1
        assert set(re.findall(r"\{[^}]*\}", t)) <= {"{value}", "{subj}", "{poss}"}
        assert not set(split_words(t.replace("{", " ").replace("}", " "))) & PRONOUN_TOKENS


def test_question_templates() -> None:
    assert set(QUESTION_TEMPLATES) == set(ATTRIBUTES)
    assert QUESTION_TEMPLATES["birth_date"] == "What is the birth date of {name}?"
    assert QUESTION_TEMPLATES["company_city"] == "Where did {name} work?"
    assert all(q.count("{name}") == 1 for q in QUESTION_TEMPLATES.values())


# ---------------------------------------------------------------- word pools
def test_make_word_pool_deterministic_distinct_and_excluding() -> None:
    a = make_word_pool(300, seed=1)
    assert a == make_word_pool(300, seed=1)
    assert a != make_word_pool(300, seed=2)
    assert len(set(a)) == 300
    assert all(w.isalpha() and w.isascii() and w[0].isupper() and w[1:].islower() for w in a)
    b = make_word_pool(300, seed=1, exclude=set(a[:100]))
    assert not set(b) & set(a[:100])


def test_make_word_pool_reports_exhaustion() -> None:
    with pytest.raises(ValueError, match="max_syllables"):
        make_word_pool(100_000, seed=0, min_syllables=1, max_syllables=1)


def test_pools_mutually_disjoint() -> None:
    pools = _build_pools(BiographyWorldConfig(), np.random.default_rng(0))
    pools["universities"] = [u.removesuffix(" University") for u in pools["universities"]]
    seen: set[str] = set()
    for name, words in pools.items():
        assert len(set(words)) == len(words), name
        assert not seen & set(words), name
        seen |= set(words)
    assert len(pools["birth_cities"]) == 200 and len(pools["company_cities"]) == 100


# ---------------------------------------------------------------- world structure
def test_determinism_and_seed_sensitivity(world: BiographyWorld) -> None:
    again = generate_world(SMALL)
    ids = list(range(SMALL.n_people))
    assert again.people == world.people
    assert again.biography_entries(ids[:40]) == world.biography_entries(ids[:40])
    assert again.qa_examples(ids) == world.qa_examples(ids)
    other = generate_world(replace(SMALL, seed=4))
    assert other.biography_entries(ids[:40]) != world.biography_entries(ids[:40])
    assert other.people != world.people


def test_entries_do_not_depend_on_requested_ids() -> None:
    w = generate_world(replace(SMALL, n_pretrain_people=1100, n_last_names=100))
    both = w.biography_entries([3, 1030])
    assert w.biography_entries([1030]) == both[5:]
    assert w.biography_entries([3]) == both[:5]
    assert w.biography_entries(range(10))[15:20] == w.biography_entries([3])


def test_splits(world: BiographyWorld) -> None:
    s = world.splits
    assert list(s) == ["pretrain", "task0_train", "task0_test", "task1", "task2"]
    assert s["pretrain"] == list(range(40))
    assert len(s["task0_train"]) == 20 and len(s["task0_test"]) == 20
    assert sorted(s["task0_train"] + s["task0_test"]) == s["pretrain"]
    assert s["task1"] == list(range(40, 50)) and s["task2"] == list(range(50, 60))
    all_ids = s["pretrain"] + s["task1"] + s["task2"]
    assert sorted(all_ids) == list(range(len(world.people))) == [p.id for p in world.people]


def test_new_task_people_never_in_pretraining_text(world: BiographyWorld) -> None:
    text = "\n".join(world.biography_entries(world.splits["pretrain"]))
    for t in ("task1", "task2"):
        for pid in world.splits[t]:
            assert world.people[pid].full_name not in text


def test_names_unique_and_company_city_is_function_of_company(world: BiographyWorld) -> None:
    names = [p.full_name for p in world.people]
    assert len(set(names)) == len(names)
    hq: dict[str, str] = {}
    for p in world.people:
        assert hq.setdefault(p.company, p.company_city) == p.company_city
    big = generate_world(replace(SMALL, n_pretrain_people=400, n_new_tasks=0))
    hq = {}
    for p in big.people:
        assert hq.setdefault(p.company, p.company_city) == p.company_city
    assert {p.gender for p in big.people} == {"male", "female"}


def test_attribute_values_format_and_disjoint_fields(world: BiographyWorld) -> None:
    date_re = re.compile(rf"^({'|'.join(MONTHS)}) ([1-9]|1\d|2[0-8]), (\d{{4}})$")
    fields: dict[str, set[str]] = {f: set() for f in
                                   ("first", "middle", "last", "birth_city", "university",
                                    "major", "company", "company_city")}
    for p in world.people:
        m = date_re.match(p.birth_date)
        assert m and SMALL.year_min <= int(m.group(3)) <= SMALL.year_max
        assert p.university.endswith(" University")
        for f in fields:
            fields[f].add(getattr(p, f).removesuffix(" University"))
    names = list(fields)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not fields[a] & fields[b], (a, b)


# ---------------------------------------------------------------- entries
def test_entries_six_sentences_full_name_and_templates_without_replacement(world: BiographyWorld) -> None:
    orders = set()
    for pid in world.splits["pretrain"][:15]:
        parsed = parse_entries(world, pid)
        assert len(parsed) == SMALL.entries_per_person
        for entry in parsed:
            assert len(entry) == 6
            assert sorted(a for a, _, _ in entry) == sorted(ATTRIBUTES)
            assert all(form == "name" for _, _, form in entry)
            orders.add(tuple(a for a, _, _ in entry))
        for a in ATTRIBUTES:
            used = [i for entry in parsed for (att, i, _) in entry if att == a]
            assert len(set(used)) == len(used) == SMALL.entries_per_person
    assert len(orders) > 1  # sentences are shuffled by default


def test_fixed_sentence_order_when_not_permuting() -> None:
    w = generate_world(replace(SMALL, permute_sentences=False))
    for pid in range(5):
        for entry in parse_entries(w, pid):
            assert tuple(a for a, _, _ in entry) == ATTRIBUTES


@pytest.mark.parametrize("n_templates", [1, 2, 7])
def test_template_subset_and_cycling(n_templates: int) -> None:
    w = generate_world(replace(SMALL, templates_per_attribute=n_templates))
    for pid in range(5):
        parsed = parse_entries(w, pid)
        for a in ATTRIBUTES:
            used = [i for entry in parsed for (att, i, _) in entry if att == a]
            assert max(used) < n_templates
            counts = Counter(used)
            if n_templates >= 5:
                assert len(counts) == 5
            else:  # cycled: every template used, as evenly as possible
                assert len(counts) == n_templates
                assert max(counts.values()) - min(counts.values()) <= 1


def test_pronoun_mode(pronoun_world: BiographyWorld) -> None:
    w = pronoun_world
    for pid in range(20):
        person = w.people[pid]
        wrong = {"she", "her", "She", "Her"} if person.gender == "male" else {"he", "his", "He", "His"}
        for entry, parsed in zip(w.biography_entries([pid]), parse_entries(w, pid)):
            assert [form for _, _, form in parsed] == ["name"] + ["pronoun"] * 5
            sents = sentences_of(entry)
            assert person.full_name in sents[0]
            for s in sents[1:]:
                assert person.first not in s and person.last not in s
                tokens = split_words(s)
                assert not set(tokens) & wrong
                assert "ther" not in tokens and "Ther" not in tokens
                assert s[0].isupper()
                for j, tok in enumerate(tokens):
                    if tok.lower() in PRONOUN_TOKENS:
                        assert tok[0].isupper() == (j == 0), s


# ---------------------------------------------------------------- QA
def test_qa_format(world: BiographyWorld) -> None:
    p = world.people[41]
    qa = world.qa_examples([41, 2])
    assert [q.person_id for q in qa] == [41] * 6 + [2] * 6
    assert [q.attribute for q in qa[:6]] == list(ATTRIBUTES)
    assert qa[0].prompt == f"What is the birth date of {p.full_name}?\nAnswer:"
    assert qa[0].answer == " " + p.birth_date
    assert qa[2].prompt == f"Which university did {p.full_name} study?\nAnswer:"
    assert qa[5].prompt == f"Where did {p.full_name} work?\nAnswer:"
    assert qa[5].answer == " " + p.company_city
    for q in qa:
        person = world.people[q.person_id]
        assert q.prompt == QUESTION_TEMPLATES[q.attribute].format(name=person.full_name) + ANSWER_CUE
        assert q.answer == " " + person.value(q.attribute)
    sub = world.qa_examples([1], attributes=("major", "birth_city"))
    assert [q.attribute for q in sub] == ["major", "birth_city"]
    with pytest.raises(ValueError):
        world.qa_examples([1], attributes=("height",))
    with pytest.raises(ValueError):
        p.value("height")


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes, field",
    [
        ({"n_pretrain_people": 0}, "n_pretrain_people"),
        ({"n_new_people_per_task": 0}, "n_new_people_per_task"),
        ({"n_new_tasks": -1}, "n_new_tasks"),
        ({"task0_train_fraction": 1.0}, "task0_train_fraction"),
        ({"task0_train_fraction": 0.01, "n_pretrain_people": 10}, "task0_train_fraction"),
        ({"entries_per_person": 0}, "entries_per_person"),
        ({"templates_per_attribute": 51}, "templates_per_attribute"),
        ({"templates_per_attribute": 0}, "templates_per_attribute"),
        ({"year_min": 2000, "year_max": 1999}, "year_min"),
        ({"n_majors": 0}, "n_majors"),
        ({"n_first_names": 2, "n_middle_names": 2, "n_last_names": 2}, "n_last_names"),
        ({"seed": -1}, "seed"),
        ({"full_name": 1}, "full_name"),
        ({"n_companies": 2.5}, "n_companies"),
    ],
)
def test_validate_errors(changes: dict, field: str) -> None:
    cfg = replace(BiographyWorldConfig(), **changes)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    msg = str(err.value)
    assert "\n" not in msg and f"{field}=" in msg
    with pytest.raises(ValueError):
        generate_world(cfg)


def test_config_fields_have_help() -> None:
    assert all(f.metadata.get("help") for f in fields(BiographyWorldConfig))
    assert BiographyWorldConfig().validate() == BiographyWorldConfig()


# ---------------------------------------------------------------- persistence
def test_json_round_trip(world: BiographyWorld) -> None:
    data = json.loads(json.dumps(world.to_json()))
    back = BiographyWorld.from_json(data)
    assert back.config == world.config
    assert back.people == world.people
    assert back.splits == world.splits
    assert back.biography_entries(range(5)) == world.biography_entries(range(5))
    with pytest.raises(ValueError):
        BiographyWorld.from_json({**data, "format": "other"})


def test_write_world(world: BiographyWorld, tmp_path) -> None:
    paths = write_world(world, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())  # no temp files left behind
    assert names == sorted(
        ["world.json", "pretrain.txt", "qa_task0_train.jsonl", "qa_task0_test.jsonl",
         "qa_task1.jsonl", "qa_task2.jsonl"]
    )
    lines = (tmp_path / "pretrain.txt").read_text().splitlines()
    assert lines == world.pretraining_corpus()
    qa = [json.loads(x) for x in (tmp_path / "qa_task1.jsonl").read_text().splitlines()]
    assert len(qa) == 10 * 6
    assert qa == [asdict(q) for q in world.qa_examples(world.splits["task1"])]
    assert set(qa[0]) == {"person_id", "attribute", "prompt", "answer"}
    loaded = BiographyWorld.from_json(json.loads(paths["world"].read_text()))
    assert loaded.people == world.people


# ---------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("full_name", [True, False])
def test_word_list_covers_all_tokens(full_name: bool, world, pronoun_world) -> None:
    w = world if full_name else pronoun_world
    vocab = set(w.word_list())
    ids = list(range(len(w.people)))
    text = w.biography_entries(w.splits["pretrain"])
    text += [q.prompt + q.answer for q in w.qa_examples(ids)]
    tokens = {tok for t in text for tok in split_words(t)}
    assert tokens <= vocab, sorted(tokens - vocab)[:10]


def test_pretraining_corpus_keeps_a_persons_entries_apart(world: BiographyWorld) -> None:
    """Shuffled: the same entries as person-major order, rarely two of one person side by side."""
    person_major = world.biography_entries(world.splits["pretrain"])
    corpus = world.pretraining_corpus()
    assert sorted(corpus) == sorted(person_major) and corpus != person_major
    assert corpus == world.pretraining_corpus()  # seeded

    ids = world.splits["pretrain"]
    k = world.config.entries_per_person
    owner = {e: ids[i // k] for i, e in enumerate(person_major)}
    same = sum(owner[a] == owner[b] for a, b in zip(corpus, corpus[1:]))
    assert same <= 3 + 3 * len(corpus) / len(ids)  # about (k - 1) / n of neighbours by chance
    kept = generate_world(replace(world.config, shuffle_entries=False))
    assert kept.pretraining_corpus() == person_major


def test_birth_dates_use_every_day_month_and_both_end_years() -> None:
    """Days are 1..28 in every month, as in the paper, and years run from year_min to year_max inclusive: with
    400 people and a 2-year range, each day, each month and both years occur (a day missing by chance: ~1e-6)."""
    w = generate_world(replace(SMALL, n_pretrain_people=400, n_new_tasks=0, year_min=1990, year_max=1991))
    dates = [p.birth_date.replace(",", "").split() for p in w.people]
    assert {int(d) for _, d, _ in dates} == set(range(1, 29))
    assert {m for m, _, _ in dates} == set(MONTHS)
    assert {int(y) for _, _, y in dates} == {1990, 1991}
