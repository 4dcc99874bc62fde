"""Lexical retrieval on the dev sets without the model: BM25 over stored blocks' words (`modeling/memory_lexical.py`).

Blocks are the texts' injection chunks (SmolLM2's tokenizer, `inject_chunk_size` tokens, as `inject` splits them);
questions are the chat prompts the model reads (`Prompter`), of which only the user's words are query terms.
Reported: recall@1 / recall@4 of the question's own passage among all stored blocks (95% Wilson intervals), and, for
the "nothing relevant" decision, the best block's `relevance` for questions whose passage is stored vs. unrelated
questions, with stores of 1 to `--stored` texts (the decision must mean the same at every size), and the threshold
that separates them best over all sizes. What unrelated questions read is broken down (`unrelated_breakdown`): reads
of a block that holds one of the question's answers (the dev sets are topic-dense: another stored text may answer
it), and the share that reads the single most-read block (a block every question reads is matched by the prompt's
shared words, such as the QA instruction, not by the question). Printed per size and cut: (threshold, own passage
read, unrelated read, unrelated read of an answer-holding block, most-read block's share).

Run (seconds; the tokenizer only):
  python -m benchmarks.lexical_recall --data squad --questions 200 --stored 1000
  python -m benchmarks.lexical_recall --data nq --encoder --unrelated-data squad \
      --json docs/results/lexical_recall_nq_vs_squad.json
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
from memoryllm_hf.modeling.memory_reader import select_injections
from memoryllm_hf.modeling.memory_scoring import RETRIEVAL_SCORERS

DATA = {"squad": "squad_qa", "nq": "nq_qa", "heldout": "squad_heldout_qa"}
OTHERS = {"squad": "squad_paragraphs", "nq": "nq_passages", "heldout": "squad_train_paragraphs"}
# The grid of read settings compared (thresholds and margins on each scorer's own scale).
# the calibrated cuts of the scorer table (memory_scoring) for reads without the subject gate (this benchmark reads
# scores only; the gate's lower cuts are among the candidates)
THRESHOLDS = {name: scorer.cut(False) for name, scorer in RETRIEVAL_SCORERS.items() if scorer.threshold is not None}
CANDIDATE_THRESHOLDS = {"bm25": (0.1, 0.15, 0.2), "bm25+bigrams": (0.15, 0.2, 0.25, 0.3),
                        "encoder only": (0.35, 0.4, 0.45),
                        "bm25+encoder": (0.4, 0.45, 0.5, 0.55, 0.6, 0.65),
                        "bm25+encoder+sentences": (0.9, 1.0, 1.1, 1.2),
                        "bm25+bigrams+encoder+sentences": (1.0, 1.1, 1.2, 1.3, 1.4)}
CANDIDATE_MARGINS = {"bm25": (None, 0.02, 0.05, 0.1), "bm25+bigrams": (None, 0.02, 0.05, 0.1),
                     "encoder only": (None, 0.05, 0.1, 0.2),
                     "bm25+encoder": (None, 0.05, 0.1, 0.2), "bm25+encoder+sentences": (None, 0.05, 0.1, 0.2),
                     "bm25+bigrams+encoder+sentences": (None, 0.05, 0.1, 0.2)}


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


def dev_case(data: str, data_dir: Path, heldout_dir: Path, questions: int, unstored: int, stored: int, seed: int,
             unrelated_data: str | None = None):
    """(asked rows, unrelated question rows, unrelated texts) as `retrieval_recall` builds them. `unrelated_data`:
    the unrelated questions come from that set's questions instead (none of their passages is stored)."""
    rng = random.Random(seed)
    rows = read_jsonl((heldout_dir if data == "heldout" else data_dir) / f"{DATA[data]}.jsonl")
    rng.shuffle(rows)
    asked, unasked = rows[:questions], rows[questions : questions + unstored]
    if unrelated_data not in (None, data):
        other = read_jsonl((heldout_dir if unrelated_data == "heldout" else data_dir) / f"{DATA[unrelated_data]}.jsonl")
        random.Random(seed).shuffle(other)
        unasked = other[:unstored]
    taken = {r["context"] for r in asked + unasked}
    folder = heldout_dir if data == "heldout" else data_dir
    others = [p["text"] for p in read_jsonl(folder / f"{OTHERS[data]}.jsonl") if p["text"] not in taken]
    rng.shuffle(others)
    return asked, unasked, others[: max(0, stored - len(asked))]


def holds_answer(answers: list[str], text: str) -> bool:
    """Whether `text` holds one of `answers` (case and whitespace folded)."""
    folded = " ".join(text.lower().split())
    return any(" ".join(answer.lower().split()) in folded for answer in answers if answer.strip())


def unrelated_breakdown(reads: list[list[tuple[int, bool]]]) -> dict:
    """What unrelated questions read: `reads[q]` the blocks question q reads, as (block id, holds one of q's answers).
    Shares of questions that read anything, a block holding one of their answers (a useful read: the stored texts
    of a topic-dense set may answer a question whose own passage is not stored), only blocks without; and the share
    that reads the one block most questions read (one block read by every question is the prompt's shared words,
    e.g. an instruction, matching it, not the questions)."""
    n = len(reads)
    if not n:
        return {}
    counts = {}
    for read in reads:
        for block in {block for block, _ in read}:
            counts[block] = counts.get(block, 0) + 1
    any_read = sum(bool(read) for read in reads)
    answered = sum(any(holds for _, holds in read) for read in reads)
    return {
        "read": any_read / n,
        "read_ci95": wilson(any_read, n),
        "read_a_block_holding_an_answer": answered / n,
        "read_only_blocks_without_an_answer": (any_read - answered) / n,
        "most_read_block_share": max(counts.values(), default=0) / n,
    }


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
    parser.add_argument("--unrelated-data", choices=tuple(DATA), help="take the unrelated questions from this set "
                        "(default: --data's own questions, whose topics its stored texts may share)")
    parser.add_argument("--stored", type=int, default=1000, help="stored texts (questions' passages + unrelated)")
    parser.add_argument("--chunk", type=int, default=256, help="inject_chunk_size (SmolLM2 default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", action="store_true", help="also the optional sentence encoder (bm25+encoder)")
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
        args.data, args.data_dir, args.heldout_dir, args.questions, args.unstored, args.stored, args.seed,
        args.unrelated_data,
    )
    texts = [(r["context"], i) for i, r in enumerate(asked)] + [(t, -1) for t in others]
    random.Random(args.seed + 1).shuffle(texts)
    # blocks: (owner, terms), in store order; their texts (for the unrelated questions' answers)
    start = time.perf_counter()
    blocks, block_texts = [], []
    for text, owner in tqdm(texts, desc="blocks", unit="text"):
        for part in chunks(tokenizer, text, args.chunk):
            blocks.append((owner, lexical.block_terms(analyzer, tokenizer.decode, part)))
            block_texts.append(tokenizer.decode(part))
    analyse_s = time.perf_counter() - start

    def query(question: str) -> list[list[str]]:
        """The terms of each of the question's queries (`user_queries`, as the scorer part scores them)."""
        ids = prompter.question(question).ids
        return [analyzer.terms(q) for q in lexical.user_queries(lexical.user_text(tokenizer.decode(ids), markers))]

    queries = [query(r["question"]) for r in asked]
    negatives = [query(r["question"]) for r in unasked]
    index = lexical.LexicalIndex()
    start = time.perf_counter()
    for key, (_, terms) in enumerate(blocks):
        index.add(key, terms)
    index_s = time.perf_counter() - start
    keys = list(range(len(blocks)))
    owners = torch.tensor([owner for owner, _ in blocks])
    # scorer(question, terms, index, blocks) -> scores of those blocks; question >= 0: an asked question, -1 - j:
    # unrelated question j
    def bm25(question, terms, index, keys):
        return torch.stack([index.scores(query, keys)[1] for query in terms]).amax(0)

    # the "bigrams" part: BM25 relevance over adjacent term pairs (memory_lexical.BigramScorer)
    pairs = lexical.term_pairs
    full_pairs = lexical.LexicalIndex()
    for key, (_, terms) in enumerate(blocks):
        full_pairs.add(key, pairs(terms))
    small_pairs = {}

    def bigrams(question, terms, index, keys):
        if len(keys) == len(blocks):
            pair_index = full_pairs
        else:
            pair_index = small_pairs.get(tuple(keys))
            if pair_index is None:
                small_pairs.clear()
                pair_index = small_pairs[tuple(keys)] = lexical.LexicalIndex()
                for key in keys:
                    pair_index.add(key, pairs(blocks[key][1]))
        return torch.stack([pair_index.scores(pairs(query), keys)[1] for query in terms]).amax(0)

    def bm25_bigrams(question, terms, index, keys):
        return bm25(question, terms, index, keys) + bigrams(question, terms, index, keys)

    scorers = {"bm25": bm25, "bm25+bigrams": bm25_bigrams}
    if args.encoder:
        from memoryllm_hf.modeling.memory_dense import SentenceEncoder

        encoder = SentenceEncoder()
        block_text = [tokenizer.decode(part) for text, _ in texts for part in chunks(tokenizer, text, args.chunk)]
        embedded = torch.cat([encoder.encode(block_text[i : i + 64]) for i in tqdm(range(0, len(block_text), 64),
                                                                                    desc="encoder", unit="batch")])
        def user_words(row):
            return lexical.user_queries(
                lexical.user_text(tokenizer.decode(prompter.question(row["question"]).ids), markers)
            )

        q_emb = [encoder.encode(user_words(r)) for r in tqdm(asked, desc="encoder questions", unit="q")]
        n_emb = [encoder.encode(user_words(r)) for r in unasked]

        def cosine(question, terms, index, keys):  # (the best of the question's queries, as the scorer part)
            queries = q_emb[question] if question >= 0 else n_emb[-1 - question]
            return (embedded[keys] @ queries.T).amax(1).double()

        def fused(question, terms, index, keys):
            return bm25(question, terms, index, keys) + cosine(question, terms, index, keys)

        # the "sentences" part: each block's sentence pieces, the best piece counts
        from memoryllm_hf.modeling.memory_dense import sentence_pieces

        pieces = [sentence_pieces(text) for text in block_text]
        piece_owner = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([len(p) for p in pieces]))
        flat = [piece for texts in pieces for piece in texts]
        piece_emb = torch.cat([encoder.encode(flat[i : i + 64]) for i in tqdm(range(0, len(flat), 64),
                                                                              desc="sentences", unit="batch")])

        def best_sentence(question, terms, index, keys):
            queries = q_emb[question] if question >= 0 else n_emb[-1 - question]
            keys_t = torch.tensor(keys)
            chosen = torch.isin(piece_owner, keys_t)
            cos = (piece_emb[chosen] @ queries.T).amax(1).double()
            where = {key: n for n, key in enumerate(keys)}
            slot = torch.tensor([where[int(o)] for o in piece_owner[chosen]], dtype=torch.long)
            return torch.full((len(keys),), -1.0, dtype=torch.float64).scatter_reduce(0, slot, cos, "amax")

        def fused3(question, terms, index, keys):
            return fused(question, terms, index, keys) + best_sentence(question, terms, index, keys)

        def fused4(question, terms, index, keys):
            return fused3(question, terms, index, keys) + bigrams(question, terms, index, keys)

        scorers.update({"encoder only": cosine, "bm25+encoder": fused, "bm25+encoder+sentences": fused3,
                        "bm25+bigrams+encoder+sentences": fused4})
    ranks = {name: [] for name in scorers}
    full_scores = {name: [] for name in scorers}
    start = time.perf_counter()
    for i, terms in enumerate(tqdm(queries, desc="questions", unit="q")):
        for name, scorer in scorers.items():
            score = scorer(i, terms, index, keys)
            full_scores[name].append(score)
            order = score.argsort(descending=True, stable=True)
            ranks[name].append(int((owners[order] == i).nonzero()[0, 0]))
    score_s = (time.perf_counter() - start) / len(queries)
    sizes_tokens = [len(part) for text, _ in texts for part in chunks(tokenizer, text, args.chunk)]
    calls = []
    for t_index, (text, _) in enumerate(texts):
        calls += [t_index] * len(chunks(tokenizer, text, args.chunk))
    selection = {}
    for name in scorers:
        default = THRESHOLDS.get(name)
        for budget in (1, 2, 4):
            for threshold in sorted({None, default, *CANDIDATE_THRESHOLDS[name]}, key=lambda x: -1 if x is None else x):
                for margin in CANDIDATE_MARGINS[name]:
                    own, other = 0, 0
                    for i, score in enumerate(full_scores[name]):
                        chosen = select_injections(
                            score.float(), sizes_tokens, calls, budget * args.chunk, threshold, 1, margin
                        )
                        own += any(owners[c] == i for c in chosen)
                        other += sum(sizes_tokens[c] for c in chosen if owners[c] != i)
                    selection[f"{name} budget={budget} threshold={threshold} margin={margin}"] = {
                        "own_passage_read": own / len(queries),
                        "own_passage_read_ci95": wilson(own, len(queries)),
                        "other_tokens_read_per_question": other / len(queries),
                    }

    # the "nothing relevant" decision at every store size: a store of n texts holding the question's passage (n-1
    # unrelated texts) vs. the same size of store asked an unrelated question
    own_blocks = {}
    for b_index, (owner, _) in enumerate(blocks):
        own_blocks.setdefault(owner, []).append(b_index)
    unrelated = own_blocks.get(-1, [])
    rng = random.Random(args.seed + 2)
    sizes = [n for n in (1, 10, 100, args.stored) if n <= args.stored]
    decision = {name: {} for name in scorers}
    unrelated_scores = {name: {} for name in scorers}  # per size: [(store, scores, question)] of unrelated asks
    for size in sizes:
        rows = {name: {"stored": [], "unrelated": []} for name in scorers}
        for i, terms in enumerate(queries[:100]):
            for kind, store, query_terms, q in (
                ("stored", own_blocks[i] + rng.sample(unrelated, min(len(unrelated), size - 1)), terms, i),
                ("unrelated", rng.sample(unrelated, min(len(unrelated), size)), negatives[i % len(negatives)],
                 -1 - (i % len(negatives))),
            ):
                small = lexical.LexicalIndex()
                for b_index in store:
                    small.add(b_index, blocks[b_index][1])
                for name, scorer in scorers.items():
                    score = scorer(q, query_terms, small, store)
                    best = score[: len(own_blocks[i])] if kind == "stored" else score
                    rows[name][kind].append(float(best.max()))
                    if kind == "unrelated":
                        unrelated_scores[name].setdefault(size, []).append((store, score, i % len(negatives)))
        for name in scorers:
            decision[name][size] = rows[name]
    holds = {}  # (unrelated question, block) -> whether the block holds one of the question's answers

    def unrelated_reads(name: str, size: int, threshold: float) -> dict:
        reads = []
        for store, score, j in unrelated_scores[name][size]:
            read = [store[k] for k in (score >= threshold).nonzero().flatten().tolist()]
            for block in read:
                if (j, block) not in holds:
                    holds[j, block] = holds_answer(unasked[j]["answers"], block_texts[block])
            reads.append([(block, holds[j, block]) for block in read])
        return unrelated_breakdown(reads)

    threshold_rows = {}
    for name in scorers:
        all_pos = [s for d in decision[name].values() for s in d["stored"]]
        all_neg = [s for d in decision[name].values() for s in d["unrelated"]]
        cuts = sorted(set(round(x, 3) for x in all_pos + all_neg))
        best = max(cuts, key=lambda t: sum(s >= t for s in all_pos) / len(all_pos)
                   + sum(s < t for s in all_neg) / len(all_neg))
        for size, d in decision[name].items():
            row = {}
            candidates = [("default", THRESHOLDS.get(name)), ("best_over_sizes", best)]
            candidates += [(f"threshold {t}", t) for t in CANDIDATE_THRESHOLDS[name]]
            for label, t in candidates:
                if t is None:
                    continue
                tp, fp = sum(s >= t for s in d["stored"]), sum(s >= t for s in d["unrelated"])
                row[label] = {
                    "threshold": t,
                    "stored_read": tp / len(d["stored"]),
                    "stored_read_ci95": wilson(tp, len(d["stored"])),
                    "unrelated_read": fp / len(d["unrelated"]),
                    "unrelated_read_ci95": wilson(fp, len(d["unrelated"])),
                    "unrelated_reads": unrelated_reads(name, size, t),
                }
            row["quantiles_10_50_90"] = {
                k: [round(q, 3) for q in torch.tensor(v).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()]
                for k, v in d.items()
            }
            threshold_rows[f"{name} | {size} stored texts"] = row
    results = {
        "recall": {f"{name} (user words) [chat]": recall_row(r) for name, r in ranks.items()},
        "decision": threshold_rows,
        "selection (budget in updates of --chunk tokens, neighbours 1)": selection,
        "store": {"texts": len(texts), "blocks": len(blocks), "terms": sum(len(t) for _, t in blocks)},
        "timing": {"analyse_s": analyse_s, "index_s": index_s, "score_per_question_s": score_s},
        "meta": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps({k: results[k] for k in ("recall", "store", "timing")}, indent=1))
    for key, row in threshold_rows.items():
        print(key, row["quantiles_10_50_90"], {
            k: (v["threshold"], v["stored_read"], v["unrelated_read"],
                v["unrelated_reads"].get("read_a_block_holding_an_answer"),
                v["unrelated_reads"].get("most_read_block_share"))
            for k, v in row.items() if k != "quantiles_10_50_90"})
    for key, row in selection.items():
        own, other = row["own_passage_read"], row["other_tokens_read_per_question"]
        print(f"{key:60s} own read {own:.3f}  other tokens {other:.0f}")
    out = args.json or Path(f"docs/results/lexical_recall_{args.data}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
