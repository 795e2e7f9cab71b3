"""Instruction tasks from the ICL world and from natural-instructions files (fixtures in that format)."""

import json

import pytest

from forgetlab.worlds.icl import ICLWorldConfig, generate_icl_world
from forgetlab.worlds.instructions import (NI_SEQUENCES, definition_of, load_jsonl_task, load_ni_task, load_task_file,
                                          ni_sequence, world_sequence)


def ni_file(folder, name, n=150, outputs=("yes",)):
    data = {"Contributors": ["fixture"], "Source": ["fixture"], "Categories": ["Sentiment Analysis"],
            "Definition": ["Decide if the review is positive.", "Answer yes or no."],
            "Positive Examples": [{"input": "great", "output": "yes", "explanation": "praise"}],
            "Negative Examples": [{"input": "bad", "output": "maybe", "explanation": "not an option"}],
            "Instances": [{"id": f"{name}-{i}", "input": f"review {i}", "output": list(outputs)} for i in range(n)]}
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_ni_file_is_read_with_all_references_and_last_hundred_for_test(tmp_path):
    ni_file(tmp_path, "task001_fixture", n=150, outputs=("yes", "Yes"))
    task = load_ni_task(tmp_path / "task001_fixture.json")
    assert task.name == "task001_fixture"
    assert task.definition == "Decide if the review is positive. Answer yes or no."
    assert task.instances[0] == ("review 0", ("yes", "Yes")) and task.examples == (("great", "yes"),)
    train, test = task.split(n_train=30, n_test=100)
    assert [x for x, _ in test] == [f"review {i}" for i in range(50, 150)]
    # 30 of the 50 before the test set, drawn (a file's order may be sorted by source or length), in file order
    index = [int(x.split()[1]) for x, _ in train]
    assert len(set(index)) == 30 and index == sorted(index) and max(index) < 50 and index != list(range(30))
    assert task.split(n_train=30, n_test=100) == (train, test)  # the same draw for the same seed
    assert task.split(n_train=30, n_test=100, seed=1)[0] != train
    assert [x for x, _ in task.split(n_train=50, n_test=100)[0]] == [f"review {i}" for i in range(50)]  # all, in order
    with pytest.raises(ValueError, match="not more than the 200"):
        task.split(n_test=200)
    with pytest.raises(ValueError, match="hold out at least 1"):  # [-0:] would be the whole task
        task.split(n_test=0)


def test_named_sequence_reads_the_upstream_files_in_order(tmp_path):
    for name in NI_SEQUENCES["NI-Seq-C1"]:
        ni_file(tmp_path, name)
    tasks = ni_sequence(tmp_path, "NI-Seq-C1")
    assert [t.name for t in tasks] == list(NI_SEQUENCES["NI-Seq-C1"])
    assert tasks[0].name == "task195_sentiment140_classification"


def test_missing_or_malformed_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="task618_amazonreview_summary_text_generation.json"):
        ni_sequence(tmp_path, "NI-Seq-G1")
    with pytest.raises(ValueError, match="unknown sequence"):
        ni_sequence(tmp_path, "NI-Seq-X9")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ni_task(tmp_path / "bad.json")
    (tmp_path / "onedef.json").write_text(json.dumps({"Definition": "Say it.", "Instances": [{"input": "a", "output": "b"}]}))
    assert load_ni_task(tmp_path / "onedef.json").definition == "Say it."  # a reformatted copy's single string
    (tmp_path / "extra.json").write_text(json.dumps({"Definition": ["x"], "Colour": "red", "Instances": []}))
    with pytest.raises(ValueError, match="unknown field.s. 'Colour'; a natural-instructions task file holds Contributors"):
        load_ni_task(tmp_path / "extra.json")
    (tmp_path / "nodef.json").write_text(json.dumps({"Instances": []}))
    with pytest.raises(ValueError, match="Definition"):
        load_ni_task(tmp_path / "nodef.json")
    (tmp_path / "noout.json").write_text(json.dumps({"Definition": ["x"], "Instances": [{"input": "a", "output": []}]}))
    with pytest.raises(ValueError, match="instance 0"):
        load_ni_task(tmp_path / "noout.json")
    (tmp_path / "empty.json").write_text(json.dumps({"Definition": ["x"], "Instances": []}))
    with pytest.raises(ValueError, match="empty.json has no instances"):
        load_ni_task(tmp_path / "empty.json")
    # references and definitions that are not text: refused with the file's name, not coerced or a TypeError
    for name, data, message in (
            ("numbers", {"Definition": ["x"], "Instances": [{"input": "a", "output": [1, None]}]}, "instance 0"),
            ("mapping", {"Definition": ["x"], "Instances": [{"input": "a", "output": {"k": "v"}}]}, "instance 0"),
            ("scalar", {"Definition": ["x"], "Instances": [{"input": "a", "output": 5}]}, "instance 0"),
            ("numdef", {"Definition": [1], "Instances": [{"input": "a", "output": ["b"]}]}, "non-empty list of strings"),
            ("nodefs", {"Definition": [], "Instances": [{"input": "a", "output": ["b"]}]}, "non-empty list of strings")):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=f"{name}.json: .*{message}"):
            load_ni_task(tmp_path / f"{name}.json")


def test_jsonl_rows_with_one_instruction_make_a_task_with_that_definition(tmp_path):
    rows = [{"instruction": "Say yes.", "input": f"q {i}", "output": "yes"} for i in range(3)]
    rows.append({"instruction": "Say yes.", "output": ["yes", "Yes"]})  # no input: an empty one
    (tmp_path / "yes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task_file(tmp_path / "yes.jsonl")
    assert task.name == "yes" and task.definition == "Say yes."
    assert task.instances == (("q 0", ("yes",)), ("q 1", ("yes",)), ("q 2", ("yes",)), ("", ("yes", "Yes")))


def test_jsonl_rows_keep_their_own_instructions_when_they_differ(tmp_path):
    import copy
    import pickle

    rows = [{"instruction": "Add one.", "input": "2", "output": "3"}, {"instruction": "Name a colour.", "input": "", "output": "red"}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_jsonl_task(tmp_path / "mixed.jsonl")
    first, second = task.instances
    assert first == ("2", ("3",)) and definition_of(task, first) == "Add one." and definition_of(task, second) == "Name a colour."
    x, refs = second  # still unpacks as a pair
    assert (x, refs) == ("", ("red",))
    train, test = task.split(n_test=1)
    assert definition_of(task, test[0]) == "Name a colour." and definition_of(task, train[0]) == "Add one."
    for clone in (copy.deepcopy(first), pickle.loads(pickle.dumps(first))):
        assert clone == first and clone.definition == "Add one."
    icl = task.as_icl_task()  # for FVs: each row's own instruction travels in its input
    assert list(icl.pairs) == [("Add one.\n2", "3"), ("Name a colour.", "red")]


@pytest.mark.parametrize("text,message", [
    ("", "has no instances"),
    ('{"instruction": "a", "input": "b", "output": "c", "reponse": "d"}', "line 1: unknown field\\(s\\) 'reponse'"),
    ('{"instruction": "a", "output": "c"}\n{"instruction": "a", "output": []}', "line 2: needs"),
    ('{"instruction": "a", "output": "c"}\n[1, 2]', "line 2: expected an object"),
    ('{"instruction": "a", "output": "c"}\n{oops', "line 2 is not valid JSON"),
    ('{"instruction": "a", "output": {"k": "v"}}', "line 1: needs"),
])
def test_bad_jsonl_files_name_the_line_and_the_problem(tmp_path, text, message):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_jsonl_task(tmp_path / "bad.jsonl")


def test_world_sequences_become_instruction_tasks_with_test_pairs_last():
    world = generate_icl_world(ICLWorldConfig(seed=1))
    seq = world_sequence(world, 2)
    assert [t.name for t in seq] == world.sequences[2]
    task = seq[0]
    splits = world.task(task.name).splits(1)
    _, test = task.split(n_test=len(splits.test))
    assert [(x, y[0]) for x, y in test] == list(splits.test)
    assert task.definition == world.task(task.name).instruction
    with pytest.raises(ValueError, match="sequences 0..2"):
        world_sequence(world, 3)


def test_training_never_reaches_into_the_held_out_test(tmp_path):
    """150 instances, the default 1000 training and 100 test: training is the first 50 only, never a test
    instance, however many training instances are asked for."""
    ni_file(tmp_path, "task002_fixture", n=150)
    task = load_ni_task(tmp_path / "task002_fixture.json")
    train, test = task.split()
    assert [x for x, _ in train] == [f"review {i}" for i in range(50)]
    assert [x for x, _ in test] == [f"review {i}" for i in range(50, 150)]


def test_world_tasks_hold_out_their_own_test_split_by_default():
    """A world task of a few dozen pairs has its own test split (21%), not the 100 instances of an NI task: the
    default ``split()`` returns exactly the world's test pairs and trains on the rest."""
    world = generate_icl_world(ICLWorldConfig(seed=1))
    for task in world_sequence(world, 0):
        splits = world.task(task.name).splits(1)
        train, test = task.split()
        assert [(x, y[0]) for x, y in test] == list(splits.test), task.name
        assert [(x, y[0]) for x, y in train] == list(splits.train) + list(splits.valid), task.name
