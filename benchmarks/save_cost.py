"""Save cost benchmark: what a memory save writes and how long it takes after a one-sentence inject, with the
journal (`model.save_memory`: one appended record; every `MAX_JOURNAL_RECORDS` records a compaction) against a full
save (`save_memory(compact=True)`: the pool and store files rewritten, what every save did before the journal), side
by side in one process on one folder, and what a load costs with a full journal to replay.

Bytes are those the process wrote (`wchar` of /proc/self/io) during the save; times are wall-clock medians.

Run: python -m benchmarks.save_cost --rounds 16 [--model tiny]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from memoryllm_hf import load
from memoryllm_hf.commands import load_folder
from memoryllm_hf.modeling import MAX_JOURNAL_RECORDS
from memoryllm_hf.modeling.memory_files import journal_record_paths

SENTENCE = "Our office dog is a beagle named Biscuit and he sleeps under Maria's desk every afternoon."
PRIMING = [f"Note {i}: the meeting about project {i} moved to room {100 + i} on day {i % 7}." for i in range(8)]


def written_bytes() -> int:
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("wchar")).split()[1])


def timed(fn):
    start_bytes, start = written_bytes(), time.perf_counter()
    fn()
    return time.perf_counter() - start, written_bytes() - start_bytes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default (SmolLM2) or tiny")
    parser.add_argument("--rounds", type=int, default=MAX_JOURNAL_RECORDS, help="inject + save rounds per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load-at", type=int, default=150, help="time a load when the journal holds this many records")
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="save-cost-"))
    try:
        model, tokenizer = load(args.model)
        model.save_pretrained(scratch / "model")
        tokenizer.save_pretrained(scratch / "model")
        folder = scratch / "model"
        model, tokenizer = load_folder(folder)
        for text in PRIMING:
            model.inject(text, tokenizer=tokenizer)
        model.save_memory(folder, compact=True)
        rows = {"inject_s": [], "journal_s": [], "journal_bytes": [], "full_s": [], "full_bytes": []}
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for variant in ("journal", "full"):  # side by side, alternating
                start = time.perf_counter()
                model.inject(SENTENCE, tokenizer=tokenizer)
                rows["inject_s"].append(time.perf_counter() - start)
                seconds, written = timed(lambda v=variant: model.save_memory(folder, compact=v == "full"))
                rows[f"{variant}_s"].append(seconds)
                rows[f"{variant}_bytes"].append(written)
        # the journal alone, a whole cycle: appends up to its bound, a load replaying it, and the compaction after
        model.save_memory(folder, compact=True)
        appends = {"s": [], "bytes": []}
        load_s = {}
        with tqdm(desc="journal cycle") as bar:
            while True:
                model.inject(SENTENCE, tokenizer=tokenizer)
                records = len(journal_record_paths(folder))
                seconds, written = timed(lambda: model.save_memory(folder))
                appends["s"].append(seconds)
                appends["bytes"].append(written)
                bar.update()
                if not journal_record_paths(folder):  # this save compacted
                    break
                if "journal" not in load_s and records + 1 >= args.load_at:
                    start = time.perf_counter()
                    load_folder(folder)
                    load_s["journal"] = time.perf_counter() - start
                    load_s["journal_records"] = records + 1
        start = time.perf_counter()
        load_folder(folder)
        load_s["compacted"] = time.perf_counter() - start
        inject = statistics.median(rows["inject_s"])
        result = {
            "model": args.model,
            "rounds": args.rounds,
            "pool": list(model.memory.shape),
            "filled": model.num_filled_slots,
            "inject_s": inject,
            "journal_append_s": statistics.median(rows["journal_s"]),
            "journal_append_bytes": statistics.median(rows["journal_bytes"]),
            "full_save_s": statistics.median(rows["full_s"]),
            "full_save_bytes": statistics.median(rows["full_bytes"]),
            "journal_amortised_s": statistics.mean(appends["s"]),
            "journal_amortised_bytes": statistics.mean(appends["bytes"]),
            "journal_cycle_saves": len(appends["s"]),
            "journal_append_bytes_max": max(appends["bytes"][:-1] or [0]),
            "compaction_s": appends["s"][-1],
            "compaction_bytes": appends["bytes"][-1],
            "inject_plus_append_vs_inject": (inject + statistics.median(rows["journal_s"])) / inject,
            "inject_plus_amortised_vs_inject": (inject + statistics.mean(appends["s"])) / inject,
            "inject_plus_full_vs_inject": (inject + statistics.median(rows["full_s"])) / inject,
            "load_with_journal_s": load_s.get("journal"),
            "load_journal_records": load_s.get("journal_records"),
            "load_compacted_s": load_s["compacted"],
            "folder_mb": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20,
        }
        print(json.dumps(result, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
