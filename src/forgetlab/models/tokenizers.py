"""Word-level tokenizers for synthetic worlds.

Synthetic worlds have a closed vocabulary, so one token per word keeps sequences short (fast on a
CPU) and makes every name part and attribute value a token of its own, as in the small-scale
reproductions of the spurious-forgetting paper. Newlines are tokens because QA prompts use them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}

# Words, single punctuation marks and newlines are tokens; other whitespace separates them.
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


def split_words(text: str) -> list[str]:
    """The pieces the tokenizer will see, e.g. to collect a world's vocabulary."""
    return [piece for piece, _ in pre_tokenizers.Split(_PIECE, behavior="removed", invert=True).pre_tokenize_str(text)]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it back with eos and pad set."""
    tokenizer.save_pretrained(str(out_dir))
