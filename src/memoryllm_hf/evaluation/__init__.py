"""Evaluation harness: knowledge retention, knowledge editing, long context (HotpotQA) and integrity.

Every task runs its conditions (no memory, memory, in context) on the same examples in one run and writes a JSON
results file (config, model, data hashes, seed, prompt styles, decoding, per-example records, aggregate metrics,
wall time); see docs/evaluation.md. Command line: `memoryllm-hf eval TASK ...` or
`python -m memoryllm_hf.evaluation TASK ...`.
"""

from .data import EvalData, load_data
from .editing import run_editing
from .integrity import run_integrity
from .longcontext import run_longcontext
from .metrics import exact_hit, exact_match, first_line, normalize_answer, qa_f1, score_answer
from .models import load_model
from .retention import run_retention

__all__ = [
    "EvalData",
    "exact_hit",
    "exact_match",
    "first_line",
    "load_data",
    "load_model",
    "normalize_answer",
    "qa_f1",
    "run_editing",
    "run_integrity",
    "run_longcontext",
    "run_retention",
    "score_answer",
]
