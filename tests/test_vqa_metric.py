"""VQAv2 accuracy: normalisation rules and the leave-one-annotator-out average."""
from __future__ import annotations

import importlib.util
import os
from fractions import Fraction

import pytest

from lever_plugins.metrics.vqa import normalize_vqa_answer, vqa_accuracy


def _loo_accuracy(num_answers: int, matches: int) -> float:
    """Independent formula: average over annotators left out of min(1, remaining matches / 3)."""
    total = Fraction(0)
    for left_out in range(num_answers):
        remaining = matches - (1 if left_out < matches else 0)
        total += min(Fraction(1), Fraction(remaining, 3))
    return float(total / num_answers)


@pytest.mark.parametrize(
    "matches, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_values_for_ten_annotators(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert _loo_accuracy(10, matches) == pytest.approx(expected)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_number_word_prediction_matches_digit_answers():
    answers = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "many"]
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("4", answers) == pytest.approx(0.6)
    assert vqa_accuracy("five", answers) == 0.0


def test_five_answer_lists_use_the_same_rule():
    # OK-VQA style: 5 answers, 2 match -> (2 * 1/3 + 3 * 2/3) / 5
    assert vqa_accuracy("dog", ["dog", "dog", "cat", "pet", "animal"]) == pytest.approx(_loo_accuracy(5, 2))
    assert _loo_accuracy(5, 2) == pytest.approx(8 / 15)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("a", ""),
        ("  yes\n", "yes"),
        ("none", "0"),
        ("Zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("dont know", "don't know"),
        ("isnt it", "isn't it"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("e.g", "eg"),
        ("black-and-white", "black and white"),  # no space next to "-": replaced by a space
        ("black - white", "black white"),  # "-" touches a space: deleted
        ("1,000", "1000"),  # digit,digit anywhere: punctuation deleted
        ("red,blue", "red blue"),
        ("yes!", "yes"),  # "!" at the end does not touch a space -> space, then stripped by split
        ("t-shirt?", "t shirt"),
        ("hot dog (food)", "hot dog food"),  # "(" touches a space -> deleted everywhere
    ],
)
def test_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_full_gold_normalisation_is_opt_in():
    answers = ["The Dog"] * 3 + ["cat"] * 7
    assert vqa_accuracy("dog", answers, official_gold_processing=False) == pytest.approx(0.9)
    # Officially gold answers only get the punctuation step: "The Dog" never equals "dog".
    assert vqa_accuracy("dog", answers) == 0.0


def test_official_gold_processing_skips_punctuation_when_answers_agree():
    assert vqa_accuracy("yes", ["yes"] * 10, official_gold_processing=True) == 1.0
    # The prediction becomes "t shirt"; gold answers get the punctuation step only when they differ.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["no"], official_gold_processing=True) == 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10, official_gold_processing=True) == 0.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10, official_gold_processing=False) == 1.0


def test_single_answer_scores_zero_as_in_the_official_formula():
    assert vqa_accuracy("yes", ["yes"]) == 0.0


@pytest.mark.parametrize("bad", [[], "yes"])
def test_rejects_bad_answer_lists(bad):
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("yes", bad)


def _official_vqa_eval():
    """The VQAEval class of an installed LAVIS, loaded from its file (no `import lavis`: 5-7 s)."""
    spec = importlib.util.find_spec("lavis")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("salesforce-lavis not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "common", "vqa_tools", "vqa_eval.py")
    if not os.path.isfile(path):
        pytest.skip("LAVIS vqa_eval.py not found")
    module_spec = importlib.util.spec_from_file_location("_official_vqa_eval", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.VQAEval()


TRICKY = [
    "Two dogs.", "1,000 people", "red,blue", "black-and-white", "black - white", "t-shirt?",
    "hot dog (food)", "3.5.", "e.g.", "dont know", "Im here", "yall'll", "somebody'd", "a/b",
    "50%", "\"quoted\"", "x_y", "<tag>", "a.b.c", "wont", "NONE", "the the the", "It's", "o'clock",
    "left; right", "@home", "back`tick", "1.5,2", "." * 40, "!?", "",
]  # fmt: skip


@pytest.mark.parametrize("text", TRICKY)
def test_normalisation_matches_the_official_lavis_code(text):
    official = _official_vqa_eval()
    expected = official.processDigitArticle(official.processPunctuation(text.strip()))
    assert normalize_vqa_answer(text) == expected


def test_accuracy_matches_the_official_lavis_procedure():
    official = _official_vqa_eval()
    cases = [
        ("two", ["2"] * 3 + ["3"] * 7),
        ("yes", ["yes!"] * 2 + ["yes"] * 2 + ["no"] * 6),
        ("1000", ["1,000", "1000", "1,000", "one thousand"] + ["many"] * 6),
        ("t shirt", ["t-shirt"] * 5 + ["shirt"] * 5),
    ]
    for prediction, answers in cases:
        pred = official.processDigitArticle(official.processPunctuation(prediction))
        gold = [official.processPunctuation(a) for a in answers] if len(set(answers)) > 1 else answers
        per_annotator = []
        for i in range(len(gold)):
            others = gold[:i] + gold[i + 1 :]
            per_annotator.append(min(1.0, sum(o == pred for o in others) / 3))
        expected = sum(per_annotator) / len(per_annotator)
        assert vqa_accuracy(prediction, answers, official_gold_processing=True) == pytest.approx(expected)


def test_default_is_the_official_lavis_metric_for_unnormalised_gold_answers():
    # VQAv2 annotation answers are not fully normalised (some keep "the ..." or capitals); the
    # official (LAVIS vqa_tools) procedure gives gold answers only the punctuation step, so a
    # prediction "dog" never matches "The Dog". The default must report that official number.
    official = _official_vqa_eval()
    answers = ["The Dog"] * 3 + ["the cat"] * 2 + ["cat"] * 5
    for prediction in ("dog", "cat", "the cat"):
        pred = official.processDigitArticle(official.processPunctuation(prediction))
        gold = [official.processPunctuation(a) for a in answers]
        expected = sum(min(1.0, sum(o == pred for o in gold[:i] + gold[i + 1 :]) / 3) for i in range(10)) / 10
        assert vqa_accuracy(prediction, answers) == pytest.approx(expected)
