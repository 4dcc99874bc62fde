"""Scoring on hand-made generations and hand-made probabilities: right answers score 1, wrong ones 0."""

import math

import pytest

from memoryllm_hf.evaluation.editing import judge, summarize
from memoryllm_hf.evaluation.metrics import (
    exact_hit,
    exact_match,
    first_line,
    harmonic_mean,
    normalize_answer,
    qa_f1,
    score_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear  ", "apple pear"),
        ("Theory of the Atom", "theory of atom"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_hit_right_and_wrong():
    assert exact_hit("It was James Wolfe, in 1759.", ["James Wolfe"]) == 1.0
    assert exact_hit("It was Montcalm.", ["James Wolfe"]) == 0.0
    assert exact_hit("the answer is basel", ["Cologne", "Basel,"]) == 1.0  # any gold, punctuation ignored


def test_exact_hit_needs_whole_words():
    assert exact_hit("in 1962", ["196"]) == 0.0
    assert exact_hit("Parisian cafes", ["Paris"]) == 0.0
    assert exact_hit("THE PARIS", ["paris"]) == 1.0


def test_exact_hit_ignores_empty_gold():
    assert exact_hit("anything", [""]) == 0.0
    assert exact_hit("anything", ["!!"]) == 0.0  # normalises to nothing


def test_exact_match_and_f1():
    assert exact_match("The Basel.", ["basel"]) == 1.0
    assert exact_match("Basel city", ["basel"]) == 0.0
    assert qa_f1("Basel city", ["basel"]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert qa_f1("Zurich", ["basel"]) == 0.0
    assert qa_f1("new york city", ["York", "New York City"]) == 1.0  # best gold wins
    assert qa_f1("", ["basel"]) == 0.0


def test_first_line_is_the_answer():
    assert first_line("\n\n  Basel \nIt is in Switzerland.") == "Basel"
    assert first_line("   \n") == ""
    scores = score_answer("\nWolfe\nJames Wolfe was a general", ["James Wolfe"])
    assert scores["answer"] == "Wolfe"
    assert scores["exact_hit"] == 0.0  # the second line does not count
    assert scores["f1"] == pytest.approx(2 / 3)


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0


def _scores(*logprobs, greedy=()):
    return [{"logprob": value, "greedy": i in greedy, "token_accuracy": 0.0} for i, value in enumerate(logprobs)]


def test_probability_comparisons():
    layout = [("efficacy", 0, 1), ("generalization", 2, 3), ("specificity", 4, 5)]
    result = judge(_scores(-1.0, -3.0, -5.0, -2.0, -2.0, -2.0, greedy=(0,)), layout)
    assert result["efficacy"][0]["success"] is True  # P(new) > P(true)
    assert result["generalization"][0]["success"] is False  # P(new) < P(true)
    assert result["specificity"][0]["success"] is False  # a tie is no success
    assert result["efficacy"][0]["exact"] and not result["generalization"][0]["exact"]


def test_summarize_averages_each_record_first():
    records = [
        {
            "efficacy": [{"success": True, "exact": True}],
            "generalization": [{"success": True, "exact": False}, {"success": False, "exact": False}],
            "specificity": [{"success": True, "exact": True}],
        },
        {
            "efficacy": [{"success": False, "exact": False}],
            "generalization": [{"success": True, "exact": True}],
            "specificity": [{"success": True, "exact": False}],
        },
    ]
    summary = summarize(records)
    assert summary["efficacy"] == 0.5
    assert summary["generalization"] == pytest.approx(0.75)  # (0.5 + 1) / 2, not 2/3
    assert summary["specificity"] == 1.0
    assert summary["score"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.75 + 1))
    assert summary["efficacy_exact"] == 0.5 and summary["specificity_exact"] == 0.5
    assert math.isclose(summary["exact_score"], harmonic_mean([0.5, 0.5, 0.5]))
