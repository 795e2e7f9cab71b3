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
