"""Where the memory is read: before the chat template (`read_placement="prefix"`) or where the user's message starts
(`"user_turn"`), against the passage pasted into the user turn.

One model (`from_base` defaults: retrieval reads, chat prompts, greedy, exact hit), one question at a time, side by
side on the same memory: a fresh memory holding only the question's passage (`inject(passage)` after a reset), then
* passage: the passage inside the user turn of the prompt, no memory (the target);
* memory, prefix: the question alone, the memory read before everything (the official place);
* memory, user turn: the question alone, the memory read after the system prompt and user header;
* memory, text read: the same with `read_mode="text"` (the chosen blocks' stored tokens, encoded after the header).
With `--store-unrelated M`, one memory serves every question instead: all the questions' passages plus M unrelated dev
paragraphs, injected once in a shuffled order (the store's bound raised to hold them all). SQuAD and NQ questions
alternate, so a run stopped early has equal counts. Each condition's accuracy comes with n and
a Wilson 95% interval; `memory / passage` is the goal's ratio (>= 0.9), with the paired gains and losses (questions
only the memory / only the passage answers). Records are appended as they finish (`--output` + `.records.jsonl`;
`--resume` continues, and adds to earlier records the conditions they lack, e.g. a condition added since).

Run: python -m benchmarks.read_placement --limit 100 --threads 1 --output docs/results/read_placement.json
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memoryllm_hf.evaluation.data import default_data_dir, load_data
from memoryllm_hf.evaluation.metrics import score_answer
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.evaluation.records import RecordLog
from memoryllm_hf.greedy import generate, greedy_config
from memoryllm_hf.loading import load

CONDITIONS = ("passage", "memory_prefix", "memory_user_turn", "memory_text")
MEMORY_CONDITIONS = CONDITIONS[1:]
DATASETS = ("squad", "nq")


def wilson_interval(hits: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a proportion `hits / n` (95% for z = 1.96)."""
    if n == 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(centre - half, 4), round(centre + half, 4)


def summarise(records: list[dict]) -> dict:
    """Per dataset and condition: n, exact hit, its Wilson 95% interval, F1; memory / passage ratios."""
    out = {}
    for dataset in DATASETS:
        rows = [r for r in records if r["dataset"] == dataset]
        if not rows:
            continue
        table = {}
        for condition in [c for c in CONDITIONS if all(c in r for r in rows)]:
            hits = sum(r[condition]["exact_hit"] for r in rows)
            table[condition] = {
                "n": len(rows),
                "exact_hit": round(hits / len(rows), 4),
                "exact_hit_95ci": wilson_interval(hits, len(rows)),
                "f1": round(sum(r[condition]["f1"] for r in rows) / len(rows), 4),
            }
        passage = table["passage"]["exact_hit"]
        for condition in [c for c in MEMORY_CONDITIONS if c in table]:
            table[condition]["vs_passage"] = round(table[condition]["exact_hit"] / passage, 3) if passage else None
            table[condition]["vs_passage_paired"] = paired(rows, condition, "passage")
        if "memory_text" in table and "memory_user_turn" in table:
            table["memory_text"]["vs_memory_user_turn_paired"] = paired(rows, "memory_text", "memory_user_turn")
        table["passage_read"] = round(sum(r["passage_read"] for r in rows) / len(rows), 4)
        out[dataset] = table
    return out


def paired(rows: list[dict], condition: str, other: str) -> dict:
    """Paired exact hits of `condition` against `other` on the same questions: answered by `condition` only (gains),
    by `other` only (losses), by both."""
    hit = lambda r, c: r[c]["exact_hit"] > 0  # noqa: E731
    return {"gains": sum(hit(r, condition) and not hit(r, other) for r in rows),
            "losses": sum(hit(r, other) and not hit(r, condition) for r in rows),
            "both": sum(hit(r, condition) and hit(r, other) for r in rows)}


# (read placement, read mode) of each memory condition
MEMORY_READS = {"memory_prefix": ("prefix", "retrieve"), "memory_user_turn": ("user_turn", "retrieve"),
                "memory_text": ("user_turn", "text")}


@torch.no_grad()
def fill_store(model, tokenizer, data: dict, unrelated: int, seed: int) -> tuple[dict[str, list[int]], dict]:
    """One memory holding every question's passage and `unrelated` other dev paragraphs, shuffled: (the injection
    numbers of each passage, what the store holds)."""
    contexts = list(dict.fromkeys(e["context"] for d in data.values() for e in d.examples))
    taken = set(contexts)
    others = list(dict.fromkeys(p["text"] for d in data.values() for p in d.unrelated if p["text"] not in taken))
    rng = random.Random(seed)
    rng.shuffle(others)
    texts = contexts + others[:unrelated]
    rng.shuffle(texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    model.reset_memory(seed)
    model.config.long_term_memory_tokens = max(model.config.long_term_memory_tokens, 2 * tokens)  # (updates round up)
    own = {}
    for text in tqdm(texts, desc="injecting", unit="text"):
        first = model.num_injections + 1
        model.inject(text, tokenizer=tokenizer)
        own[text] = list(range(first, model.num_injections + 1))
    info = {"texts": len(texts), "passages": len(contexts), "unrelated": len(texts) - len(contexts),
            "injections": model.num_injections, "stored_tokens": tokens, "blocks": len(model.long_term_memory)}
    return own, info


@torch.no_grad()
def ask(model, tokenizer, example: dict, prompter: Prompter, decoding, seed: int, record: dict | None = None,
        conditions=MEMORY_CONDITIONS, own: list[int] | None = None) -> dict:
    """The passage and the memory `conditions` for one question that `record` (an earlier sitting's) lacks, on a fresh
    memory holding its passage (or, with `own`, its injection numbers, the memory as it is)."""
    if own is None:
        model.reset_memory(seed)
        first = model.num_injections + 1
        model.inject(example["context"], tokenizer=tokenizer)
        own = list(range(first, model.num_injections + 1))
    reserve = decoding.max_new_tokens
    question = prompter.question(example["question"], reserve=reserve).ids
    passage = prompter.question(example["question"], example["context"], reserve=reserve).ids
    record = {**(record or {"id": str(example["id"])}), "passage_updates": own}
    if "passage" not in record:
        answer = generate(model, tokenizer, [passage], False, decoding)[0]
        record["passage"] = score_answer(answer, example["answers"])
    placement, mode = model.config.read_placement, model.config.read_mode
    try:
        for condition in [c for c in conditions if c not in record]:
            model.config.read_placement, model.config.read_mode = MEMORY_READS[condition]
            answer = generate(model, tokenizer, [question], True, decoding)[0]
            record[condition] = {**score_answer(answer, example["answers"]), "read": model.last_retrieval[0]}
    finally:
        model.config.read_placement, model.config.read_mode = placement, mode
    read = next(record[c]["read"] for c in ("memory_user_turn", "memory_text") if c in record)
    record["passage_read"] = float(set(own) <= set(read))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--limit", type=int, default=100, help="questions per dataset (file order)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length (the harness's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("docs/results/read_placement.json"))
    parser.add_argument("--conditions", nargs="+", choices=MEMORY_CONDITIONS, default=list(MEMORY_CONDITIONS),
                        help="the memory conditions to run (the passage condition always runs)")
    parser.add_argument("--store-unrelated", type=int, default=None, metavar="M",
                        help="one memory for all questions: their passages plus M unrelated dev paragraphs")
    parser.add_argument("--no-relevance-cut", action="store_true",
                        help="read the best blocks whatever their scores (retrieval_threshold and _margin None)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", action="store_true", help="write the results of the records so far, run nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load("default")
    if args.no_relevance_cut:
        model.config.retrieval_threshold = model.config.retrieval_margin = None
    if model.config.read_placement != "user_turn":
        raise SystemExit("the default model should read in the user turn (from_base with a chat template)")
    data = {name: load_data(args.data, name, args.limit) for name in DATASETS}
    prompter = Prompter(tokenizer, "chat", model.config.max_position_embeddings)
    decoding = greedy_config(tokenizer, args.max_new_tokens)
    order = [(name, example) for pair in zip(*(d.examples for d in data.values())) for name, example in
             zip(DATASETS, pair)]
    keys = [f"{name}:{example['id']}" for name, example in order]
    config = {k: str(v) for k, v in vars(args).items() if k not in ("resume", "report")}
    log = RecordLog(args.output.with_suffix(".records.jsonl"), {"config": config}, resume=args.resume or args.report)
    start = time.perf_counter()
    shared, store = (None, None) if args.store_unrelated is None or args.report else fill_store(
        model, tokenizer, data, args.store_unrelated, args.seed)
    wanted = {"passage", *args.conditions}
    todo = [i for i, key in enumerate(keys) if log.get(key) is None or not wanted <= set(log.get(key))]
    for index in [] if args.report else tqdm(todo, desc="read placement", unit="question"):
        name, example = order[index]
        own = None if shared is None else shared[example["context"]]
        record = ask(model, tokenizer, example, prompter, decoding, args.seed, log.get(keys[index]), args.conditions,
                     own)
        log.add(keys[index], index, {**record, "dataset": name, "answers": example["answers"]})
    records = [log.get(key) for key in keys if log.get(key) is not None]
    cfg = model.config
    result = {
        "benchmark": "read_placement",
        "command": "python -m benchmarks.read_placement " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config,
        "model": {"source": "default (SmolLM2-135M-Instruct, from_base defaults)", "read_mode": cfg.read_mode,
                  "read_tokens": cfg.read_tokens, "retrieval_neighbors": cfg.retrieval_neighbors,
                  "num_memory_tokens": cfg.num_memory_tokens, "num_update_tokens": cfg.num_update_tokens,
                  "user_turn_marker": cfg.user_turn_marker, "retrieval_scorer": cfg.retrieval_scorer,
                  "retrieval_threshold": cfg.retrieval_threshold, "retrieval_margin": cfg.retrieval_margin,
                  "retrieval_subject_gate": cfg.retrieval_subject_gate,
                  "text_read_separator_ids": model.reads["text"].separator_ids(model)},
        "data": {name: d.info() for name, d in data.items()},
        "store": store or "a fresh memory per question, holding only its passage",
        "prompt": "chat: one user turn `{passage}\\n\\n{instruction}\\nQuestion: {q}` (passage) or `{instruction}\\n"
                  "Question: {q}` (memory; the text read reads the stored passage + \"\\n\\n\" after the header); "
                  "system prompt = the template's default",
        "metrics": summarise(records),
        "wall_time_s_this_session": round(time.perf_counter() - start, 1),
        "records": records,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
