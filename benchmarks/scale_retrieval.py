"""Scale of the long-term memory: questions on passages injected first, answered again after up to 320 unrelated
512-token contexts (164k tokens, past M+'s 160k), with the time one read takes as the store grows.

The plain user path: `model.inject` of each question's passage (one call each), then the unrelated contexts, in
order; at each checkpoint every question is asked once (chat prompt, greedy) with retrieval reads, and we record
whether the question's own passage was among the injections read (recall), exact hit and F1 of the answer, and the
wall time of one question. Results are written after every checkpoint (`--json`), so a killed run keeps what it had.

Run: python -m benchmarks.scale_retrieval --dataset squad --questions 10 --contexts 320 --checkpoints 0 40 80 160 320
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memoryllm_hf.evaluation.data import default_data_dir, load_data
from memoryllm_hf.evaluation.metrics import score_answer
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.evaluation.retention import unrelated_contexts
from memoryllm_hf.greedy import generate, greedy_config
from memoryllm_hf.loading import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("squad", "nq"), default="squad")
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--contexts", type=int, default=320, help="unrelated contexts after the passages")
    parser.add_argument("--context-tokens", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 40, 80, 160, 320])
    parser.add_argument("--store-tokens", type=int, default=180_000, help="long_term_memory_tokens (slots per layer)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("docs/results/scale_retrieval.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/results/scale_retrieval.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load("default", long_term_memory_tokens=args.store_tokens)
    cfg = model.config
    data = load_data(args.data, args.dataset, args.questions)
    articles = {example.get("article", example.get("title")) for example in data.examples}
    field = "article" if args.dataset == "squad" else "title"
    others = [text for text in data.unrelated if text.get(field) not in articles]
    contexts = unrelated_contexts(others, tokenizer, field, args.context_tokens)
    if len(contexts) < args.contexts:
        contexts = (contexts * (args.contexts // max(1, len(contexts)) + 1))[: args.contexts]  # reuse, in order
    contexts = contexts[: args.contexts]
    prompter = Prompter(tokenizer, "chat", cfg.max_position_embeddings)
    prompts = [prompter.question(example["question"]).ids for example in data.examples]
    decoding = greedy_config(tokenizer, args.max_new_tokens)

    passage_injections = []
    for example in data.examples:
        first = model.num_injections + 1
        model.inject(example["context"], tokenizer=tokenizer)
        passage_injections.append(list(range(first, model.num_injections + 1)))
    result = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "model": {k: getattr(cfg, k) for k in ("num_memory_tokens", "num_update_tokens", "read_mode", "read_tokens",
                                               "retrieval_margin", "retrieval_neighbors", "long_term_memory_tokens",
                                               "long_term_memory_dtype")},
        "rows": [],
    }
    written = 0
    for checkpoint in tqdm(sorted(args.checkpoints), desc="checkpoints"):
        for context in tqdm(contexts[written:checkpoint], desc=f"contexts to {checkpoint}", leave=False):
            model.inject(context.ids)
        written = max(written, checkpoint)
        hits, f1s, recalls, seconds = [], [], [], []
        for prompt, example, own in zip(prompts, data.examples, passage_injections, strict=True):
            start = time.perf_counter()
            answer = generate(model, tokenizer, [prompt], True, decoding)[0]
            seconds.append(time.perf_counter() - start)
            read = model.last_retrieval[0]
            recalls.append(float(bool(set(read) & set(own))))
            scores = score_answer(answer, example["answers"])
            hits.append(scores["exact_hit"])
            f1s.append(scores["f1"])
        store_tokens = sum(block.num_slots for block in model.long_term_memory)
        row = {
            "contexts_after": checkpoint,
            "stored_injections": len(model.long_term_memory),
            "stored_tokens": store_tokens,
            "store_bytes": sum(block.slots.numel() * block.slots.element_size() for block in model.long_term_memory),
            "recall": sum(recalls) / len(recalls),
            "exact_hit": sum(hits) / len(hits),
            "f1": sum(f1s) / len(f1s),
            "seconds_per_question": sorted(seconds)[len(seconds) // 2],
        }
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    plot(result["rows"], args.plot)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [row["stored_tokens"] / 1000 for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(tokens, [row["recall"] for row in rows], "o-", label="passage read (recall)")
    left.plot(tokens, [row["exact_hit"] for row in rows], "s-", label="exact hit")
    left.set_ylim(-0.05, 1.05)
    left.set_xlabel("stored tokens (thousands)")
    left.set_title("Questions on the first passages")
    left.legend()
    right.plot(tokens, [row["seconds_per_question"] for row in rows], "o-")
    right.set_xlabel("stored tokens (thousands)")
    right.set_ylabel("seconds per question (median)")
    right.set_title("One read as the store grows")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
