"""Who each phase of the biography experiment trains on and is scored on, read back from its token rows.

Every row (question, training row, biography) is decoded to the people whose full names it holds, and those
people are compared with the world's own split lists. Scoring task 0 on people it trained on would measure
memorisation instead of knowledge extraction, and no accuracy test would notice. No training: the phases'
data functions are taken from ``_phase`` before it runs them.
"""

from collections import Counter
from dataclasses import replace

import pytest
import torch

from forgetlab.experiments.biography import BiographyExperiment
from forgetlab.experiments.presets import preset_config
from forgetlab.methods import MethodConfig
from forgetlab.worlds.biography import ATTRIBUTES

N_NEW_TASKS = 3  # so task 3's old set holds two earlier new tasks besides task 0


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """The smoke preset with three new tasks (120 pretraining people, 60 per new task)."""
    cfg = preset_config("smoke")
    cfg = replace(cfg, world=replace(cfg.world, n_new_tasks=N_NEW_TASKS))
    return BiographyExperiment(cfg, tmp_path_factory.mktemp("cache"), log=lambda s: None, progress=False)


def _name_index(exp) -> dict[tuple[int, ...], int]:
    index = {}
    for p in exp.world.people:
        index[tuple(exp.tokenizer(" " + p.full_name, add_special_tokens=False)["input_ids"])] = p.id
    assert len(index) == len(exp.world.people)  # every full name tokenises to its own sequence
    return index


def people_of(exp, rows) -> list[int]:
    """The one person each token row names (a row naming none or two is an error)."""
    index = _name_index(exp)
    widths = {len(k) for k in index}
    out = []
    for row in rows:
        row = [int(t) for t in row]
        found = {index[tuple(row[i:i + w])] for w in widths for i in range(len(row) - w + 1)
                 if tuple(row[i:i + w]) in index}
        assert len(found) == 1, (found, row)
        out.append(found.pop())
    return out


def every_question_of(ids) -> Counter:
    """One question per (person, attribute): each person six times."""
    return Counter({pid: len(ATTRIBUTES) for pid in ids})


def captured_phases(exp, monkeypatch) -> list[dict]:
    """Replace ``_phase`` by a recorder of its arguments; nothing is trained."""
    calls = []

    def record(name, key, start, data, pcfg, tasks, stop=None, prepare=None, snapshots=(), penalty=None):
        calls.append({"name": name, "data": data, "tasks": tasks, "penalty": penalty})
        return object()

    monkeypatch.setattr(exp, "_phase", record)
    return calls


def test_the_splits_are_the_documented_people(exp):
    """The expectations below come from these lists, so first check them against the world's config: task-0
    train is the lowest share of the pretraining people, task-0 test the rest, new tasks fresh people."""
    w, s = exp.world.config, exp.world.splits
    n0 = int(w.n_pretrain_people * w.task0_train_fraction)
    assert s["task0_train"] == list(range(n0)) and s["task0_test"] == list(range(n0, w.n_pretrain_people))
    for k in range(1, N_NEW_TASKS + 1):
        first = w.n_pretrain_people + (k - 1) * w.n_new_people_per_task
        assert s[f"task{k}"] == list(range(first, first + w.n_new_people_per_task))


def test_task0_is_scored_on_held_out_people_and_trained_on_the_others(exp, monkeypatch):
    """Knowledge extraction: task 0 trains on the task-0 train people and every task-0 score (phase end,
    step-wise subset, biography recall) reads only the held-out task-0 test people."""
    s = exp.world.splits
    assert Counter(people_of(exp, exp.qa["task0"].prompts)) == every_question_of(s["task0_test"])
    step_wise = people_of(exp, exp.eval_sets["task0"].prompts)
    assert len(step_wise) == exp.cfg.eval.max_questions and set(step_wise) <= set(s["task0_test"])
    recall_people = people_of(exp, exp.recall_set[0])
    assert recall_people and set(recall_people) <= set(s["task0_test"])

    calls = captured_phases(exp, monkeypatch)
    exp.task0(pre=None, pre_key="k")
    (call,) = calls
    assert call["tasks"] == ["task0"]
    assert Counter(people_of(exp, call["data"]().input_ids)) == every_question_of(s["task0_train"])

    scored = []
    monkeypatch.setattr(exp, "score", lambda model, qa: scored.append(qa) or {"em": 0.0})
    exp.step_eval(call["tasks"])(None)
    assert scored == [exp.eval_sets["task0"]]


def test_question_answers_are_the_named_persons_values(exp):
    """Each question's answer is the value of the person its prompt names (a shifted pairing would teach noise)."""
    for name, qa in exp.qa.items():
        for pid, attr, answer in zip(people_of(exp, qa.prompts), qa.attributes, qa.answers, strict=True):
            value = exp.world.people[pid].value(attr)
            assert answer == exp.tokenizer(" " + value, add_special_tokens=False)["input_ids"], (name, pid, attr)


def test_recovery_trains_on_the_first_half_of_task0_training_people(exp, monkeypatch):
    """Recovery (and its control) re-align on the first half of the task-0 train people, never on the people it
    is scored on; the second half of task-0 train is not used either."""
    s = exp.world.splits
    half = s["task0_train"][: len(s["task0_train"]) // 2]
    assert len(half) == 30 and half == list(range(30))  # smoke: 60 task-0 train people, ids 0..59
    calls = captured_phases(exp, monkeypatch)
    exp.recovery(None, "k")
    exp.recovery(None, "k", name="recovery_control")
    assert [c["name"] for c in calls] == ["recovery", "recovery_control"]
    for call in calls:
        trained = people_of(exp, call["data"]().input_ids)
        assert Counter(trained) == every_question_of(half)
        assert call["tasks"] == ["task0"]
        assert not set(trained) & set(people_of(exp, exp.eval_sets["task0"].prompts))
        assert not set(trained) & set(s["task0_test"])


def test_new_task_trains_on_its_own_people(exp, monkeypatch):
    """Plain SEQ: task k's rows are task k's people only, and it is scored on task 0 and tasks 1..k."""
    s = exp.world.splits
    calls = captured_phases(exp, monkeypatch)
    for k in range(1, N_NEW_TASKS + 1):
        exp.new_task(k, None, "k")
    for k, call in enumerate(calls, start=1):
        assert Counter(people_of(exp, call["data"]().input_ids)) == every_question_of(s[f"task{k}"])
        assert call["tasks"] == ["task0"] + [f"task{j}" for j in range(1, k + 1)]
        assert call["penalty"] is None


def _old_people(s, k) -> list[int]:
    """The rows replay and EWC may draw on before task k: task-0 training people and new tasks 1..k-1."""
    return s["task0_train"] + [p for j in range(1, k) for p in s[f"task{j}"]]


def test_replay_draws_on_task0_training_people_and_earlier_new_tasks(exp, monkeypatch):
    """Replay's old set before task k is every question of the task-0 train people and of tasks 1..k-1: never the
    held-out task-0 people (that would leak the extraction test into training) and never task k itself."""
    import forgetlab.experiments.biography as biography

    s = exp.world.splits
    monkeypatch.setattr(exp, "cfg", replace(exp.cfg, method=MethodConfig(replay=0.5)))
    calls = captured_phases(exp, monkeypatch)
    seen = []
    real = biography.mix_replay

    def spy(current, old, fraction, seed, pad_id):
        seen.append((current, old))
        return real(current, old, fraction, seed, pad_id)

    monkeypatch.setattr(biography, "mix_replay", spy)
    for k in range(1, N_NEW_TASKS + 1):
        exp.new_task(k, None, "k")
        mixed = people_of(exp, calls[-1]["data"]().input_ids)
        current, old = seen[-1]
        assert Counter(people_of(exp, current.input_ids)) == every_question_of(s[f"task{k}"])
        assert Counter(people_of(exp, old.input_ids)) == every_question_of(_old_people(s, k))
        n_task = len(s[f"task{k}"]) * len(ATTRIBUTES)
        assert len(mixed) == n_task + round(0.5 * n_task)  # the task's rows plus half as many old ones
        assert Counter(mixed[:n_task]) == every_question_of(s[f"task{k}"])
        assert set(mixed[n_task:]) <= set(_old_people(s, k))


def test_ewc_fisher_is_taken_on_task0_training_people_and_earlier_new_tasks(exp, monkeypatch):
    """With enough batches to cover them all, the Fisher's batches hold each old row exactly once: every question
    of the task-0 train people and of tasks 1..k-1, none of the held-out task-0 people or of task k."""
    import forgetlab.experiments.biography as biography

    s = exp.world.splits
    size = exp.cfg.task.batch_size
    method = MethodConfig(name="ewc", ewc_strength=1.0, ewc_batches=-(-len(_old_people(s, N_NEW_TASKS)) * 6 // size))
    monkeypatch.setattr(exp, "cfg", replace(exp.cfg, method=method))
    calls = captured_phases(exp, monkeypatch)
    seen = []
    monkeypatch.setattr(biography, "diagonal_fisher", lambda model, batches: seen.append(batches) or {})
    for k in range(1, N_NEW_TASKS + 1):
        exp.new_task(k, None, "k")
        assert Counter(people_of(exp, calls[-1]["data"]().input_ids)) == every_question_of(s[f"task{k}"])
        calls[-1]["penalty"](torch.nn.Linear(1, 1))
        rows = [row for batch in seen[-1] for row in batch["input_ids"]]
        assert Counter(people_of(exp, rows)) == every_question_of(_old_people(s, k))
