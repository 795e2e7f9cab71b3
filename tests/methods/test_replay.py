import torch

from forgetlab.methods import mix_replay
from forgetlab.train.data import qa_dataset


def test_replay_samples_old_rows_without_replacement():
    current = qa_dataset([[3]] * 10, [[4]] * 10, eos_id=1, pad_id=0)
    old = qa_dataset([[5, i] for i in range(6, 26)], [[7]] * 20, eos_id=1, pad_id=0)
    mixed = mix_replay(current, old, fraction=0.5, seed=0, pad_id=0)
    assert len(mixed) == 15
    replayed = [row[1] for row in mixed.input_ids[10:].tolist()]
    assert len(set(replayed)) == 5 and all(6 <= r < 26 for r in replayed)
    again = mix_replay(current, old, fraction=0.5, seed=0, pad_id=0)
    assert torch.equal(mixed.input_ids, again.input_ids)
    # As many old rows as new ones: each old row exactly once, in some order (with replacement, repeats).
    few_old = qa_dataset([[5, i] for i in range(6, 16)], [[7]] * 10, eos_id=1, pad_id=0)
    full = mix_replay(current, few_old, fraction=1.0, seed=1, pad_id=0)
    assert sorted(r[1] for r in full.input_ids[10:].tolist()) == list(range(6, 16))
    # Asking for more than exists takes all old rows once.
    assert sorted(r[1] for r in mix_replay(current, few_old, 3.0, 0, 0).input_ids[10:].tolist()) == list(range(6, 16))
    assert mix_replay(current, old, 0.0, 0, 0) is current


def test_replay_count_rounds_to_the_nearest_row():
    current = qa_dataset([[3]] * 10, [[4]] * 10, eos_id=1, pad_id=0)
    old = qa_dataset([[5, i] for i in range(6, 26)], [[7]] * 20, eos_id=1, pad_id=0)
    assert len(mix_replay(current, old, fraction=0.36, seed=0, pad_id=0)) == 10 + 4  # 3.6 rows -> 4
    assert len(mix_replay(current, old, fraction=0.34, seed=0, pad_id=0)) == 10 + 3


def test_replay_draws_every_old_row_equally_often():
    """A fair draw of 5 of 20 rows picks each row in a quarter of the seeds; taking the first rows (or any fixed
    or skewed pick) puts some rows far outside 5 binomial standard deviations of that."""
    current = qa_dataset([[3]] * 10, [[4]] * 10, eos_id=1, pad_id=0)
    old = qa_dataset([[5, i] for i in range(20)], [[7]] * 20, eos_id=1, pad_id=0)
    seeds, n, p = 400, 5, 5 / 20
    counts = torch.zeros(20)
    picks = []
    for seed in range(seeds):
        rows = [r[1] for r in mix_replay(current, old, fraction=0.5, seed=seed, pad_id=0).input_ids[10:].tolist()]
        assert len(set(rows)) == n
        counts[rows] += 1
        picks.append(frozenset(rows))
    mean, sd = seeds * p, (seeds * p * (1 - p)) ** 0.5                  # 100 and 8.66
    assert counts.sum() == seeds * n
    assert ((counts - mean).abs() <= 5 * sd).all(), counts.tolist()
    assert picks[0] != picks[1] and len(set(picks)) > seeds // 2      # seeds give different sets
