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
    # Asking for more than exists takes all old rows once.
    full = mix_replay(current, old, fraction=1.0, seed=1, pad_id=0)
    assert sorted(r[1] for r in full.input_ids[10:].tolist()) == list(range(6, 16)) or len(full) == 20
    assert mix_replay(current, old, 0.0, 0, 0) is current
