"""The ICL task world: well-formed tasks, disjoint splits, roles, sequences, determinism."""

import dataclasses
from collections import Counter

import pytest

from forgetlab.worlds.icl import FAMILIES, ICLWorld, ICLWorldConfig, generate_icl_world


@pytest.fixture(scope="module")
def world():
    return generate_icl_world(ICLWorldConfig(seed=3))


def test_at_least_forty_tasks_in_every_family_with_both_roles(world):
    assert len(world.tasks) >= 40
    assert len({t.name for t in world.tasks}) == len(world.tasks)
    families = Counter(t.family for t in world.tasks)
    assert set(families) == set(FAMILIES)
    assert len(world.role("general")) >= 30 and len(world.role("new")) >= 10
    assert any(not t.shared_inputs for t in world.role("general")) and any(t.shared_inputs for t in world.role("general"))


def test_tasks_are_functions_with_enough_pairs_for_ten_shots(world):
    for task in world.tasks:
        inputs = [x for x, _ in task.pairs]
        assert len(set(inputs)) == len(inputs), task.name  # one output per input
        assert all(x and y and x.strip() == x for x, y in task.pairs)
        splits = task.splits(world.config.seed)
        assert len(splits.train) >= 10 and splits.test, task.name
        assert task.instruction.endswith(".")


def test_known_rules_hold(world):
    pairs = dict(world.task("add_3").pairs)
    assert pairs["eighteen"] == "one" and pairs["zero"] == "three"  # modulo 20
    assert dict(world.task("sub_1").pairs)["zero"] == "nineteen"
    for x, y in world.task("reverse").pairs:
        assert y == x[::-1] and y != x
    for x, y in world.task("pick_alpha_first").pairs:
        assert y == min(x.split()) and len({w[0] for w in x.split()}) == 3  # decided by the first letters
    for x, y in world.task("count_words").pairs:
        assert world.task("add_1").pairs[len(x.split()) - 1][1] == y  # number word of the list length
    red = dict(world.task("partner_red").pairs)
    assert sorted(red) == sorted(red.values()) and all(k != v for k, v in red.items())  # a derangement
    for x, y in world.task("first_letter_of_partner_red").pairs:
        assert y == red[x][0]
    languages = [dict(t.pairs) for t in world.tasks if t.name.startswith("translate_") and t.role == "general"]
    assert len(languages) == world.config.n_translate_tasks
    outputs = [set(lang.values()) for lang in languages]
    assert all(set(lang) == set(red) and len(set(lang.values())) == len(lang) for lang in languages)  # bijections
    assert not set.intersection(*outputs) and not (set.union(*outputs) & set(red))  # each language its own words


def test_splits_are_disjoint_and_cover_the_pairs(world):
    for task in world.tasks:
        s = task.splits(world.config.seed)
        sets = [set(s.train), set(s.test), set(s.valid)]
        assert sum(map(len, sets)) == len(task.pairs)
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_rule_tasks_keep_test_pairs_out_of_pretraining(world):
    for task in world.role("general"):
        seen = set(task.pretraining_pairs(world.config.seed))
        test = set(task.splits(world.config.seed).test)
        if task.family == "list":
            assert not seen & test, task.name
        else:
            assert seen == set(task.pairs)


def test_sequences_hold_new_tasks_only(world):
    new = {t.name for t in world.role("new")}
    assert len(world.sequences) == 3
    for seq in world.sequences:
        assert len(seq) == 5 and len(set(seq)) == 5 and set(seq) <= new
        assert all(name.startswith("reworded_") for name in seq)


def test_reworded_tasks_ask_for_a_known_ability_in_known_words(world):
    reworded = [t for t in world.tasks if t.name.startswith("reworded_")]
    assert len(reworded) == world.config.n_partner_tasks + world.config.n_translate_tasks + 1
    for task in reworded:
        source = world.task(task.name.removeprefix("reworded_"))
        assert source.role == "general" and task.role == "new"
        assert task.pairs == source.pairs and task.instruction != source.instruction
    # the vocabulary (hence the tokenizer and any model built on the world) is that of the other tasks
    others = ICLWorld(world.config, [t for t in world.tasks if t not in reworded], [])
    assert others.words() == world.words()


def test_coded_tasks_ask_for_the_reworded_abilities_in_words_that_name_nothing(world):
    from forgetlab.worlds.icl import with_coded_tasks

    coded = [t for t in world.tasks if t.name.startswith("coded_")]
    reworded = [t for t in world.tasks if t.name.startswith("reworded_")]
    assert [t.name.removeprefix("coded_") for t in coded] == [t.name.removeprefix("reworded_") for t in reworded]
    lexicon = {x for t in world.tasks if t.name.startswith("partner_") for x, _ in t.pairs}
    instruction_words = {w for t in world.tasks if not t.name.startswith("coded_") for w in t.instruction.split()}
    for task in coded:
        source = world.task(task.name.removeprefix("coded_"))
        assert task.role == "new" and task.pairs == source.pairs and task.family == source.family
        give, the, *code, dot = task.instruction.split()
        assert (give, the, dot) == ("Give", "the", ".") and len(code) == 2 and set(code) <= lexicon - instruction_words
    assert len({t.instruction for t in coded}) == len(coded)
    # they add no word (tokenizer, model) and change neither the sequences nor the pretraining corpus' tasks
    others = ICLWorld(world.config, [t for t in world.tasks if t not in coded], world.sequences)
    assert others.words() == world.words() and others.role("general") == world.role("general")
    # a world.json written before coded tasks existed is completed from its config, the same tasks
    assert with_coded_tasks(others).to_json() == world.to_json()
    changed = ICLWorld(world.config, [dataclasses.replace(others.tasks[0], instruction="Say it .")] + others.tasks[1:],
                       world.sequences)
    with pytest.raises(ValueError, match="another version of the world generator"):
        with_coded_tasks(changed)


def test_deterministic_and_round_trips(world, tmp_path):
    again = generate_icl_world(ICLWorldConfig(seed=3))
    assert again.to_json() == world.to_json()
    assert generate_icl_world(ICLWorldConfig(seed=4)).to_json() != world.to_json()
    world.write(tmp_path / "world.json")
    assert ICLWorld.read(tmp_path / "world.json").to_json() == world.to_json()


@pytest.mark.parametrize("field,value", [("n_words", 5), ("modulus", 50), ("max_count", 30), ("n_kind_tasks", 0),
                                         ("n_partner_tasks", 1), ("n_translate_tasks", 11)])
def test_bad_sizes_are_rejected_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        generate_icl_world(ICLWorldConfig(**{field: value}))


def test_string_list_and_composed_rules_by_hand(world):
    """The rules no other test reads: each checked on every pair against the rule written out by hand."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    assert dict(world.task("next_letter").pairs)["z"] == "a" and dict(world.task("prev_letter").pairs)["a"] == "z"
    for x, y in world.task("prev_letter").pairs:
        assert letters.index(y) == (letters.index(x) - 1) % 26
    for x, y in world.task("next_letter").pairs:
        assert letters.index(y) == (letters.index(x) + 1) % 26
    for x, y in world.task("last_letter").pairs:
        assert y == x[-1]
    for name, pick in (("pick_first", 0), ("pick_middle", 1), ("pick_last", 2)):
        for x, y in world.task(name).pairs:
            assert y == x.split()[pick], name
    red, blue = dict(world.task("partner_red").pairs), dict(world.task("partner_blue").pairs)
    tribe, planet = dict(world.task("tribe_of").pairs), dict(world.task("planet_of").pairs)
    for x, y in world.task("tribe_of_partner_red").pairs:
        assert y == tribe[red[x]]
    for x, y in world.task("planet_of_partner_blue").pairs:
        assert y == planet[blue[x]]
    (composed,) = [t for t in world.tasks if t.name.endswith("_of_partner_red") and t.name.startswith("translate_")]
    language = dict(world.task(composed.name.removesuffix("_of_partner_red")).pairs)
    assert all(y == language[red[x]] for x, y in composed.pairs)
    # a composition differs from its parts (else the test above could not tell them apart)
    assert any(tribe[red[x]] != tribe[x] for x in red)


def test_sequences_spread_the_reworded_tasks_evenly(world):
    """3 sequences of 5 from 9 reworded tasks must repeat some, but only as much as they must: every reworded task
    is used, none more than once above another (cycling one shuffled order of them)."""
    reworded = [t.name for t in world.tasks if t.name.startswith("reworded_")]
    counts = Counter(name for seq in world.sequences for name in seq)
    assert set(counts) == set(reworded)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({tuple(seq) for seq in world.sequences}) == len(world.sequences)


def test_remaining_task_rules_by_hand(world):
    """Every pair of the rules not read above, against the rule written out here: a copy-pasted ``min`` in
    ``pick_alpha_last``, a wrong offset in one ``add_k``/``sub_k`` or a lower-cased answer would pass the rest."""
    upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lower = upper.lower()
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
    lists = [x for x, _ in world.task("pick_alpha_first").pairs]
    assert [x for x, _ in world.task("pick_alpha_last").pairs] == lists
    for x, y in world.task("pick_alpha_last").pairs:
        a, b, c = x.split()
        assert y == (a if a > b and a > c else b if b > c else c)
    assert any(y != dict(world.task("pick_alpha_first").pairs)[x] for x, y in world.task("pick_alpha_last").pairs)
    assert [x for x, _ in world.task("capitalize_first").pairs] == lists
    for x, y in world.task("capitalize_first").pairs:
        first = x.split()[0]
        assert y == upper[lower.index(first[0])] + first[1:]
    lexicon = [x for x, _ in world.task("reverse").pairs]
    assert [x for x, _ in world.task("capitalize").pairs] == [x for x, _ in world.task("first_letter").pairs] == lexicon
    for x, y in world.task("capitalize").pairs:
        assert y == upper[lower.index(x[0])] + x[1:] and y != x
    for x, y in world.task("first_letter").pairs:
        assert y == x[:1] and len(y) == 1
    assert dict(world.task("upper_letter").pairs) == dict(zip(lower, upper))
    m = world.config.modulus
    assert m == 20
    adds = {int(t.name.removeprefix("add_")): t for t in world.tasks if t.name.startswith("add_")}
    subs = {int(t.name.removeprefix("sub_")): t for t in world.tasks if t.name.startswith("sub_")}
    assert sorted(adds) == [1, 2, 3, 4, 5, 6] and sorted(subs) == [1, 2, 3, 4]
    for sign, tasks in ((1, adds), (-1, subs)):
        for k, task in tasks.items():
            assert [x for x, _ in task.pairs] == numbers, task.name   # every number 0..19 once
            for x, y in task.pairs:
                i = numbers.index(x)
                expected = i + sign * k
                expected = expected - m if expected >= m else expected + m if expected < 0 else expected
                assert y == numbers[expected], (task.name, x, y)
            assert task.role == ("general" if k <= (3 if sign == 1 else 2) else "new"), task.name


def test_entity_inputs_are_shared_with_no_other_task(world):
    """``shared_inputs`` splits reports into own and shared inputs: entity tasks' inputs (whole and word by word)
    occur in no other task, and every other general task shares some input with another task."""
    entity = [t for t in world.tasks if t.name.startswith("entity_")]
    assert len(entity) == world.config.n_entity_tasks and all(len(t.pairs) == world.config.n_entities for t in entity)
    assert {t.name for t in world.tasks if not t.shared_inputs} == {t.name for t in entity}
    for task in entity:
        own = {x for x, _ in task.pairs}
        for other in world.tasks:
            if other is task:
                continue
            inputs = {x for x, _ in other.pairs}
            assert not own & inputs, (task.name, other.name)
            assert not own & {w for x in inputs for w in x.split()}, (task.name, other.name)
    for task in world.role("general"):
        if task.shared_inputs:
            others = {x for o in world.tasks if o is not task for x, _ in o.pairs}
            assert {x for x, _ in task.pairs} & others, task.name
