"""Scores of generated answers as the FV paper reports them (papers.md §2), ×100.

Free text: ROUGE-L F1 with Porter stemming (``rouge-score``), the maximum over the references; its tokenizer is
widened to the letters of every script (rouge-score's own keeps [a-z0-9] and would score "Москва" against "Киев" 100).
Multiple choice (every reference is an option letter): the option letter is extracted from the
generation first, so the score is accuracy (100 or 0) rather than a string overlap.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

# a score (×100) from which a task counts as already done before any training: tasks a model already does measure
# keeping, not learning (continual tuning, and the ICL world's new tasks on a given build)
ALREADY_DONE = 90.0
OPTION_LETTERS = "ABCDEFGH"
# a leading letter alone or followed by punctuation or a space ("B", "(B)", "B.", "A, because"), but not the article
# "A" before a lower-case word ("A dog"), unless the word is a verb the article never precedes ("A is correct"), and
# not a letter the answer rules out ("B isn't right", "(C) is not it": none; "D, not E" still picks D)
_NEGATED = r"\)?\s+(?:(?:is|was|seems|does)\s+not|isn't|wasn't|doesn't|can't|cannot)(?![\w'-])"
_LETTER = re.compile(rf"^(?!A\s+(?!(?:is|was|would|seems|fits)(?![\w'-]))[a-z])\(?([A-H])(?!{_NEGATED})\)?(?:[\s.:),;]|$)")
# a lower-case letter only where it cannot be a word: in parentheses, alone, or alone but for "." or ")"
# ("b", "(b) yes", "b)"; not "e.g. this" nor "a dog")
_SMALL_LETTER = re.compile(r"^(?:\(([a-h])\)|([a-h])[.)]?$)")
# "Answer"/"option" in any case, then a capital letter, or a lower-case one in parentheses or ending the answer:
# "answer: c" and "Option b" name an option, "the answer is a dog" does not
_STATED = re.compile(r"(?i:answer|option)\s*(?i:is)?\s*[:\-]?\s*(?:\(?([A-H])\)?\b|\(([a-h])\)|([a-h])(?=[.)]?$))")
# rouge-score's tokenizer widened to every script: runs of letters and digits, except that Chinese characters and
# Japanese kana (written without spaces) are a token each; on ASCII text it gives rouge-score's own tokens
_NO_SPACES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_NO_SPACES}]|[^\W_{_NO_SPACES}]+")


class UnicodeTokenizer:
    """For ``rouge_scorer.RougeScorer(tokenizer=...)``: lower-cased word tokens of any script, the English ones
    Porter-stemmed from 4 characters as rouge-score does, so that English scores stay the paper's."""

    def __init__(self) -> None:
        from nltk.stem import porter  # the stemmer rouge-score uses

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = _TOKEN.findall(unicodedata.normalize("NFC", text.lower()))
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max ROUGE-L F1 (stemmed) over the references, ×100.

    A reference without letters or digits ("+", "—") has no tokens and would score 0 against any prediction, itself
    included: such a reference is scored by exact match of the stripped strings instead.
    """
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure if _has_rouge_tokens(ref)
                       else float(prediction.strip() == ref.strip()) for ref in references)


def _has_rouge_tokens(text: str) -> bool:
    return bool(_TOKEN.search(text))


def option_letter(text: str) -> str | None:
    """The option a generation picks: a leading ``B``, ``(B)``, ``B.``/``B)``/``B,``, ``**B**``, or "answer is B",
    "Answer: B", "answer - B"; in lower case where it cannot be a word ("b", "(b)", "answer: c")."""
    text = text.strip().strip("*").strip()
    match = _LETTER.match(text) or _SMALL_LETTER.match(text) or _STATED.search(text)
    return next(letter for letter in match.groups() if letter).upper() if match else None


def is_multiple_choice(references: Sequence[str]) -> bool:
    """Every reference an option letter, a capital (a reference "b" is the letter b, as a spelling task's answer)."""
    return bool(references) and all(r.strip().strip("()") in set(OPTION_LETTERS) for r in references)


def score(prediction: str, references: Sequence[str]) -> float:
    """Accuracy on the extracted option letter for multiple choice, else ROUGE-L; both ×100."""
    if is_multiple_choice(references):
        return 100.0 * (option_letter(prediction) in {option_letter(r) for r in references})
    return rouge_l(prediction, references)
