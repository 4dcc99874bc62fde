"""Evaluation harness: knowledge retention, knowledge editing, long context (HotpotQA) and integrity.

Every task runs its conditions (no memory, memory, in context) on the same examples in one run and writes a JSON
results file (config, model, data hashes, seed, prompt styles, decoding, per-example records, aggregate metrics,
wall time); see docs/evaluation.md. Command line: `memoryllm-hf eval TASK ...` or
`python -m memoryllm_hf.evaluation TASK ...`.
"""

from ..lazy import lazy_exports

# Loaded on first use: the command line builds its parser from this package without importing torch.
_EXPORTS = {
    "EvalData": ".data",
    "load_data": ".data",
    "run_editing": ".editing",
    "run_integrity": ".integrity",
    "run_longcontext": ".longcontext",
    "exact_hit": ".metrics",
    "exact_match": ".metrics",
    "first_line": ".metrics",
    "normalize_answer": ".metrics",
    "qa_f1": ".metrics",
    "score_answer": ".metrics",
    "load_model": ".models",
    "run_retention": ".retention",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
