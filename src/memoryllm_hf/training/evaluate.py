"""Before/after check of a trained adapter: SQuAD answers from memory vs no memory vs in context, and perplexity
without memory against the base model.

`python -m memoryllm_hf.training.evaluate --adapter OUT/adapter --qa QA.jsonl --paragraphs TEXT.jsonl --out eval.json`
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..evaluation.data import read_jsonl
from ..evaluation.metrics import normalize_answer
from ..greedy import generate, greedy_config
from ..loading import torch_dtype
from .checkpoint import MODEL_CONFIG_FILE, load_trained_model
from .config import ModelConfig
from .model import build_model

PROMPT = "Question: {question}\nAnswer:"


def answer(model, tokenizer, prompt: str, use_memory: bool, max_new_tokens: int = 10) -> str:
    """First line of the greedy continuation of a plain prompt."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return generate(model, tokenizer, [ids], use_memory, greedy_config(tokenizer, max_new_tokens))[0].split("\n")[0]


def qa_accuracy(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Exact-hit accuracy (a normalized gold answer inside the normalized reply) in three settings: the context
    injected into a fresh memory, no context at all, and the context in the prompt."""
    hits = {"memory": 0, "no_memory": 0, "in_context": 0}
    for row in tqdm(rows, desc="QA", unit="question"):
        question = PROMPT.format(question=row["question"])
        gold = [normalize_answer(a) for a in row["answers"]]
        model.reset_memory()
        model.inject(row["context"], tokenizer=tokenizer)
        replies = {
            "memory": answer(model, tokenizer, question, True),
            "no_memory": answer(model, tokenizer, question, False),
            "in_context": answer(model, tokenizer, row["context"] + "\n" + question, False),
        }
        for setting, reply in replies.items():
            hits[setting] += any(g and g in normalize_answer(reply) for g in gold)
    model.reset_memory()
    return {setting: count / len(rows) for setting, count in hits.items()}


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_tokens: int = 512) -> float:
    """Token-level perplexity of the texts read without memory."""
    total_loss, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens].to(model.device)
        if ids.shape[1] < 2:
            continue
        loss = model(input_ids=ids, labels=ids, use_memory=False).loss.float().item()
        total_loss += loss * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    return math.exp(total_loss / total_tokens)


def evaluate(
    adapter: str, qa: str, paragraphs: str, max_questions: int, max_paragraphs: int, device: str, dtype: str
) -> dict:
    """Scores of the trained model and of the same model with fresh (identity) adapters, i.e. the base model with
    the training-free memory of its update rule."""
    questions, texts = read_jsonl(qa, max_questions), [r["text"] for r in read_jsonl(paragraphs, max_paragraphs)]
    trained, tokenizer = load_trained_model(adapter)
    untrained, _ = build_model(ModelConfig(**json.loads((Path(adapter) / MODEL_CONFIG_FILE).read_text())))
    results = {"questions": len(questions), "paragraphs": len(texts)}
    for name, model in (("trained", trained), ("untrained", untrained)):
        model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
        start = time.perf_counter()
        results[name] = {
            **qa_accuracy(model, tokenizer, questions),
            "ppl_no_memory": perplexity(model, tokenizer, texts),
        }
        results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        model.to("cpu")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder written by training (OUT/adapter)")
    parser.add_argument("--qa", required=True, help="jsonl with context, question, answers (held out of training)")
    parser.add_argument("--paragraphs", required=True, help="jsonl with text, for perplexity (held out of training)")
    parser.add_argument("--max-questions", type=int, default=60)
    parser.add_argument("--max-paragraphs", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = evaluate(
        args.adapter, args.qa, args.paragraphs, args.max_questions, args.max_paragraphs, args.device, args.dtype
    )
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
