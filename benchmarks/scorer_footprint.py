"""What the text scorers cost per stored token with a disk-backed store, and what the persisted index saves.

    python -m benchmarks.scorer_footprint --model tiny --texts 3000 --threads 1 --json OUT.json
    python -m benchmarks.scorer_footprint --model smollm2 --texts 300 --threads 1 --json OUT.json

A model with `long_term_memory_storage="disk"` stores `--texts` short synthetic facts (one injection each; a long
one is several blocks), then scores one question with "bm25", then with "bm25+encoder" (the encoder's weights are
loaded on an empty store first, so they are not counted per token). Measured: the growth of the process's anonymous
memory (RssAnon: the mapped slots are file-backed and not counted) after the injections (blocks, token ids), after
the BM25 index is built, after the encoder embeddings are computed; the bytes of what is held, counted exactly
(token ids, embeddings) or with tracemalloc (the BM25 index: Python objects); and the segment files on disk.
Then the folder is saved (with its retrieval index) and loaded again: the first question's retrieval time with the
persisted index against the same load with the index dropped (every block indexed again), in one run, per scorer.
"""

import argparse
import ctypes
import gc
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from benchmarks.serve_ask import fact

QUESTION = "Where does Mira Tobin-13 keep the lantern?"


def rss_anon() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon"))


def settle() -> int:
    gc.collect()
    return rss_anon()


def question_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": QUESTION}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = QUESTION
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def build(model_name: str):
    settings = dict(long_term_memory_storage="disk", read_mode="retrieve", retrieval_scorer="bm25")
    if model_name == "tiny":
        from memoryllm_hf.tiny import tiny_model, tiny_tokenizer

        model = tiny_model(memory_update="input", fresh_pool="grow", long_term_memory_tokens=1 << 24,
                           num_memory_tokens=64, num_update_tokens=32, inject_chunk_size=32, read_tokens=64,
                           **settings)
        tokenizer = tiny_tokenizer()
        model.retrieval_tokenizer = tokenizer
        return model.eval(), tokenizer
    from memoryllm_hf import load

    return load("default", long_term_memory_tokens=1 << 22, **settings)


def first_question(folder: Path, scorer: str, ids: torch.Tensor, with_index: bool) -> float:
    from memoryllm_hf import load

    model, _ = load(folder, retrieval_scorer=scorer)
    if not with_index:
        model.reads["retrieve"].scoring.adopt(None, "benchmark")  # as if the folder had no index
    start = time.perf_counter()
    model.retrieve(ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: freed heap is returned (see tests)
    except (OSError, AttributeError):
        pass
    from tqdm import tqdm

    model, tokenizer = build(args.model)
    ids = question_ids(tokenizer)
    scoring = model.reads["retrieve"].scoring
    model.config.retrieval_scorer = "bm25+encoder"
    model.retrieve(ids)  # (empty store: the encoder's weights load now, not counted per token)
    model.config.retrieval_scorer = "bm25"
    start = settle()
    with torch.no_grad():
        for i in tqdm(range(args.texts), desc="Injecting"):
            model.inject(fact(i), tokenizer=tokenizer)
    store = model.long_term_memory
    tokens = sum(block.num_slots for block in store)
    after_store = settle()
    tracemalloc.start()
    model.retrieve(ids)
    index_traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    after_bm25 = settle()
    model.config.retrieval_scorer = "bm25+encoder"
    model.retrieve(ids)
    after_encoder = settle()
    assert "model" not in scoring.parts  # no model features for the text scorers
    token_ids = sum(block.token_ids.numel() * block.token_ids.element_size() for block in store)
    embeddings = sum(vector.numel() * vector.element_size() for vector in scoring.parts["encoder"].embeddings.values())
    segments = {block.source for block in store if block.source}
    disk = sum(os.path.getsize(path) for path in segments)
    L, _, d = store[0].slots.shape
    result = {
        "model": args.model,
        "texts": args.texts,
        "blocks": len(store),
        "stored_tokens": tokens,
        "slots_dtype": str(store[0].slots.dtype).removeprefix("torch."),
        "ram_bytes_per_token": {
            "store_blocks_and_token_ids_rss": (after_store - start) / tokens,
            "token_ids": token_ids / tokens,
            "bm25_index_rss": (after_bm25 - after_store) / tokens,
            "bm25_index_tracemalloc": index_traced / tokens,
            "encoder_embeddings_rss": (after_encoder - after_bm25) / tokens,
            "encoder_embeddings": embeddings / tokens,
            "model_features": 0,
            "total_rss_bm25": (after_bm25 - start) / tokens,
            "total_rss_bm25_encoder": (after_encoder - start) / tokens,
        },
        "disk_bytes_per_token": {
            "segments_measured": disk / tokens,
            "slots_bfloat16": L * d * 2,
            "slots_float32": L * d * 4,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        gc.collect()
        if args.model == "smollm2":
            timings = {}
            for scorer in ("bm25", "bm25+encoder"):
                runs = [(with_index, first_question(folder, scorer, ids, with_index))
                        for with_index in (True, False, True, False)]
                timings[scorer] = {
                    "first_question_s_with_index": min(t for w, t in runs if w),
                    "first_question_s_reindexing": min(t for w, t in runs if not w),
                }
            result["first_question"] = timings
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
