"""Prompts to token ids: BOS, the answer's first token in context, left padding and positions."""

import pytest
import torch

from forgetlab.fv.prompts import batches, collate, encode_prompt
from forgetlab.fv.tasks import ICLPrompt, ICLTask, PromptFormat, sample_prompts
from forgetlab.models.tokenizers import build_word_tokenizer


def prompts_of(task, n=6, shots=3, seed=0):
    return sample_prompts(task.splits(0), n, shots=shots, seed=seed)


def test_encode_prompt_bos_ids_and_target(bpe_tokenizer, upper_task):
    tok, fmt = bpe_tokenizer, PromptFormat()
    for p in prompts_of(upper_task, n=5):
        ids, target, answer_ids = encode_prompt(tok, p, fmt)
        text = fmt.text(p)
        plain = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text + " " + p.answer, add_special_tokens=False)["input_ids"]
        assert ids == [tok.bos_token_id] + plain
        assert target == full[len(plain)] and answer_ids == full[len(plain):]
        assert tok.decode(answer_ids) == " " + p.answer
        # the space belongs to the answer's first token: the answer alone starts with another token
        assert target != tok(p.answer, add_special_tokens=False)["input_ids"][0]


def test_no_bos_when_the_format_says_so(bpe_tokenizer, upper_task):
    p = prompts_of(upper_task, n=1)[0]
    ids, _, _ = encode_prompt(bpe_tokenizer, p, PromptFormat(bos=False))
    assert ids == bpe_tokenizer(PromptFormat().text(p), add_special_tokens=False)["input_ids"]
    assert bpe_tokenizer.bos_token_id not in ids


def test_a_prompt_end_the_tokenizer_merges_across_is_refused():
    tok = build_word_tokenizer(["Q", "A", ":", "c", "d", "BC"])
    fmt = PromptFormat(output_prefix="\nA", answer_sep="")  # "...\nA" + "BC" is the one word "ABC"
    with pytest.raises(ValueError, match="does not split"):
        encode_prompt(tok, ICLPrompt((), "c", "BC"), fmt)
    with pytest.raises(ValueError, match="does not split"):  # an empty answer adds no token
        encode_prompt(tok, ICLPrompt((), "c", ""), PromptFormat(answer_sep=""))
    ids, target, _ = encode_prompt(tok, ICLPrompt((), "c", "d"), PromptFormat())
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "Q", ":", "c", "\n", "A", ":"]
    assert tok.convert_ids_to_tokens([target]) == ["d"]


def test_left_padding_and_positions(bpe_tokenizer, upper_task):
    tok, fmt = bpe_tokenizer, PromptFormat()
    prompts = prompts_of(upper_task, n=6, shots=2)
    encoded = [encode_prompt(tok, p, fmt) for p in prompts]
    lengths = [len(ids) for ids, _, _ in encoded]
    assert len(set(lengths)) > 1, "the test needs prompts of different lengths"
    (batch,) = list(batches(tok, prompts, fmt, batch_size=6))
    width = max(lengths)
    assert batch.input_ids.shape == (6, width) and len(batch) == 6
    for row, (ids, target, _) in enumerate(encoded):
        n = len(ids)
        assert batch.input_ids[row, width - n:].tolist() == ids
        assert batch.input_ids[row, -1].item() == ids[-1]  # the last column is the last prompt token
        assert (batch.input_ids[row, :width - n] == tok.pad_token_id).all()
        assert batch.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
        assert batch.position_ids[row, width - n:].tolist() == list(range(n))
        assert batch.targets[row].item() == target
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask", "position_ids"}


def test_batches_are_chunked(bpe_tokenizer, upper_task):
    prompts = prompts_of(upper_task, n=5, shots=2)
    out = list(batches(bpe_tokenizer, prompts, PromptFormat(), batch_size=2))
    assert [len(b) for b in out] == [2, 2, 1]
    for b, chunk in zip(out, (prompts[0:2], prompts[2:4], prompts[4:])):
        assert b.input_ids.shape[1] == max(len(encode_prompt(bpe_tokenizer, p, PromptFormat())[0]) for p in chunk)


def test_collate_by_hand():
    b = collate([([5, 6, 7], 8), ([9], 4)], pad_id=2)
    assert b.input_ids.tolist() == [[5, 6, 7], [2, 2, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b.targets.tolist() == [8, 4]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_batch_gives_the_unpadded_logits(arch, bpe_tokenizer, upper_task, make_adapter):
    """Left padding with these positions and mask changes nothing for any row (GPT-2 has learned positions)."""
    model = make_adapter(arch, vocab=len(bpe_tokenizer)).model
    prompts = prompts_of(upper_task, n=4, shots=2)
    (batch,) = list(batches(bpe_tokenizer, prompts, PromptFormat(), batch_size=4))
    assert (batch.attention_mask == 0).any()
    with torch.no_grad():
        padded = model(**batch.model_inputs()).logits[:, -1]
        for row, p in enumerate(prompts):
            ids = torch.tensor([encode_prompt(bpe_tokenizer, p, PromptFormat())[0]])
            torch.testing.assert_close(padded[row], model(input_ids=ids).logits[0, -1], rtol=1e-4, atol=1e-5)


def test_task_without_bpe_surprises(bpe_tokenizer):
    """Tokens the BPE never merged still encode (byte fallback), so any task file can be prompted."""
    task = ICLTask.from_pairs("odd", [("zzq", "QQZ"), ("é", "É"), ("x y", "X Y")])
    p = ICLPrompt((task.pairs[0], task.pairs[1]), "x y", "X Y")
    ids, target, answer_ids = encode_prompt(bpe_tokenizer, p, PromptFormat())
    assert bpe_tokenizer.decode(ids[1:]) == PromptFormat().text(p)
    assert bpe_tokenizer.decode(answer_ids) == " X Y" and answer_ids[0] == target
