"""Per-unit costs of the evaluation plan, measured side by side in one process (what the plan's CPU estimate uses).

    python -m memoryllm_hf.evaluation.costs --threads 1            # SmolLM2, pool read, NQ, chat prompts

Injects 8 unrelated contexts, then times answers with the memory for 1 and for `--batch` questions in one batch
(interleaved, best of `--repeats`) and an answer without memory; prints JSON with the machine's load average.
"""

import argparse
import json
import os
import sys
import time


def measure(model, tokenizer, data, contexts: int = 8, batch: int = 16, repeats: int = 2) -> dict:
    from .data import SOURCE_FIELD
    from .prompts import Prompter
    from .retention import ask_batch, unrelated_contexts
    from .runner import greedy_config

    found = unrelated_contexts(data.unrelated, tokenizer, SOURCE_FIELD[data.dataset], 512)[:contexts]
    started = time.perf_counter()
    for context in found:
        model.inject(context.ids, progress=False)
    inject = (time.perf_counter() - started) / max(len(found), 1)
    prompter = Prompter(tokenizer, "chat", model.config.max_position_embeddings)
    decoding = greedy_config(tokenizer, 16)
    rows = [({"chat": prompter.question(e["question"], reserve=16)}, e["answers"]) for e in data.examples[:batch]]
    times: dict[str, list[float]] = {"one": [], "batch": [], "no_memory": []}
    for _ in range(repeats):
        for name, part, use_memory in (("one", rows[:1], True), ("batch", rows, True), ("no_memory", rows[:1], False)):
            started = time.perf_counter()
            ask_batch(model, tokenizer, part, use_memory, decoding)
            times[name].append(time.perf_counter() - started)
    one, whole = min(times["one"]), min(times["batch"])
    return {
        "inject_s_per_context": inject,
        "ask_memory_batch1_s": one,
        f"ask_memory_batch{len(rows)}_s": whole,
        "ask_memory_per_row_in_batch_s": whole / len(rows),
        "batch_speedup_per_row": one / (whole / len(rows)),
        "ask_no_memory_s": min(times["no_memory"]),
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from .data import default_data_dir, load_data
    from .models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--read-mode", default="pool")
    parser.add_argument("--dataset", default="nq", choices=["squad", "nq"])
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, "cpu", "float32", 0, overrides={"read_mode": args.read_mode})
    data = load_data(args.data, args.dataset, args.batch)
    print(json.dumps(measure(model, tokenizer, data, batch=args.batch, repeats=args.repeats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
