"""ROUGE-L and option-letter scoring against hand-worked examples."""

import pytest

from forgetlab.eval.scoring import is_multiple_choice, option_letter, rouge_l, score


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 tokens of 6 and 6: F1 = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(500 / 6)
    # LCS 2 ("the cat"), prediction 2 tokens, reference 4: P = 1, R = 0.5, F1 = 2/3
    assert rouge_l("the cat", ["the cat is here"]) == pytest.approx(200 / 3)
    assert rouge_l("completely different", ["nothing shared"]) == 0.0


def test_rouge_l_stems_and_takes_the_best_reference():
    assert rouge_l("cats running", ["cat runs"]) == pytest.approx(100.0)  # Porter stems: cat, run
    assert rouge_l("a dog", ["the cat", "a dog"]) == pytest.approx(100.0)


@pytest.mark.parametrize("text,letter", [("B", "B"), ("(C) because it rains", "C"), ("D. Paris", "D"),
                                         ("A)", "A"), ("The answer is E.", "E"), ("I think so", None),
                                         ("ANSWER: (F)", "F"), ("the answer is a dog", None), ("Option b", None),
                                         ("The answer is: B", "B"), ("A, because it is", "A"), ("**B**", "B"),
                                         ("Answer - C", "C"), ("A dog", None), ("A", "A"), ("B dog", "B")])
def test_option_letter(text, letter):
    assert option_letter(text) == letter


def test_multiple_choice_is_accuracy_on_the_letter():
    assert is_multiple_choice(["B"]) and is_multiple_choice(["(C)"]) and not is_multiple_choice(["Paris"])
    assert is_multiple_choice(["B", "(C)"]) and not is_multiple_choice(["B", "Paris"])  # every reference a letter
    assert score("Paris", ["B", "Paris"]) == 100.0  # so ROUGE-L against the best reference, not the letter
    assert score("(B) the second one", ["B"]) == 100.0
    assert score("A", ["B"]) == 0.0
    assert score("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(500 / 6)
    with pytest.raises(ValueError):
        rouge_l("x", [])


def test_a_reference_rouge_cannot_tokenize_is_exact_match():
    # rouge-score keeps [a-z0-9] only: "+" and "東京" have no tokens and would score 0 against themselves
    assert rouge_l("+", ["+"]) == 100.0 and rouge_l(" 東京 ", ["東京"]) == 100.0
    assert rouge_l("-", ["+"]) == 0.0 and rouge_l("東", ["東京"]) == 0.0
    assert rouge_l("plus", ["+", "plus"]) == 100.0  # the best reference still wins
