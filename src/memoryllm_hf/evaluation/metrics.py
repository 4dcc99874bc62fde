"""Pinned answer scoring: normalisation, exact hit, exact match, SQuAD token F1, first-line post-processing.

Normalisation is the SQuAD / LongBench one: lower-case, drop punctuation, drop the articles a/an/the, collapse
whitespace. Every generation is first cut to its first non-empty line (the pinned LongBench-style
post-processing: models keep talking after the answer, and the official scripts leave this unpinned).
"""

import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

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


# --- 95% intervals ------------------------------------------------------------------------------------------------
# Rates (a share of yes/no outcomes) get Wilson's score interval; means of graded values (F1, per-record averages of
# several probes) and statistics of many rates (the CounterFact Score) get a percentile bootstrap over the examples,
# with a fixed seed so a results file is reproducible from its records.

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson's score interval for `successes` out of `n` (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    rows: Sequence,
    statistic: Callable[[Sequence], float | None] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(rows)` (default: the mean), resampling the rows with replacement
    (None for no rows)."""
    rows = list(rows)
    if not rows:
        return None
    statistic = statistic or mean
    generator = random.Random(seed)
    values = sorted(
        value
        for value in (statistic([rows[generator.randrange(len(rows))] for _ in rows]) for _ in range(resamples))
        if value is not None
    )
    if not values:
        return None
    tail = (1 - level) / 2
    low = values[int(math.floor(tail * (len(values) - 1)))]
    high = values[int(math.ceil((1 - tail) * (len(values) - 1)))]
    return low, high


def interval(values: Sequence[float], rate: bool | None = None) -> list[float] | None:
    """The 95% interval of the mean of `values`: Wilson's for a rate, else a bootstrap. `rate=None`: a rate when every
    value is 0 or 1 (per-record means of several probes are graded values, one probe per record a rate)."""
    values = [float(v) for v in values]
    if not values:
        return None
    if rate is None:
        rate = all(v in (0.0, 1.0) for v in values)
    if rate:
        found = wilson_interval(sum(values), len(values))
    else:
        found = bootstrap_interval(values)
    return [round(found[0], 4), round(found[1], 4)]


# Which answer scores are rates (0/1 per answer: Wilson) and which graded (F1: bootstrap).
RATES = {"exact_hit": True, "exact_match": True, "f1": False, "passage_read": True}


def rate_summary(values: Sequence[float], name: str) -> dict:
    """{name: mean, name_ci: 95% interval} of `values` (the caller records n once for the group)."""
    values = list(values)
    return {name: mean(values), f"{name}_ci": interval(values, RATES.get(name))}
