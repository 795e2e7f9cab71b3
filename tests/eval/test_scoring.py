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
                                         ("ANSWER: (F)", "F"), ("the answer is a dog", None), ("Option b", "B"),
                                         ("The answer is: B", "B"), ("A, because it is", "A"), ("**B**", "B"),
                                         ("Answer - C", "C"), ("A dog", None), ("A", "A"), ("B dog", "B"),
                                         ("b", "B"), ("(b)", "B"), ("(b) Paris", "B"), ("c.", "C"), ("answer: c", "C"),
                                         ("the answer is (d)", "D"), ("e.g. this", None), ("a dog", None),
                                         ("option b is wrong", None), ("apple", None), ("A is correct", "A"),
                                         ("A would be my pick", "A"), ("A island", None), ("A isotope", None),
                                         ("A would-be thief", None), ("A isn't right", None),
                                         ("B isn't right", None), ("(C) is not it", None), ("D, not E", "D"),
                                         ("B is not right, the answer is C", "C"), ("B can't be right", None),
                                         ("B nothing else", "B"), ("B. Not a doubt", "B")])
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


def test_a_reference_without_letters_or_digits_is_exact_match():
    # "+" has no tokens and would score 0 against itself
    assert rouge_l("+", ["+"]) == 100.0 and rouge_l(" — ", ["—"]) == 100.0 and rouge_l("-", ["+"]) == 0.0
    assert rouge_l("plus", ["+", "plus"]) == 100.0  # the best reference still wins


def test_rouge_l_reads_every_script_by_hand():
    """rouge-score's own tokenizer drops everything outside [a-z0-9]: "大阪 Tower" would equal "東京 Tower" (100)
    and "caf" would equal "café"."""
    # 大 阪 tower / 東 京 tower: LCS 1 (tower) of 3 and 3 tokens: F1 = 1/3
    assert rouge_l("大阪 Tower", ["東京 Tower"]) == pytest.approx(100 / 3)
    assert rouge_l("東", ["東京"]) == pytest.approx(200 / 3)  # P = 1, R = 1/2
    assert rouge_l(" 東京。", ["東京"]) == 100.0 and rouge_l("Москва.", ["Москва"]) == 100.0
    assert rouge_l("caf", ["café"]) == 0.0 and rouge_l("Zürich", ["zürich"]) == 100.0
    assert rouge_l("Москва", ["Москва река"]) == pytest.approx(200 / 3)
    assert rouge_l("cafe\u0301", ["café"]) == 100.0  # a combining accent is the precomposed letter


def test_on_ascii_text_the_tokens_are_rouge_scores_own():
    """English scores stay those of the paper's scorer: on ASCII the widened tokenizer is rouge-score's."""
    import random

    from nltk.stem import porter
    from rouge_score import tokenize

    from forgetlab.eval.scoring import UnicodeTokenizer

    rng, ours, stemmer = random.Random(0), UnicodeTokenizer(), porter.PorterStemmer()
    alphabet = "abcXYZ019 _-.,'\n\t!?running cats"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert ours.tokenize(text) == tokenize.tokenize(text, stemmer), text
