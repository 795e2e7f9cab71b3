"""Tasks: loading, 70/21/9 splits, k-shot sampling, shuffled-label counterfactuals, prompt text."""

import json
from collections import Counter

import numpy as np
import pytest

from forgetlab.fv.tasks import ICLPrompt, ICLTask, PromptFormat, TaskSplits, counterfactuals, load_task, sample_prompts


def numbered(n: int) -> ICLTask:
    return ICLTask.from_pairs("numbered", [(f"in{i}", f"out{i}") for i in range(n)])


# ---- prompt text -----------------------------------------------------------------------------------

def test_prompt_text_of_a_hand_example():
    prompt = ICLPrompt(demos=(("a", "b"),), query="c", answer="d")
    assert PromptFormat().text(prompt) == "Q: a\nA: b\n\nQ: c\nA:"
    two = ICLPrompt(demos=(("a", "b"), ("x", "y")), query="c", answer="d")
    assert PromptFormat().text(two) == "Q: a\nA: b\n\nQ: x\nA: y\n\nQ: c\nA:"
    assert PromptFormat().text(prompt.zero_shot()) == "Q: c\nA:"
    custom = PromptFormat(input_prefix="", output_prefix=" ->", answer_sep=" ", example_sep="\n")
    assert custom.text(two) == "a -> b\nx -> y\nc ->"


def test_prompt_with_an_instruction():
    prompt = ICLPrompt(demos=(("a", "b"),), query="c", answer="d").with_instruction("Say the next letter.")
    assert PromptFormat().text(prompt) == "Say the next letter.\nQ: a\nA: b\n\nQ: c\nA:"
    assert PromptFormat(instruction_sep=" ").text(prompt) == "Say the next letter. Q: a\nA: b\n\nQ: c\nA:"
    assert PromptFormat().text(prompt.zero_shot()) == "Q: c\nA:"  # the bare query drops the instruction too
    assert prompt.shuffled(np.random.default_rng(0)).instruction == "Say the next letter."


# ---- loading ---------------------------------------------------------------------------------------

def test_load_task_from_file(tmp_path):
    path = tmp_path / "colours.json"
    path.write_text(json.dumps([{"input": "sky", "output": "blue"}, {"input": "grass", "output": "green"}]))
    task = load_task(path)
    assert task.name == "colours" and task.pairs == (("sky", "blue"), ("grass", "green"))
    assert load_task(path, name="other").name == "other"


def test_load_a_real_task_file(icl_tasks_dir):
    task = load_task(icl_tasks_dir / "antonym.json")
    assert task.name == "antonym" and len(task.pairs) == 2398 and task.pairs[0] == ("flawed", "perfect")


@pytest.mark.parametrize("content, message", [
    ("[{\"input\": \"a\", \"output\": ", "is not valid JSON"),
    ("{\"input\": \"a\", \"output\": \"b\"}", "holds a dict, not an array"),
    ("\"just a string\"", "holds a str, not an array"),
    ("[{\"input\": \"a\"}]", "item 0 needs string fields 'input' and 'output'"),
    ("[{\"input\": \"a\", \"output\": \"b\"}, {\"in\": \"a\", \"out\": \"b\"}]", "item 1 needs string fields"),
    ("[{\"input\": \"a\", \"output\": 3}]", "item 0 needs string fields"),
    ("[[\"a\", \"b\", \"c\"]]", "item 0 must be an (input, output) pair of strings"),
    ("[]", "has no examples"),
])
def test_bad_task_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_task(path)
    assert message in str(err.value)


def test_missing_task_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        load_task(tmp_path)  # a directory is not a task file


# ---- splits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, sizes", [(100, (70, 21, 9)), (37, (26, 8, 3)), (200, (140, 42, 18))])
def test_split_sizes_disjoint_and_complete(n, sizes):
    task = numbered(n)
    s = task.splits(seed=0)
    assert (len(s.train), len(s.test), len(s.valid)) == sizes
    assert sizes == (round(0.70 * n), round(0.21 * n), n - round(0.70 * n) - round(0.21 * n))
    assert not set(s.train) & set(s.test) and not set(s.train) & set(s.valid) and not set(s.test) & set(s.valid)
    assert set(s.train) | set(s.test) | set(s.valid) == set(task.pairs)


def test_splits_are_deterministic_per_seed_and_differ_across_seeds():
    task = numbered(100)
    assert task.splits(seed=3) == task.splits(seed=3)
    assert numbered(100).splits(seed=3) == task.splits(seed=3)
    assert task.splits(seed=3).train != task.splits(seed=4).train
    assert task.splits(seed=3).valid != task.splits(seed=4).valid
    # shuffled, not the file order
    assert task.splits(seed=0).train != task.pairs[:70]


def test_split_by_name():
    s = numbered(100).splits(0)
    assert s.split("train") is s.train and s.split("test") is s.test and s.split("valid") is s.valid
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        s.split("dev")


# ---- sampling --------------------------------------------------------------------------------------

def test_sample_prompts_draws_queries_from_valid_and_demos_from_train():
    s = numbered(100).splits(0)
    prompts = sample_prompts(s, n=25, shots=5, seed=1)
    assert len(prompts) == 25
    valid = dict(s.valid)
    for p in prompts:
        assert len(p.demos) == 5 and len(set(p.demos)) == 5
        assert set(p.demos) <= set(s.train)
        assert valid[p.query] == p.answer
    # queries cycle through the whole valid split before repeating
    assert {p.query for p in prompts[:9]} == set(valid)
    assert sample_prompts(s, 25, 5, seed=1) == prompts
    assert sample_prompts(s, 25, 5, seed=2) != prompts


def test_sample_prompts_from_one_split_never_shows_the_query():
    s = numbered(20).splits(0)
    for p in sample_prompts(s, 30, shots=len(s.train) - 1, seed=0, query_split="train", demo_split="train"):
        assert (p.query, p.answer) not in p.demos


def test_too_few_examples_for_the_shots():
    s = numbered(10).splits(0)  # 7 train examples
    with pytest.raises(ValueError) as err:
        sample_prompts(s, 4, shots=8, task_name="tiny")
    assert "fewer than the 8 shots" in str(err.value) and "--shots 7" in str(err.value)  # queries come from valid
    with pytest.raises(ValueError, match="besides the query; use --shots 6"):  # the query is excluded from its demos
        sample_prompts(s, 4, shots=7, query_split="train", demo_split="train")
    assert len(sample_prompts(s, 4, shots=7)) == 4


def test_a_query_repeated_in_the_demonstration_split_is_never_its_own_demonstration():
    """A task file may hold a pair twice, or an input with two answers: the copy in train is not shown as a
    demonstration of its own query (in the valid split), whatever the answer."""
    s = TaskSplits(train=(("x0", "y0"), ("x0", "other"), ("x1", "y1"), ("x2", "y2")), test=(), valid=(("x0", "y0"),))
    for p in sample_prompts(s, 20, shots=2, seed=3):
        assert p.query == "x0" and sorted(p.demos) == [("x1", "y1"), ("x2", "y2")]
    with pytest.raises(ValueError, match="its query 'x0' leaves 2 train examples with another input, fewer than the 3"):
        sample_prompts(s, 1, shots=3)


def test_no_query_examples():
    s = TaskSplits(train=(("a", "b"),) * 3, test=(), valid=())
    with pytest.raises(ValueError, match="no valid examples"):
        sample_prompts(s, 1, shots=1)


# ---- counterfactuals -------------------------------------------------------------------------------

def test_counterfactuals_shuffle_labels_only():
    s = numbered(100).splits(0)
    prompts = sample_prompts(s, 20, shots=6, seed=0)
    shuffled = counterfactuals(prompts, seed=0)
    assert len(shuffled) == len(prompts)
    changed = 0
    for p, q in zip(prompts, shuffled):
        assert (q.query, q.answer) == (p.query, p.answer)
        assert [x for x, _ in q.demos] == [x for x, _ in p.demos]
        assert Counter(y for _, y in q.demos) == Counter(y for _, y in p.demos)
        changed += q.demos != p.demos
    assert changed >= 15  # the labels really move (6 demos stay in place with probability 1/720)
    assert counterfactuals(prompts, seed=0) == shuffled
    assert counterfactuals(prompts, seed=1) != shuffled


def test_shuffled_never_returns_the_original_labels():
    """Two shots draw the identity half the time, and [a, a, b] keeps its order in 2 of 6 permutations: a
    counterfactual equal to its prompt would patch clean activations into themselves."""
    two = ICLPrompt((("x0", "y0"), ("x1", "y1")), "q", "a")
    assert all(two.shuffled(np.random.default_rng(seed)).demos == (("x0", "y1"), ("x1", "y0")) for seed in range(50))
    repeated = ICLPrompt((("x0", "a"), ("x1", "a"), ("x2", "b")), "q", "a")
    outcomes = {repeated.shuffled(np.random.default_rng(seed)).demos for seed in range(100)}
    assert outcomes == {(("x0", "a"), ("x1", "b"), ("x2", "a")), (("x0", "b"), ("x1", "a"), ("x2", "a"))}
    same = ICLPrompt((("x0", "a"), ("x1", "a")), "q", "a")  # nothing to permute: returned as it is
    assert same.shuffled(np.random.default_rng(0)) == same


def test_shuffled_uses_the_generator():
    p = ICLPrompt(tuple((f"x{i}", f"y{i}") for i in range(8)), "q", "a")
    assert p.shuffled(np.random.default_rng(5)) == p.shuffled(np.random.default_rng(5))
    assert p.shuffled(np.random.default_rng(5)) != p.shuffled(np.random.default_rng(6))
