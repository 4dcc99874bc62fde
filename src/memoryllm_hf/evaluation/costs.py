"""Per-unit costs of the evaluation plan, measured side by side in one process (what the plan's CPU estimate uses).

    python -m memoryllm_hf.evaluation.costs --threads 1            # SmolLM2, pool and retrieve reads, NQ, chat

Injects 8 unrelated contexts (once, into a model that serves every read mode asked for), then times, per read mode,
answers with the memory for 1 and for `--batch` questions in one batch (interleaved, best of `--repeats`), and an
answer without memory; prints JSON with the machine's load average before and after.
"""

import argparse
import json
import os
import sys
import time


def measure(model, tokenizer, data, contexts: int = 8, batch: int = 16, repeats: int = 2, read_modes=None) -> dict:
    from .data import SOURCE_FIELD
    from .modes import ReadModes
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
    modes = ReadModes(model, read_modes)
    times: dict[str, list[float]] = {"no_memory": []}
    load = os.getloadavg()
    for _ in range(repeats):
        for mode in modes.names:
            with modes.reading(mode):
                for name, part in (("one", rows[:1]), ("batch", rows)):
                    started = time.perf_counter()
                    ask_batch(model, tokenizer, part, True, decoding)
                    times.setdefault(f"{mode}/{name}", []).append(time.perf_counter() - started)
        started = time.perf_counter()
        ask_batch(model, tokenizer, rows[:1], False, decoding)
        times["no_memory"].append(time.perf_counter() - started)
    found = {"inject_s_per_context": inject}
    for mode in modes.names:
        one, whole = min(times[f"{mode}/one"]), min(times[f"{mode}/batch"])
        found[mode or "memory"] = {
            "ask_memory_batch1_s": one,
            f"ask_memory_batch{len(rows)}_s": whole,
            "ask_memory_per_row_in_batch_s": whole / len(rows),
            "batch_speedup_per_row": one / (whole / len(rows)),
        }
    found["ask_no_memory_s"] = min(times["no_memory"])
    found["loadavg_before"], found["loadavg_after"] = load, os.getloadavg()
    return found


def main(argv: list[str] | None = None) -> int:
    import torch

    from .data import default_data_dir, load_data
    from .models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--read-modes", nargs="+", default=["pool", "retrieve"], help="read modes to time")
    parser.add_argument("--dataset", default="nq", choices=["squad", "nq"])
    parser.add_argument("--data", default=default_data_dir())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, "cpu", "float32", 0)
    data = load_data(args.data, args.dataset, args.batch)
    found = measure(model, tokenizer, data, batch=args.batch, repeats=args.repeats, read_modes=args.read_modes)
    print(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
