"""Prompts of instruction tasks: a template with ``{definition}`` and ``{input}``, and prompts fitted to a token
budget by cutting what varies (the middle of an input, then of a definition), never the template itself."""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

WORLD_TEMPLATE = "{definition}\nQ: {input}\nA:"
# the FV paper's natural-instructions prompt as its data collator writes it (papers.md gives it on one line)
NI_TEMPLATE = "Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput:"


def sentence(field_text: str) -> str:
    """Stripped, and ended with "." unless it ends in punctuation (or is empty), as the FV paper's collator writes."""
    field_text = field_text.strip()
    return field_text if not field_text or field_text[-1] in string.punctuation else field_text + "."


@dataclass(frozen=True)
class PromptTemplate:
    """A task prompt: ``text`` with ``{definition}`` and ``{input}``; ``punctuate`` ends each field that has no final
    punctuation with ".", as the FV paper's collator does for natural-instructions tasks."""

    text: str
    punctuate: bool = False

    def render(self, definition: str, text: str) -> str:
        if self.punctuate:
            definition, text = (sentence(definition), sentence(text))
        return self.text.format(definition=definition, input=text)

    def check(self, where: str) -> None:
        """One line for a template that cannot render a task's rows (an unknown field, a stray brace, no input)."""
        if "{input}" not in self.text:
            raise ValueError(f"{where}: template {self.text!r} has no {{input}}, so every row would ask the same thing")
        try:
            self.render("d", "x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{where}: template {self.text!r} does not render ({type(err).__name__}: {err}); it may "
                             "name only {definition} and {input}, and a literal brace is written {{ or }}") from None


ELISION = " … "  # stands where the middle of a cut text was


def middle_cut(tokenizer, text: str, keep: int) -> str:
    """``text`` with its middle left out so that ``keep`` of its tokens remain, half from its start and half from its
    end: a passage's question (reading comprehension) and an article's lead both stay, and texts that share a long
    opening stay apart. Whole when it has no more tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if keep >= len(ids):
        return text
    tail = keep // 2
    head = tokenizer.decode(ids[:keep - tail]).rstrip()
    return head + ELISION + tokenizer.decode(ids[len(ids) - tail:]).lstrip() if tail else head


class PromptFitter:
    """Prompts of at most ``max_tokens`` (with the tokenizer's own prefix, e.g. BOS), made to fit by cutting what
    varies — the middle of an instance's input, then of the definition; an in-context prompt's demonstrations first —
    never the template: its head and its answer cue ("Output:") stay, as cutting the prompt's start or end would lose
    one."""

    def __init__(self, tokenizer, max_tokens: int):
        from forgetlab.models.tokenizers import special_prefix

        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.prefix = len(special_prefix(tokenizer))

    def fits(self, prompt: str) -> bool:
        return self.prefix + len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= self.max_tokens

    def shorten(self, text: str, render: Callable[[str], str]) -> str | None:
        """``text`` keeping the most of its tokens (:func:`middle_cut`) with which ``render`` fits; None if not even
        the empty text does."""
        if self.fits(render(text)):
            return text
        if not self.fits(render("")):
            return None
        low, high = 0, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # keep low fits, high + 1 not
        while low < high:
            mid = (low + high + 1) // 2
            if self.fits(render(middle_cut(self.tokenizer, text, mid))):
                low = mid
            else:
                high = mid - 1
        return middle_cut(self.tokenizer, text, low) if low else ""

    def prompt(self, template: PromptTemplate, definition: str, text: str, where: str) -> str:
        cut = self.shorten(text, lambda t: template.render(definition, t))
        if cut is None:  # not even without its input: the definition is cut too
            definition, cut = self.shorten(definition, lambda d: template.render(d, "")), ""
            if definition is None:
                raise ValueError(f"{where}: the template alone takes more than max_source_tokens={self.max_tokens} "
                                 "tokens; raise max_source_tokens or shorten the template")
        return template.render(definition, cut)
