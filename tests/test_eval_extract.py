"""Answer extraction and text metrics on tricky replies: case, punctuation, markdown, several candidates, numbers with
separators and units."""

from __future__ import annotations

import pytest
from pock_eval.extract import extract_answer, is_correct
from pock_eval.text_metrics import exact_match, normalize_text, rouge_l, token_f1

ARC = ["answer1", "answer2", "answer3", "answer4"]
PIQA = ["solution1", "solution2"]

CHOICE_CASES = [
    ("the correct answer is answer2", ARC, "answer2"),
    ("The correct answer is Answer 3.", ARC, "answer3"),
    ("**Answer:** answer4", ARC, "answer4"),
    ('The answer is "answer1"!', ARC, "answer1"),
    ("Answer #2: Most ecosystems are found on land.", ARC, "answer2"),
    ("answer1 looks tempting, but the correct answer is answer3", ARC, "answer3"),  # the stated answer wins
    ("I think the answer is answer1. No wait, the answer is answer4.", ARC, "answer4"),  # the last statement wins
    ("answer1/answer2/answer3/answer4", ARC, None),  # echoing the format line names every option: no answer
    ("Either answer1 or answer2.", ARC, None),
    ("Answer4: The producers in all ecosystems are plants.", ARC, "answer4"),
    ("answer10 is not an option", ARC, None),  # whole words only: answer10 is not answer1
    ("I don't know.", ARC, None),
    ("", ARC, None),
    ("SOLUTION2, because paper is absorbent", PIQA, "solution2"),
    ("the correct answer is true", ["true", "false"], "true"),
    ("False. It is not true that ...", ["true", "false"], None),  # two options named, none stated
    ("B. carbon dioxide, a gas", list("ABCD"), "B"),  # lettered options: the article "a" is not option A
    ("the answer is c", list("ABCD"), "C"),  # a stated letter in any case
]


@pytest.mark.parametrize(("reply", "choices", "expected"), CHOICE_CASES)
def test_extract_choice(reply, choices, expected):
    assert extract_answer(reply, "choice", choices) == expected


YES_NO_CASES = [
    ("the correct answer is false", "no"),
    ("True.", "yes"),
    ("Yes, it is.", "yes"),
    ("**No** - they are different.", "no"),
    ("No, there is no evidence.", "no"),
    ("There is no evidence that it is true.", "yes"),  # mid-sentence no is not read; the only true/false is
    ("Ethanol does not take more energy. The answer: TRUE", "yes"),
    ("It could be true or false.", None),
    ("Maybe.", None),
]


@pytest.mark.parametrize(("reply", "expected"), YES_NO_CASES)
def test_extract_yes_no(reply, expected):
    assert extract_answer(reply, "yes_no") == expected


NUMBER_CASES = [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 1,234 dollars.", "1234"),
    ("The total is $1,234.50.", "1234.5"),
    ("It takes 3 bolts. So the answer is: 3 bolts", "3"),
    ("First 12 km, then 40% of it, so 4.8 km", "4.8"),
    ("The difference is 3-2 = 1", "1"),  # "-2" is not a negative number here
    ("The temperature fell to -5 degrees.", "-5"),
    ("Each gets 3/4 of a pizza.", "0.75"),
    ("The answer is 8.0", "8"),
    ("Numbers 1, 2, 3, 500", "500"),  # comma + space separates numbers; thousands groups have no space
    ("no number here", None),
]


@pytest.mark.parametrize(("reply", "expected"), NUMBER_CASES)
def test_extract_number(reply, expected):
    assert extract_answer(reply, "number") == expected


def test_is_correct_per_answer_type():
    assert is_correct("18", "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "number")  # GSM8K gold: the number after ####
    assert is_correct("8", "8.0", "number")
    assert is_correct("8.00005", "8.0", "number", tolerance=1e-4)
    assert not is_correct("8.01", "8.0", "number", tolerance=1e-4)
    assert is_correct("no", "false", "yes_no") and is_correct("yes", "true", "yes_no")
    assert is_correct("answer2", "Answer2", "choice")
    assert not is_correct(None, "answer2", "choice")  # no answer extracted counts as wrong
    assert is_correct("The Eiffel tower!", "eiffel Tower", "text")


def test_text_metrics():
    assert normalize_text("The  Cat, sat!") == "cat sat"
    assert token_f1("the cat sat on the mat", "a cat sat on a mat") == 1.0  # articles and punctuation do not count
    assert token_f1("cat sat", "cat sat on mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("cat", "") == 0.0
    assert exact_match("Paris.", "paris") == 1.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("cats sitting", "the cat sat on the mat") == pytest.approx(2 * (1 / 2) * (1 / 6) / (1 / 2 + 1 / 6))
    assert rouge_l("dog", "the cat") == 0.0
