"""Lexical retrieval on the dev sets without the model: BM25 over stored blocks' words (`modeling/memory_lexical.py`).

Blocks are the texts' injection chunks (SmolLM2's tokenizer, `inject_chunk_size` tokens, as `inject` splits them);
questions are the chat prompts the model reads (`Prompter`), of which only the user's words are query terms.
Reported: recall@1 / recall@4 of the question's own passage among all stored blocks (95% Wilson intervals), and, for
the "nothing relevant" decision, the best block's `relevance` for questions whose passage is stored vs. unrelated
questions, with stores of 1 to `--stored` texts (the decision must mean the same at every size), and the threshold
that separates them best over all sizes.

Run (seconds; the tokenizer only):
  python -m benchmarks.lexical_recall --data squad --questions 200 --stored 1000
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from memoryllm_hf.evaluation.data import default_data_dir
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.modeling import memory_lexical as lexical

DATA = {"squad": "squad_qa", "nq": "nq_qa", "heldout": "squad_heldout_qa"}
OTHERS = {"squad": "squad_paragraphs", "nq": "nq_passages", "heldout": "squad_train_paragraphs"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if not n:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def recall_row(ranks: list[int]) -> dict:
    n = len(ranks)
    hits1, hits4 = sum(r < 1 for r in ranks), sum(r < 4 for r in ranks)
    return {
        "questions": n,
        "recall@1": hits1 / n,
        "recall@1_ci95": wilson(hits1, n),
        "recall@4": hits4 / n,
        "recall@4_ci95": wilson(hits4, n),
        "mean_rank": sum(ranks) / n,
    }


def dev_case(data: str, data_dir: Path, heldout_dir: Path, questions: int, unstored: int, stored: int, seed: int):
    """(asked rows, unrelated question rows, unrelated texts) as `retrieval_recall` builds them."""
    rng = random.Random(seed)
    rows = read_jsonl((heldout_dir if data == "heldout" else data_dir) / f"{DATA[data]}.jsonl")
    rng.shuffle(rows)
    asked, unasked = rows[:questions], rows[questions : questions + unstored]
    taken = {r["context"] for r in asked + unasked}
    folder = heldout_dir if data == "heldout" else data_dir
    others = [p["text"] for p in read_jsonl(folder / f"{OTHERS[data]}.jsonl") if p["text"] not in taken]
    rng.shuffle(others)
    return asked, unasked, others[: max(0, stored - len(asked))]


def chunks(tokenizer, text: str, chunk: int) -> list[torch.Tensor]:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(torch.tensor_split(ids, -(-ids.numel() // chunk)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=tuple(DATA), default="squad")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument("--heldout-dir", type=Path, default=Path("data/train"))
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--unstored", type=int, default=100, help="unrelated questions (passage never stored)")
    parser.add_argument("--stored", type=int, default=1000, help="stored texts (questions' passages + unrelated)")
    parser.add_argument("--chunk", type=int, default=256, help="inject_chunk_size (SmolLM2 default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="default: docs/results/lexical_recall_<data>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from memoryllm_hf.default_model import smollm2_base_folder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base_folder())
    analyzer = lexical.Analyzer()
    markers = lexical.chat_markers(tokenizer)
    prompter = Prompter(tokenizer, "chat", 8192)
    asked, unasked, others = dev_case(
        args.data, args.data_dir, args.heldout_dir, args.questions, args.unstored, args.stored, args.seed
    )
    texts = [(r["context"], i) for i, r in enumerate(asked)] + [(t, -1) for t in others]
    random.Random(args.seed + 1).shuffle(texts)
    # blocks: (owner, terms), in store order
    start = time.perf_counter()
    blocks = []
    for text, owner in tqdm(texts, desc="blocks", unit="text"):
        for part in chunks(tokenizer, text, args.chunk):
            blocks.append((owner, lexical.block_terms(analyzer, tokenizer.decode, part)))
    analyse_s = time.perf_counter() - start

    def query(question: str) -> list[str]:
        ids = prompter.question(question).ids
        return analyzer.terms(lexical.user_text(tokenizer.decode(ids), markers))

    queries = [query(r["question"]) for r in asked]
    negatives = [query(r["question"]) for r in unasked]
    index = lexical.LexicalIndex()
    start = time.perf_counter()
    for key, (_, terms) in enumerate(blocks):
        index.add(key, terms)
    index_s = time.perf_counter() - start
    keys = list(range(len(blocks)))
    owners = torch.tensor([owner for owner, _ in blocks])
    ranks, best_pos = [], []
    start = time.perf_counter()
    for i, terms in enumerate(tqdm(queries, desc="questions", unit="q")):
        bm25, relevance = index.scores(terms, keys)
        order = bm25.argsort(descending=True, stable=True)
        ranks.append(int((owners[order] == i).nonzero()[0, 0]))
    score_s = (time.perf_counter() - start) / len(queries)

    # the "nothing relevant" decision at every store size: a store of n texts holding the question's passage (n-1
    # unrelated texts) vs. the same store asked an unrelated question
    by_text = {}
    for owner, terms in blocks:
        by_text.setdefault(owner, []).append(terms)
    unrelated = [terms for owner, terms in blocks if owner < 0]
    rng = random.Random(args.seed + 2)
    sizes = [n for n in (1, 10, 100, args.stored) if n <= args.stored]
    decision = {}
    for size in sizes:
        positive, negative = [], []
        for i, terms in enumerate(queries[:100]):
            store = list(by_text[i]) + rng.sample(unrelated, min(len(unrelated), max(0, size - 1)))
            small = lexical.LexicalIndex()
            for key, doc in enumerate(store):
                small.add(key, doc)
            keyset = list(range(len(store)))
            positive.append(float(small.scores(terms, keyset)[1][: len(by_text[i])].max()))
            negative.append(float(small.scores(negatives[i % len(negatives)], keyset)[1].max()))
        decision[size] = {"stored": positive, "unrelated": negative}
    all_pos = [s for d in decision.values() for s in d["stored"]]
    all_neg = [s for d in decision.values() for s in d["unrelated"]]
    cuts = sorted(set(round(x, 3) for x in all_pos + all_neg))
    best = max(cuts, key=lambda t: sum(s >= t for s in all_pos) / len(all_pos) + sum(s < t for s in all_neg) / len(all_neg))
    threshold_rows = {}
    for size, d in decision.items():
        row = {}
        for name, t in (("default", lexical.RELEVANCE_THRESHOLD), ("best_over_sizes", best)):
            tp, fp = sum(s >= t for s in d["stored"]), sum(s >= t for s in d["unrelated"])
            row[name] = {
                "threshold": t,
                "stored_read": tp / len(d["stored"]),
                "stored_read_ci95": wilson(tp, len(d["stored"])),
                "unrelated_read": fp / len(d["unrelated"]),
                "unrelated_read_ci95": wilson(fp, len(d["unrelated"])),
            }
        row["quantiles"] = {
            k: [round(q, 3) for q in torch.tensor(v).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()]
            for k, v in d.items()
        }
        threshold_rows[str(size)] = row
    results = {
        "recall": {"bm25 (user words, stemmed) [chat]": recall_row(ranks)},
        "decision": threshold_rows,
        "store": {"texts": len(texts), "blocks": len(blocks), "terms": sum(len(t) for _, t in blocks)},
        "timing": {"analyse_s": analyse_s, "index_s": index_s, "score_per_question_s": score_s},
        "meta": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps({k: results[k] for k in ("recall", "store", "timing")}, indent=1))
    for size, row in threshold_rows.items():
        print(size, row["quantiles"], row["default"]["stored_read"], row["default"]["unrelated_read"],
              "best", best, row["best_over_sizes"]["stored_read"], row["best_over_sizes"]["unrelated_read"])
    out = args.json or Path(f"docs/results/lexical_recall_{args.data}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
