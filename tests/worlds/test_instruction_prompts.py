"""Instruction-task prompt templates (the fitting to a token budget is checked on whole rows in test_cit.py)."""

import pytest

from forgetlab.worlds.instruction_prompts import NI_TEMPLATE, PromptTemplate


def test_the_paper_template_ends_unpunctuated_fields_with_a_period_and_a_bad_template_is_refused():
    paper = PromptTemplate(NI_TEMPLATE, punctuate=True)
    assert paper.render(" Say it ", "a review!") == ("Definition: Say it.\n\nNow complete the following example -\n"
                                                      "Input: a review!\nOutput:")
    assert PromptTemplate("{definition}|{input}").render("Say it", "x ") == "Say it|x "  # a user's template: as written
    with pytest.raises(ValueError, match="has no {input}"):
        PromptTemplate("{definition} Output:").check("--set template")
    with pytest.raises(ValueError, match="does not render .KeyError: 'defintion'"):
        PromptTemplate("{defintion} {input}").check("--set template")
    with pytest.raises(ValueError, match="does not render"):
        PromptTemplate("{input} {").check("--set template")
