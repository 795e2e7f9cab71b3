"""Scores of generated answers as the FV paper reports them (papers.md §2), ×100.

Free text: ROUGE-L F1 with Porter stemming (``rouge-score``), the maximum over the references.
Multiple choice (every reference is an option letter): the option letter is extracted from the
generation first, so the score is accuracy (100 or 0) rather than a string overlap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# a score (×100) from which a task counts as already done before any training: tasks a model already does measure
# keeping, not learning (continual tuning, and the ICL world's new tasks on a given build)
ALREADY_DONE = 90.0
OPTION_LETTERS = "ABCDEFGH"
# a leading letter alone or followed by punctuation or a space ("B", "(B)", "B.", "A, because"), but not the article
# "A" before a lower-case word ("A dog")
_LETTER = re.compile(r"^(?!A\s+[a-z])\(?([A-H])\)?(?:[\s.:),;]|$)")
# "Answer"/"option" in any case, the letter itself a capital: "the answer is a dog" names no option
_STATED = re.compile(r"(?i:answer|option)\s*(?i:is)?\s*[:\-]?\s*\(?([A-H])\)?\b")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max ROUGE-L F1 (stemmed) over the references, ×100.

    rouge-score's tokenizer keeps only lower-case Latin letters and digits, so a reference made of other
    characters ("+", "東京") has no tokens and would score 0 against any prediction, itself included: such a
    reference is scored by exact match of the stripped strings instead.
    """
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure if _has_rouge_tokens(ref)
                       else float(prediction.strip() == ref.strip()) for ref in references)


def _has_rouge_tokens(text: str) -> bool:
    from rouge_score import tokenize

    return bool(tokenize.tokenize(text, None))


def option_letter(text: str) -> str | None:
    """The option a generation picks: a leading ``B``, ``(B)``, ``B.``/``B)``/``B,``, ``**B**``, or "answer is B",
    "Answer: B", "answer - B"."""
    text = text.strip().strip("*").strip()
    match = _LETTER.match(text) or _STATED.search(text)
    return match.group(1).upper() if match else None


def is_multiple_choice(references: Sequence[str]) -> bool:
    return bool(references) and all(option_letter(r) is not None and len(r.strip().strip("()")) == 1 for r in references)


def score(prediction: str, references: Sequence[str]) -> float:
    """Accuracy on the extracted option letter for multiple choice, else ROUGE-L; both ×100."""
    if is_multiple_choice(references):
        return 100.0 * (option_letter(prediction) in {option_letter(r) for r in references})
    return rouge_l(prediction, references)
