"""Should the neighbouring updates of a retrieved update be read with it? A passage longer than K tokens is
injected as several updates; the question usually matches one of them best.

One memory, two read settings side by side: `retrieval_neighbors` 0 (only what scores well) and 1 (plus the updates
before and after of the same text). SQuAD passages injected one text each with a small K (so most are 3-4
updates), then every question asked (chat, greedy): how often the whole passage is read, how often any part of it,
and the answers' exact hit / F1.

Run: python -m benchmarks.retrieval_neighbors --questions 30 --update-tokens 64
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memoryllm_hf.evaluation.data import default_data_dir, load_data
from memoryllm_hf.evaluation.metrics import score_answer
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.greedy import generate, greedy_config
from memoryllm_hf.loading import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--update-tokens", type=int, default=64, help="K (passages become several updates)")
    parser.add_argument("--memory-tokens", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("docs/results/retrieval_neighbors.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    memory = {"num_memory_tokens": args.memory_tokens, "num_update_tokens": args.update_tokens}
    model, tokenizer = load("default", **memory)
    data = load_data(args.data, "squad", args.questions)
    own = []
    for example in tqdm(data.examples, desc="injecting passages"):
        first = model.num_injections + 1
        model.inject(example["context"], tokenizer=tokenizer)
        own.append(set(range(first, model.num_injections + 1)))
    prompter = Prompter(tokenizer, "chat", model.config.max_position_embeddings)
    decoding = greedy_config(tokenizer, args.max_new_tokens)
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "read_tokens": model.config.read_tokens,
              "margin": model.config.retrieval_margin, "updates_per_passage": sum(map(len, own)) / len(own), "rows": []}
    for neighbors in (0, 1):
        model.config.retrieval_neighbors = neighbors
        whole, part, hits, f1s = [], [], [], []
        for example, updates in tqdm(list(zip(data.examples, own, strict=True)), desc=f"neighbors={neighbors}"):
            answer = generate(model, tokenizer, [prompter.question(example["question"]).ids], True, decoding)[0]
            read = set(model.last_retrieval[0])
            whole.append(float(updates <= read))
            part.append(float(bool(updates & read)))
            scores = score_answer(answer, example["answers"])
            hits.append(scores["exact_hit"])
            f1s.append(scores["f1"])
        row = {
            "retrieval_neighbors": neighbors,
            "whole_passage_read": sum(whole) / len(whole),
            "part_of_passage_read": sum(part) / len(part),
            "exact_hit": sum(hits) / len(hits),
            "f1": sum(f1s) / len(f1s),
        }
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
