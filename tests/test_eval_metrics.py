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


# ---------------------------------------------------------------- 95% intervals


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_equals_the_published_values(successes, n, low, high):
    from memoryllm_hf.evaluation.metrics import wilson_interval

    found = wilson_interval(successes, n)
    assert found[0] == pytest.approx(low, abs=5e-5) and found[1] == pytest.approx(high, abs=5e-5)
    assert wilson_interval(0, 0) is None


def test_bootstrap_interval_equals_a_reference_and_the_normal_limit():
    """Against a plain reference implementation (same seed, same resampling order) on a small case, and on a large
    sample of rates against Wilson's interval (they agree to ~0.005 at n = 1,000)."""
    import random

    from memoryllm_hf.evaluation.metrics import bootstrap_interval, wilson_interval

    values = [0.0, 0.2, 0.5, 0.5, 1.0, 0.8, 0.0, 0.3]
    generator = random.Random(0)
    means = sorted(sum(values[generator.randrange(8)] for _ in range(8)) / 8 for _ in range(2000))
    assert bootstrap_interval(values) == (means[int(math.floor(0.025 * 1999))], means[int(math.ceil(0.975 * 1999))])
    assert bootstrap_interval([0.4] * 5) == (0.4, 0.4)
    assert bootstrap_interval([]) is None
    rates = [1.0] * 300 + [0.0] * 700
    low, high = bootstrap_interval(rates)
    wilson = wilson_interval(300, 1000)
    assert abs(low - wilson[0]) < 0.006 and abs(high - wilson[1]) < 0.006


def test_interval_uses_wilson_for_rates_and_the_bootstrap_for_graded_values():
    from memoryllm_hf.evaluation.metrics import bootstrap_interval, interval, wilson_interval

    assert interval([1, 0, 0, 1, 1]) == [round(v, 4) for v in wilson_interval(3, 5)]
    assert interval([0.5, 1.0, 0.0]) == [round(v, 4) for v in bootstrap_interval([0.5, 1.0, 0.0])]
    assert interval([]) is None


def test_editing_summary_carries_n_and_intervals():
    """Efficacy (one probe per record) gets Wilson's interval; the Score a bootstrap over records that holds it."""
    from memoryllm_hf.evaluation.metrics import wilson_interval

    records = [
        {
            "efficacy": [{"success": i % 3 != 0, "exact": False}],
            "generalization": [{"success": i % 2 == 0, "exact": False}, {"success": True, "exact": True}],
            "specificity": [{"success": i % 4 == 0, "exact": False}],
        }
        for i in range(12)
    ]
    summary = summarize(records)
    assert summary["n"] == 12
    assert summary["efficacy_ci"] == [round(v, 4) for v in wilson_interval(8, 12)]
    low, high = summary["score_ci"]
    assert low <= summary["score"] <= high < 1 and low < high


def test_f1_gets_a_bootstrap_interval_and_rates_wilson_even_when_all_zero():
    from memoryllm_hf.evaluation.metrics import rate_summary, wilson_interval

    assert rate_summary([0.0] * 12, "f1") == {"f1": 0.0, "f1_ci": [0.0, 0.0]}  # the bootstrap of a constant
    assert rate_summary([0.0] * 12, "exact_hit")["exact_hit_ci"] == [0.0, round(wilson_interval(0, 12)[1], 4)]


def test_the_cost_measurement_runs_on_the_tiny_model(tmp_path):
    """`python -m memoryllm_hf.evaluation.costs` (its unit costs feed the plan's estimate) on the tiny model."""
    from memoryllm_hf.evaluation.costs import measure
    from memoryllm_hf.evaluation.data import EvalData
    from memoryllm_hf.tiny import tiny_model, tiny_tokenizer

    examples = [{"id": i, "title": "T", "question": f"q {i}?", "answers": ["a"], "context": "c"} for i in range(4)]
    unrelated = [{"title": f"U{i}", "text": f"unrelated text {i} " * 3} for i in range(40)]
    data = EvalData("nq", examples, unrelated)
    model = tiny_model(long_term_memory_tokens=256)
    found = measure(model, tiny_tokenizer(), data, contexts=2, batch=4, repeats=1, read_modes=["pool", "retrieve"])
    assert found["inject_s_per_context"] > 0 and found["ask_no_memory_s"] > 0
    for mode in ("pool", "retrieve"):  # each read mode timed on the one memory
        assert found[mode]["ask_memory_batch4_s"] > 0 and found[mode]["batch_speedup_per_row"] > 0
    assert model.config.read_mode == "pool"
