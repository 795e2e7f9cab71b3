"""The four in-context-learning prompt kinds, read against the task's splits by hand."""

from collections import Counter

from forgetlab.eval.icl import PROMPT_KINDS, icl_prompts
from forgetlab.fv.tasks import ICLTask


def test_the_four_prompt_kinds_ask_the_same_test_queries():
    """Ten-shot prompts ask test queries with train demonstrations; the instructed and bare zero-shot prompts ask
    the same queries without demonstrations (with and without the task's instruction); the shuffled prompts keep
    the demonstrations' inputs and permute their labels, so only the input-output relation is lost."""
    task = ICLTask.from_pairs("upper", [(f"w{i}", f"W{i}") for i in range(40)], "Write the word in upper case .")
    prompts = icl_prompts(task, n=12, shots=4, seed=0, split_seed=1)
    assert tuple(prompts) == PROMPT_KINDS
    splits = task.splits(1)
    few = prompts["ten_shot"]
    assert len(few) == 12 and {(p.query, p.answer) for p in few} <= set(splits.test)
    assert all(len(p.demos) == 4 and set(p.demos) <= set(splits.train) and not p.instruction for p in few)
    queries = [(p.query, p.answer) for p in few]
    for kind in PROMPT_KINDS:
        assert [(p.query, p.answer) for p in prompts[kind]] == queries, kind
    assert all(p.demos == () and p.instruction == task.instruction for p in prompts["zero_shot_instruction"])
    assert all(p.demos == () and p.instruction == "" for p in prompts["zero_shot_bare"])
    moved = 0
    for s, f in zip(prompts["shuffled_ten_shot"], few):
        assert [x for x, _ in s.demos] == [x for x, _ in f.demos]
        assert Counter(y for _, y in s.demos) == Counter(y for _, y in f.demos)
        moved += sum(y != x.upper() for x, y in s.demos)
    assert moved >= 12  # of 48 labels each stays in place with probability 1/4: about 36 move
