import pytest
import torch

from forgetlab.train.data import IGNORE, concat, pack_texts, qa_dataset


def test_packing_joins_with_eos_and_wastes_no_padding():
    ds = pack_texts([[5, 6], [7], [8, 9, 10]], eos_id=1, block_size=3)
    # stream 5 6 1 7 1 8 9 10 1 -> three blocks of 3
    assert ds.input_ids.tolist() == [[5, 6, 1], [7, 1, 8], [9, 10, 1]]
    assert torch.equal(ds.labels, ds.input_ids) and bool(ds.attention_mask.all())
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts([[5]], eos_id=1, block_size=8)


def test_qa_loss_only_on_answer_and_eos():
    ds = qa_dataset([[10, 11, 12], [13]], [[20], [21, 22]], eos_id=1, pad_id=0)
    assert ds.input_ids.tolist() == [[10, 11, 12, 20, 1], [13, 21, 22, 1, 0]]
    assert ds.labels.tolist() == [[IGNORE, IGNORE, IGNORE, 20, 1], [IGNORE, 21, 22, 1, IGNORE]]
    assert ds.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    b = ds.batch(torch.tensor([1]))
    assert b["input_ids"].tolist() == [[13, 21, 22, 1]]  # trimmed to the widest row of the batch
    assert "attention_mask" not in b  # no padding left: the causal fast path
    assert ds.batch(torch.tensor([0, 1]))["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_qa_rows_without_eos_keep_the_answers_own_end():
    ds = qa_dataset([[10, 11], [13]], [[20, 9], [21, 22, 9]], eos_id=None, pad_id=0)
    assert ds.input_ids.tolist() == [[10, 11, 20, 9], [13, 21, 22, 9]]
    assert ds.labels.tolist() == [[IGNORE, IGNORE, 20, 9], [IGNORE, 21, 22, 9]]


def test_concat_pads_to_common_width():
    a = qa_dataset([[3]], [[4]], 1, 0)
    b = qa_dataset([[3, 3, 3]], [[4]], 1, 0)
    c = concat([a, b], pad_id=0)
    assert c.input_ids.tolist() == [[3, 4, 1, 0, 0], [3, 3, 3, 4, 1]]
    assert c.labels[0, 3:].tolist() == [IGNORE, IGNORE]


def test_subset_and_concat_keep_each_rows_labels_and_mask():
    """Replay mixes ``subset(old)`` into the new task with ``concat``: a replayed QA row keeps its loss on answer and
    eos only (not on its prompt or padding), and padding added to reach the common width is masked out."""
    from forgetlab.train.data import subset

    old = qa_dataset([[10, 11, 12], [13], [14, 15]], [[20], [21, 22], [23]], eos_id=1, pad_id=0)
    picked = subset(old, torch.tensor([2, 0]))
    assert picked.input_ids.tolist() == [[14, 15, 23, 1, 0], [10, 11, 12, 20, 1]]
    assert picked.labels.tolist() == [[IGNORE, IGNORE, 23, 1, IGNORE], [IGNORE, IGNORE, IGNORE, 20, 1]]
    assert picked.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    mixed = concat([qa_dataset([[3]], [[4]], 1, 0), picked], pad_id=0)
    assert mixed.input_ids.tolist() == [[3, 4, 1, 0, 0], [14, 15, 23, 1, 0], [10, 11, 12, 20, 1]]
    assert mixed.labels.tolist() == [[IGNORE, 4, 1, IGNORE, IGNORE], [IGNORE, IGNORE, 23, 1, IGNORE],
                                     [IGNORE, IGNORE, IGNORE, 20, 1]]
    assert mixed.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert mixed.batch(torch.tensor([0]))["input_ids"].tolist() == [[3, 4, 1]]  # the mask trims a batch's padding
