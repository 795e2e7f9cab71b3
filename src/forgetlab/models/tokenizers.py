"""Word-level tokenizers for synthetic worlds.

Synthetic worlds have a closed vocabulary, so one token per word keeps sequences short (fast on a
CPU) and makes every name part and attribute value a token of its own, as in the small-scale
reproductions of the spurious-forgetting paper. Newlines are tokens because QA prompts use them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}

# Words, single punctuation marks and newlines are tokens; other whitespace separates them
# (the rule of forgetlab.worlds.biography.split_words, plus newline).
_PIECE = Regex(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]|\n")


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is the special tokens, newline and the given words (sorted)."""
    vocab: dict[str, int] = {}
    for tok in list(SPECIAL_TOKENS.values()) + ["\n"] + sorted(set(words) - {"\n"}):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(_PIECE, behavior="removed", invert=True)
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``: subword behaviour like GPT-2/Llama, no download.

    Used where in-context prompts need real subword effects (an answer's first token depends on the
    preceding space), e.g. function-vector prompts built from arbitrary word lists.
    """
    from tokenizers import decoders, trainers

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def pad_id(tokenizer) -> int:
    """The padding id, falling back to eos for tokenizers saved without a pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def split_in_context(tokenizer, text: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of ``text`` and of ``continuation`` as the tokenizer splits ``text + continuation`` together.

    A BPE tokenizer may merge across the boundary; then there is no clean split and this raises.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text + continuation, add_special_tokens=False)["input_ids"]
    if full[:len(ids)] != ids or len(full) == len(ids):
        raise ValueError(f"the tokenizer does not split {text[-40:]!r} + {continuation!r} at the end of the first part; "
                         "make the prompt end where tokens end (e.g. the answer starts with a space)")
    return ids, full[len(ids):]


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (Llama's BOS; nothing for GPT-2 or forgetlab's word
    tokenizers, whose worlds train without one): what a model trained through this tokenizer has seen."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []
