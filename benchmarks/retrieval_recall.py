"""Retrieval benchmark: does the training-free scorer (`modeling/memory_retrieval.py`) find a question's injection?

Passages are injected one after another into a fresh SmolLM2 pool ("input" rule, chunked like `inject`); each
update's slots become one stored block and its features are kept. Questions are read as at generation time (chat
or plain prompt, memory-less forward) and every stored block is scored. Reported per scorer variant:
recall@1 / recall@4 of the question's own injection (a hit is any update of its passage), and, for the default,
the best block's score for questions whose passage is stored vs. not stored (threshold precision/recall), the
feature bytes per stored token and the time to score 100k stored tokens next to one question prefill.

Data sets: squad / nq (dev: /work/shared/data style folder), heldout (SQuAD articles kept out of calibration), and
counterfact / zsre (stored: edit_text sentences; positives: the edit prompts; negatives: neighbourhood prompts).

Run (one thread; ~20 min each on a shared 2-core CPU):
  python -m benchmarks.retrieval_recall --data squad --questions 100 --stored 200 --unstored 50
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from memoryllm_hf.evaluation.data import default_data_dir
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.loading import load
from memoryllm_hf.modeling import memory_lexical as lexical
from memoryllm_hf.modeling import memory_retrieval as retrieval

from .lexical_recall import recall_row

DATA = {"squad": "squad_qa", "nq": "nq_qa", "heldout": "squad_heldout_qa", "counterfact": "counterfact", "zsre": "zsre"}
OTHERS = {"squad": "squad_paragraphs", "nq": "nq_passages", "heldout": "squad_train_paragraphs"}
# Scorer variants: the default fusion and its parts, plus the simple baseline (mean-pooled slot cosine).
MEAN_POOL_LAYER = 12
DEFAULT = "default (lexical + keys)"
VARIANTS = {
    DEFAULT: None,
    "lexical only": {"lexical": 1.0},
    f"keys only (attention mass, layers {','.join(map(str, retrieval.KEY_LAYERS))})": {"keys": 1.0},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_case(args, tokenizer) -> tuple[list[tuple[str, int]], list[dict]]:
    """(texts to store with the index of the question set they answer or -1, questions) of one data set.

    Questions: {"prompt": (style, text, kind), "owner": index of its stored text or -1 (not stored), "role"}."""
    rng = random.Random(args.seed)
    rows = read_jsonl((args.heldout_dir if args.data == "heldout" else args.data_dir) / f"{DATA[args.data]}.jsonl")
    rng.shuffle(rows)
    if args.data in ("counterfact", "zsre"):
        kind = "sentence" if args.data == "counterfact" else "question"
        stored, unstored = rows[: args.stored], rows[args.stored : args.stored + args.unstored]
        texts = [(r["edit_text"], i) for i, r in enumerate(stored)]
        questions = [
            {"text": r["prompt"], "kind": kind, "owner": i, "role": "edit prompt"}
            for i, r in enumerate(stored[: args.questions])
        ]
        questions += [
            {"text": r["neighborhood_prompts"][0]["prompt"], "kind": kind, "owner": -1, "role": "neighbourhood"}
            for r in stored[: args.questions]
        ]
        questions += [{"text": r["prompt"], "kind": kind, "owner": -1, "role": "not stored"} for r in unstored]
    else:
        asked, unstored = rows[: args.questions], rows[args.questions : args.questions + args.unstored]
        taken = {r["context"] for r in asked + unstored}
        other_folder = args.data_dir if args.data != "heldout" else args.heldout_dir
        others = [p["text"] for p in read_jsonl(other_folder / f"{OTHERS[args.data]}.jsonl") if p["text"] not in taken]
        if args.data == "heldout":  # the held-out articles' own paragraphs first (hard negatives)
            own = [p["text"] for p in read_jsonl(args.heldout_dir / "squad_heldout_paragraphs.jsonl")]
            others = [t for t in own if t not in taken] + others
        else:
            rng.shuffle(others)
        texts = [(r["context"], i) for i, r in enumerate(asked)]
        texts += [(t, -1) for t in others[: max(0, args.stored - len(asked))]]
        questions = [{"text": r["question"], "kind": "qa", "owner": i, "role": "stored"} for i, r in enumerate(asked)]
        questions += [{"text": r["question"], "kind": "qa", "owner": -1, "role": "not stored"} for r in unstored]
    rng.shuffle(texts)
    return texts, questions


def prompt_ids(prompter: Prompter, question: dict) -> list[int]:
    if question["kind"] == "qa":
        return prompter.question(question["text"]).ids
    return prompter.completion(question["text"], "x", question["kind"])[0]


def store_blocks(model, tokenizer, texts) -> tuple[list[dict], list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Inject every text in order; (features of each update, owner of each update, mean-pooled slots per update,
    token ids of each update)."""
    layers, chunk = model.model.layers, model.config.inject_chunk_size
    features, owners, pooled, token_ids = [], [], [], []
    with torch.no_grad():
        for text, owner in tqdm(texts, desc="injecting", unit="text"):
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            for part in torch.tensor_split(ids, -(-ids.numel() // chunk)):
                slots = model.new_memory_slots(part[None])
                model.commit_memory_slots(slots, input_ids=part)
                features.append(retrieval.block_features(layers, slots))
                owners.append(owner)
                pooled.append(slots[MEAN_POOL_LAYER].float().mean(0))
                token_ids.append(part)
    return features, owners, pooled, token_ids


class LexicalVariants:
    """BM25 over the blocks' words (user words of the prompt only), optionally the sentence encoder, and fusions
    with the model-feature default, scored side by side with the model-feature variants."""

    def __init__(self, tokenizer, token_ids: list[torch.Tensor], dense: bool):
        self.tokenizer, self.analyzer = tokenizer, lexical.Analyzer()
        self.markers = lexical.chat_markers(tokenizer)
        self.index = lexical.LexicalIndex()
        for key, ids in enumerate(tqdm(token_ids, desc="BM25 index", unit="block")):
            self.index.add(key, lexical.block_terms(self.analyzer, tokenizer.decode, ids))
        self.keys = list(range(len(token_ids)))
        self.encoder = self.embeddings = None
        if dense:
            from memoryllm_hf.modeling.memory_dense import SentenceEncoder

            self.encoder = SentenceEncoder()
            texts = [tokenizer.decode(ids) for ids in token_ids]
            self.embeddings = torch.cat(
                [self.encoder.encode(texts[i : i + 64]) for i in tqdm(range(0, len(texts), 64), desc="encoder")]
            )

    def scores(self, prompt_ids: torch.Tensor, default: torch.Tensor) -> dict[str, torch.Tensor]:
        words = lexical.user_text(self.tokenizer.decode(prompt_ids.tolist()), self.markers)
        bm25, relevance = self.index.scores(self.analyzer.terms(words), self.keys)
        out = {
            "BM25 (user words)": bm25,
            "BM25 relevance (user words)": relevance,
            "BM25 + default, reciprocal-rank fusion": lexical.reciprocal_rank(bm25)
            + lexical.reciprocal_rank(default.double()),
        }
        if self.encoder is not None:
            dense = (self.embeddings @ self.encoder.encode([words])[0]).double()
            out["sentence encoder (user words)"] = dense
            out["BM25 relevance + sentence encoder"] = relevance + dense
            out["BM25 + sentence encoder, reciprocal-rank fusion"] = lexical.reciprocal_rank(
                bm25
            ) + lexical.reciprocal_rank(dense)
            out["BM25 + sentence encoder + default, reciprocal-rank fusion"] = (
                lexical.reciprocal_rank(bm25) + lexical.reciprocal_rank(dense) + lexical.reciprocal_rank(default.double())
            )
            for weight in (0.02, 0.05):
                out[f"BM25 relevance + sentence encoder + {weight} x default"] = relevance + dense + weight * default

        return out


def ranks(scores: torch.Tensor, owners: list[int], owner: int) -> int:
    """0-based rank of the question's best-ranked own block."""
    own = torch.tensor([o == owner for o in owners])
    order = scores.argsort(descending=True, stable=True)
    return int(own[order].nonzero()[0, 0])


def threshold_report(positive: list[float], negative: list[float], threshold: float) -> dict:
    tp = sum(s > threshold for s in positive)
    fp = sum(s > threshold for s in negative)
    return {
        "threshold": threshold,
        "recall": tp / max(1, len(positive)),
        "precision": tp / max(1, tp + fp),
        "false_positive_rate": fp / max(1, len(negative)),
    }


def best_threshold(positive: list[float], negative: list[float]) -> float:
    """The threshold with the best balanced accuracy on these scores (for information; the default is fixed)."""
    candidates = sorted(positive + negative)
    cuts = [(a + b) / 2 for a, b in zip(candidates, candidates[1:])] or candidates
    return max(
        cuts,
        key=lambda t: sum(s > t for s in positive) / max(1, len(positive))
        + sum(s <= t for s in negative) / max(1, len(negative)),
    )


def time_scoring(features: list[dict], question: dict, target_tokens: int, repeats: int) -> tuple[float, int]:
    """Median seconds to score one question against >= target_tokens stored tokens (the blocks repeated)."""
    tokens = sum(f["tokens"].shape[0] for f in features)
    many = features * -(-target_tokens // tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        retrieval.score_blocks(question, many)
        times.append(time.perf_counter() - start)
    return statistics.median(times), sum(f["tokens"].shape[0] for f in many)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=tuple(DATA), default="squad")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument("--heldout-dir", type=Path, default=Path("data/train"))
    parser.add_argument("--questions", type=int, default=100, help="questions whose passage is stored")
    parser.add_argument("--stored", type=int, default=200, help="stored texts (questions' passages + unrelated ones)")
    parser.add_argument("--unstored", type=int, default=50, help="questions whose passage is not stored")
    parser.add_argument("--styles", nargs="+", default=["chat", "plain"], choices=("chat", "plain"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threshold", type=float, default=6.5,
        help="a retrieval_threshold to report (config.retrieval_threshold; 6.5: the SmolLM2 calibration's suggestion)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-tokens", type=int, default=100_000, help="stored tokens for the scoring time")
    parser.add_argument("--json", type=Path, help="default: docs/results/retrieval_recall_<data>.json")
    parser.add_argument("--dense", action="store_true", help="also the optional sentence-encoder scorer and fusions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load("default")
    texts, questions = build_case(args, tokenizer)
    features, owners, pooled, token_ids = store_blocks(model, tokenizer, texts)
    lexical_scorer = LexicalVariants(tokenizer, token_ids, args.dense)
    pooled = torch.stack(pooled)
    stored_tokens = sum(f["tokens"].shape[0] for f in features)
    bytes_per_token = sum(t.numel() * t.element_size() for f in features for t in f.values()) / stored_tokens

    layers = model.model.layers
    packed = retrieval.pack_blocks(features, model.device)  # scored many times: packed once
    results = {"variants": {}, "threshold": {}, "questions": {}}
    timing = {}
    for style in args.styles:
        prompter = Prompter(tokenizer, style, model.config.max_position_embeddings)
        scores = {name: [] for name in VARIANTS}
        scores[f"mean-pooled slots, layer {MEAN_POOL_LAYER} (cosine)"] = []
        for question in tqdm(questions, desc=f"questions ({style})", unit="q"):
            ids = torch.tensor([prompt_ids(prompter, question)])
            with torch.no_grad():
                states = model(ids, use_memory=False, output_hidden_states=True).hidden_states
            feats = retrieval.question_features(layers, states, torch.ones_like(ids))
            for name, weights in VARIANTS.items():
                scores[name].append(retrieval.score_packed(feats, packed, weights)[0])
            default = scores[DEFAULT][-1]
            for name, row in lexical_scorer.scores(ids[0], default).items():
                scores.setdefault(name, []).append(row)
            mean = states[MEAN_POOL_LAYER][0].float().mean(0)
            scores[f"mean-pooled slots, layer {MEAN_POOL_LAYER} (cosine)"].append(
                torch.nn.functional.cosine_similarity(mean[None], pooled)
            )
        if "question" not in timing:
            start = time.perf_counter()
            with torch.no_grad():
                model(ids)  # one prefill reading the pool (N slots per layer)
            timing["question_prefill_with_pool_s"] = time.perf_counter() - start
            timing["score_s"], timing["scored_tokens"] = time_scoring(features, feats, args.time_tokens, 3)
            timing["question"] = question["text"]
        for name, rows in scores.items():
            positive = [i for i, q in enumerate(questions) if q["owner"] >= 0]
            found = [ranks(rows[i], owners, questions[i]["owner"]) for i in positive]
            results["variants"][f"{name} [{style}]"] = recall_row(found)
        best = [float(s.max()) for s in scores[DEFAULT]]
        by_role = {}
        for question, score in zip(questions, best):
            by_role.setdefault(question["role"], []).append(score)
        positive = [s for q, s in zip(questions, best) if q["owner"] >= 0]
        negative = [s for q, s in zip(questions, best) if q["owner"] < 0]
        results["threshold"][style] = {
            "default": threshold_report(positive, negative, args.threshold),
            "best_on_this_data": threshold_report(positive, negative, best_threshold(positive, negative)),
            "best_scores": {"stored": positive, "not_stored": negative},
            "best_score_quantiles": {
                role: [round(statistics.quantiles(v, n=10)[i], 3) for i in (0, 4, 8)] if len(v) > 1 else v
                for role, v in by_role.items()
            },
        }
    results["store"] = {
        "texts": len(texts),
        "injections": len(features),
        "stored_tokens": stored_tokens,
        "feature_bytes_per_token": bytes_per_token,
        "key_layers": list(retrieval.KEY_LAYERS),
        "weights": retrieval.SCORE_WEIGHTS,
    }
    results["timing"] = timing
    results["meta"] = {k: str(v) for k, v in vars(args).items()}
    for name, row in results["variants"].items():
        print(f"{name:60s} R@1 {row['recall@1']:.3f}  R@4 {row['recall@4']:.3f}  mean rank {row['mean_rank']:.2f}")
    print(json.dumps({k: results[k] for k in ("threshold", "store", "timing")}, indent=1))
    out = args.json or Path(f"docs/results/retrieval_recall_{args.data}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
