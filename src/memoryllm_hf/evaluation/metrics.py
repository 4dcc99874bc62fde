"""Pinned answer scoring: normalisation, exact hit, exact match, SQuAD token F1, first-line post-processing.

Normalisation is the SQuAD / LongBench one: lower-case, drop punctuation, drop the articles a/an/the, collapse
whitespace. Every generation is first cut to its first non-empty line (the pinned LongBench-style
post-processing: models keep talking after the answer, and the official scripts leave this unpinned).
"""

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(generation: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped."""
    for line in generation.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_hit(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if some normalised gold answer occurs in the normalised prediction as whole words, else 0.0."""
    padded = f" {normalize_answer(prediction)} "
    return float(any(gold and f" {gold} " in padded for gold in map(normalize_answer, answers)))


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in answers))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token-level F1 between two normalised strings."""
    predicted, reference = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(predicted) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: Iterable[str]) -> float:
    """Best token F1 of the prediction against any gold answer."""
    return max((token_f1(prediction, gold) for gold in answers), default=0.0)


def score_answer(generation: str, answers: Sequence[str]) -> dict[str, float | str]:
    """All QA scores of one generation (after the first-line post-processing)."""
    answer = first_line(generation)
    return {
        "generation": generation,
        "answer": answer,
        "exact_hit": exact_hit(answer, answers),
        "exact_match": exact_match(answer, answers),
        "f1": qa_f1(answer, answers),
    }


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0): the CounterFact "Score" of efficacy, generalization, specificity."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)
