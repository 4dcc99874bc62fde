"""The subject gate (`config.retrieval_subject_gate`, `modeling/memory_subject.py`) on the dev sets: which prompts
read a lone stored text with the default relevance cut alone, and with the gate.

The default SmolLM2 (`from_base` defaults: the scorer and its cut as installed), one fresh memory per case holding
one text, the cases of `benchmarks/likelihood_check.py` (CounterFact: the edit against its prompt, a paraphrase and
a neighbourhood prompt; SQuAD / NQ: a question against its own and another question's passage; chat prompts). A
prompt "reads" the text when the retrieval read chooses any of its blocks. Shares with n and Wilson 95% intervals.

Run (about 10 minutes on one thread):
  python -m benchmarks.subject_gate --limit 200 --json docs/results/subject_gate.json
"""

import json

import torch

from benchmarks.lexical_recall import wilson
from benchmarks.likelihood_check import KINDS, dev_parser, read_dev_cases
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.loading import load

SETTINGS = {"cut only": False, "cut + subject gate": True}


def case_reads(model, prompts: dict[str, list[int]]) -> dict[str, dict]:
    """Per prompt and setting: whether the read takes the memory's lone stored text."""
    kept = model.config.retrieval_subject_gate
    out = {}
    try:
        for kind, ids in prompts.items():
            out[kind] = {}
            for label, gate in SETTINGS.items():
                model.config.retrieval_subject_gate = gate
                out[kind][label] = bool(model.retrieve(torch.tensor([ids]))[0])
    finally:
        model.config.retrieval_subject_gate = kept
    return out


def main() -> None:
    args = dev_parser(__doc__).parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load("default")
    prompter = Prompter(tokenizer, "chat", model.config.max_position_embeddings)
    found, rows = read_dev_cases(model, prompter, args.data_dir, args.limit, case_reads)
    results = {"settings": {"retrieval_scorer": model.config.retrieval_scorer,
                            "retrieval_threshold": model.config.retrieval_threshold,
                            "retrieval_margin": model.config.retrieval_margin, "limit": args.limit}}
    for name, kinds in KINDS.items():
        results[name] = {}
        for label in SETTINGS:
            cases = found[name]
            results[name][label] = {
                kind: {"read": round(sum(c[kind][label] for c in cases) / len(cases), 4),
                       "ci95": wilson(sum(c[kind][label] for c in cases), len(cases)), "n": len(cases)}
                for kind in kinds
            }
            print(f"{name:12s} {label:20s}",
                  "  ".join(f"{k} {v['read']:.3f} {v['ci95']}" for k, v in results[name][label].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        args.json.with_suffix(".records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
