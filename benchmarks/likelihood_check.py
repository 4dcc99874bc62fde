"""The likelihood check (`config.retrieval_likelihood_gain`, `modeling/memory_check.py`) on the dev sets: which
prompts read a lone stored text with the default relevance cut alone, and with the check at candidate gains.

The default SmolLM2 (`from_base` defaults: the scorer and its cut as installed), one fresh memory per case holding
one text:
- CounterFact: the edit (`edit_text`), asked its prompt, a paraphrase and a neighbourhood prompt (the same relation
  about another subject: reading the edit there is what costs specificity), chat prompts as the evaluation reads
  them (`Prompter.completion`, kind "sentence");
- SQuAD / NQ: the question's own passage, and another question's passage (unrelated), chat prompts (`Prompter`).
A prompt "reads" the text when the retrieval read chooses one of its blocks for its own score (the cut; the subject
gate, on by default since, is turned off here) and, with
the check, when the best gain among those blocks reaches the candidate value (a lone text's blocks all fit the read
budget, so this is what the read with the check chooses). Shares with n and Wilson 95% intervals.

Run (about 10 minutes on one thread):
  python -m benchmarks.likelihood_check --limit 200 --json docs/results/likelihood_check.json
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.lexical_recall import read_jsonl, wilson
from memoryllm_hf.evaluation.data import default_data_dir
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.loading import load

GAINS = (None, 6.0, 8.0, 10.0, 12.0, 15.0)


def case_reads(model, prompts: dict[str, list[int]]) -> dict[str, dict]:
    """Per prompt: whether the cut reads the memory's lone stored text, and the best gain of its blocks."""
    cfg, read = model.config, model.reads["retrieve"]
    fields = ("retrieval_likelihood_gain", "retrieval_likelihood_weight", "retrieval_neighbors", "retrieval_subject_gate")
    kept = {field: getattr(cfg, field) for field in fields}
    # the blocks the cut takes for their own score, without the check (nor the subject gate: the cut alone)
    for field, value in zip(fields, (None, None, 0, False), strict=True):
        setattr(cfg, field, value)
    try:
        out = {}
        for kind, ids in prompts.items():
            taken = set(model.retrieve(torch.tensor([ids]))[0])
            store = list(model.long_term_memory)
            scores = read.scores(model, torch.tensor([ids]))[0].float()
            best = int(scores.argmax())
            gains = read.check.gains(model, ids, store)
            taken_gains = [gain for block, gain in zip(store, gains, strict=True) if block.injection in taken]
            out[kind] = {"cut": bool(taken), "gain": max(taken_gains, default=float("-inf")),
                         "score": float(scores[best]), "gain_of_best": gains[best]}
    finally:
        for field, value in kept.items():
            setattr(cfg, field, value)
    return out


def dev_parser(doc: str, limit: int = 200) -> argparse.ArgumentParser:
    """The command line of the dev-set probes: the data folder, cases per set, the results file."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument("--limit", type=int, default=limit)
    parser.add_argument("--json", type=Path)
    return parser


def read_dev_cases(model, prompter, data_dir: Path, limit: int, reads) -> tuple[dict[str, list[dict]], list[dict]]:
    """`reads(model, {kind: prompt ids})` for every text of every dev case (`dev_cases`), each text alone in a fresh
    memory: (the cases of each set, one record row per case)."""
    empty = model.memory_state()
    found: dict[str, list[dict]] = {}
    rows = []
    with torch.no_grad():
        for name, key, parts in tqdm(dev_cases(data_dir, limit, prompter), desc="cases", unit="case"):
            case = {}
            for text, prompts in parts:
                model.set_memory_state(empty)
                model.inject(text, tokenizer=prompter.tokenizer)
                case.update(reads(model, prompts))
            found.setdefault(name, []).append(case)
            rows.append({"set": name, **key, **case})
    model.set_memory_state(empty)
    return found, rows


KINDS = {"counterfact": ("prompt", "paraphrase", "neighbourhood"), "squad": ("own", "unrelated"),
         "nq": ("own", "unrelated")}


def dev_cases(data_dir: Path, limit: int, prompter):
    """(set, key, [(stored text, {kind: prompt ids})]) per case: a CounterFact edit with its prompt, a paraphrase
    and a neighbourhood prompt (chat completions, as the evaluation reads them); a SQuAD / NQ question against its
    own passage and against another question's (unrelated)."""
    for case in read_jsonl(data_dir / "counterfact.jsonl")[:limit]:
        prompts = {"prompt": case["prompt"], "paraphrase": case["paraphrase_prompts"][0],
                   "neighbourhood": case["neighborhood_prompts"][0]["prompt"]}
        prompts = {kind: prompter.completion(text, "", "sentence")[0] for kind, text in prompts.items()}
        yield "counterfact", {"case_id": case["case_id"]}, [(case["edit_text"], prompts)]
    for name in ("squad", "nq"):
        questions = read_jsonl(data_dir / f"{name}_qa.jsonl")[:limit]
        for index, row in enumerate(questions):
            ids = prompter.question(row["question"]).ids
            other = next(q for q in questions[index + 1:] + questions[:index] if q["context"] != row["context"])
            yield name, {"id": row["id"]}, [(row["context"], {"own": ids}), (other["context"], {"unrelated": ids})]


def shares(cases: list[dict], kinds) -> dict:
    table = {}
    for gain in GAINS:
        row = {}
        for kind in kinds:
            passed = sum(c[kind]["cut"] and (gain is None or c[kind]["gain"] >= gain) for c in cases)
            row[kind] = {"read": round(passed / len(cases), 4), "ci95": wilson(passed, len(cases)), "n": len(cases)}
        table["cut only" if gain is None else f"cut + gain {gain}"] = row
    return table


def main() -> None:
    parser = dev_parser(__doc__)
    parser.add_argument("--records", type=Path, help="one JSON line per case (default: beside --json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load("default")
    prompter = Prompter(tokenizer, "chat", model.config.max_position_embeddings)
    records = args.records or (args.json.with_suffix(".records.jsonl") if args.json else None)
    results = {"settings": {"retrieval_scorer": model.config.retrieval_scorer,
                            "retrieval_threshold": model.config.retrieval_threshold,
                            "retrieval_margin": model.config.retrieval_margin, "limit": args.limit}}
    found, rows = read_dev_cases(model, prompter, args.data_dir, args.limit, case_reads)
    for name, kinds in KINDS.items():
        results[name] = shares(found[name], kinds)
    for name in ("counterfact", "squad", "nq"):
        for label, row in results[name].items():
            print(f"{name:12s} {label:15s}", "  ".join(f"{k} {v['read']:.3f} {v['ci95']}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if records:
        records.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
