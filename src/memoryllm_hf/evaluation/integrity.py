"""Integrity (paper §4.6): inject contexts endlessly and check that the model keeps working.

QA mode: QA contexts are injected in a shuffled order (reshuffled at every pass over the data); after each injection
(or every `probe_every` injections) the question about the context just injected is asked. Probes: "generate"
(greedy answer of 16 tokens, exact hit after the first-line post-processing) or "teacher-forced" (one forward pass
over the prompt plus each gold answer; success when every answer token is the argmax, i.e. greedy decoding would
*start* with a gold answer: cheap, but strict for chatty models; SmolLM2 prefixes answers with a sentence, 0/8 vs 3/8
for "generate" on SQuAD). Tiny mode (no QA): random token chunks into a random tiny model, memory statistics only.

Rows are recorded every `record_every` injections: running and window accuracy, slot-norm statistics, the count of
non-finite values in the pool, and seconds per update. Several read modes in one run (`read_modes`, see `modes`):
one chain of injections, every mode probes in turn and keeps its own running accuracy (one row per mode).
"""

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling import MemoryState
from .metrics import exact_hit, first_line, wilson_interval
from .modes import ReadModes
from .prompts import Prompter
from .records import RecordLog
from .runner import Timer, continuation_scores, generate, greedy_config


@torch.no_grad()
def memory_statistics(model) -> dict:
    """Norms of the filled slots and the number of non-finite values anywhere in the pool."""
    pool = model.memory.float()
    filled = pool[:, pool.shape[1] - model.num_filled_slots :]
    norms = filled.norm(dim=-1)
    finite = norms[torch.isfinite(norms)]
    return {
        "filled_slots": model.num_filled_slots,
        "norm_mean": float(finite.mean()) if finite.numel() else math.nan,
        "norm_max": float(finite.max()) if finite.numel() else math.nan,
        "nonfinite": int((~torch.isfinite(pool)).sum()),
    }


def shuffled_forever(items: Sequence, seed: int):
    """Items in a fresh random order on every pass (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(items), generator=generator).tolist():
            yield items[index]


def probe(model, tokenizer, prompter: Prompter, example: dict, mode: str, pad_id: int, max_new_tokens: int) -> bool:
    if mode == "teacher-forced":
        pairs = [prompter.completion(example["question"], answer, "question") for answer in example["answers"]]
        return any(score["greedy"] for score in continuation_scores(model, pairs, True, pad_id))
    prompt = prompter.question(example["question"], reserve=max_new_tokens)
    generation = generate(model, tokenizer, [prompt.ids], True, greedy_config(tokenizer, max_new_tokens))[0]
    return bool(exact_hit(first_line(generation), example["answers"]))


def row_steps(updates: int, record_every: int) -> list[int]:
    """The injections after which a row is recorded."""
    return [step for step in range(1, updates + 1) if step % record_every == 0 or step == updates]


def checkpoint_path(log: RecordLog, step: int) -> Path | None:
    """Where the memory after `step` injections is kept (beside the record log) so a run can resume there."""
    return None if log.path is None else log.path.with_name(f"{log.path.name}.memory-{step}.safetensors")


def run_integrity(
    model,
    tokenizer,
    examples: Sequence[dict] | None,
    updates: int,
    style: str = "chat",
    probe_mode: str = "generate",
    record_every: int = 100,
    seed: int = 0,
    probe_every: int = 1,
    max_new_tokens: int = 16,
    chunk_tokens: int | None = None,
    log: RecordLog | None = None,
    read_modes: Sequence[str] | None = None,
) -> dict:
    """`updates` injections of QA contexts (with probes) or, with `examples=None`, of random token chunks.

    Each row is kept in `log` as it is recorded, with the memory at that point beside it (only the latest one is
    kept): a resumed run loads it and continues after the last row all modes have, with the same records as an
    unbroken run."""
    log = log or RecordLog()
    modes = ReadModes(model, read_modes)
    model.reset_memory(seed)
    generator = torch.Generator().manual_seed(seed)
    chunk_tokens = chunk_tokens or model.config.inject_chunk_size
    vocab = model.config.vocab_size
    prompter = Prompter(tokenizer, style, model.config.max_position_embeddings) if examples else None
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    stream = shuffled_forever(examples, seed) if examples else None
    keys = [f"row:{step}" for step in row_steps(updates, record_every)]
    found = {mode: [log.get(modes.key(mode, key)) for key in keys] for mode in modes.names}
    # rows every mode has (a run stopped between the modes' rows of one step resumes before that step)
    complete = min(next((i for i, row in enumerate(found[m]) if row is None), len(keys)) for m in modes.names)
    rows = {mode: found[mode][:complete] for mode in modes.names}
    window_updates, window_seconds, inject_seconds = 0, 0.0, 0.0
    counts = {mode: {"hits": 0, "probes": 0, "window_hits": 0, "window_probes": 0} for mode in modes.names}
    done = 0
    if complete:  # resume after the last row every mode recorded
        for mode in modes.names:
            last = rows[mode][-1]
            counts[mode].update(hits=last.get("hits", 0), probes=last.get("probes", 0))
        last = rows[modes.names[0]][-1]
        done, inject_seconds = last["injections"], last["inject_seconds"]
        model.load_memory_state(MemoryState.load(checkpoint_path(log, done)))
        for _ in range(done):  # the stream / random chunks continue where the run stopped
            next(stream) if stream is not None else torch.randint(0, vocab, (chunk_tokens,), generator=generator)
    timer = Timer()
    bar = tqdm(range(done + 1, updates + 1), desc="integrity", unit="injection", mininterval=5)
    for step in bar:
        start = time.perf_counter()
        if stream is not None:
            example = next(stream)
            window_updates += model.inject(example["context"], tokenizer=tokenizer, progress=False)
        else:
            ids = torch.randint(0, vocab, (chunk_tokens,), generator=generator)
            window_updates += model.inject(ids, progress=False)
        window_seconds += time.perf_counter() - start

        if stream is not None and step % probe_every == 0:
            for mode in modes.names:
                with modes.reading(mode):
                    success = probe(model, tokenizer, prompter, example, probe_mode, pad_id, max_new_tokens)
                for name, value in (("hits", success), ("probes", 1), ("window_hits", success), ("window_probes", 1)):
                    counts[mode][name] += value
        if step % record_every == 0 or step == updates:
            inject_seconds += window_seconds
            row = {
                "injections": step,
                "updates": model.num_injections,
                **memory_statistics(model),
                "seconds_per_update": window_seconds / max(window_updates, 1),
                "inject_seconds": inject_seconds,
            }
            found = {}
            for mode in modes.names:
                count = counts[mode]
                found[mode] = modes.tag(mode, row)
                if stream is not None:
                    found[mode].update(
                        probes=count["probes"],
                        hits=count["hits"],
                        running_accuracy=count["hits"] / max(count["probes"], 1),
                        window_accuracy=count["window_hits"] / max(count["window_probes"], 1),
                    )
                count["window_hits"] = count["window_probes"] = 0
            previous = rows[modes.names[0]][-1]["injections"] if rows[modes.names[0]] else None
            _keep_row(model, log, modes, found, len(rows[modes.names[0]]), previous)
            for mode in modes.names:
                rows[mode].append(found[mode])
            window_updates = 0
            window_seconds = 0.0

    def fields(mode) -> dict:
        return {"rows": rows[mode], **metrics_of({"rows": rows[mode]})}

    return {
        **modes.fields(fields),
        "probe": {"mode": probe_mode, "every": probe_every, "style": style, "max_new_tokens": max_new_tokens}
        if stream is not None
        else None,
        "wall_time_s": timer.seconds(),
    }


def _keep_row(model, log: RecordLog, modes: ReadModes, rows: dict, index: int, previous: int | None) -> None:
    """Memory checkpoint first, then the rows of every mode (a row in the log always has its checkpoint), then the
    previous checkpoint goes."""
    step = rows[modes.names[0]]["injections"]
    path = checkpoint_path(log, step)
    if path is not None:
        model.memory_state().save(path)
    for mode, row in rows.items():
        key = modes.key(mode, f"row:{step}")
        if log.get(key) is None:  # (a run resumed before a step some modes had recorded)
            log.add(key, index, row)
    if path is not None and previous is not None:
        checkpoint_path(log, previous).unlink(missing_ok=True)


def metrics_of(document: dict) -> dict:
    """The metrics of an integrity results document, from its rows (the last row holds the running totals)."""
    rows = document["rows"]
    last = rows[-1] if rows else {}
    probes = last.get("probes", 0)
    hits = last["hits"] if "hits" in last else round(last.get("running_accuracy", 0.0) * probes)  # (older files)
    old = document.get("metrics", {})
    if "inject_seconds" in last:
        seconds = last["inject_seconds"] / max(last["updates"], 1)
    else:
        seconds = old.get("seconds_per_update", 0.0)
    return {
        "metrics": {
            "injections": last.get("injections", 0),
            "updates": last.get("updates", 0),
            "probes": probes,
            "final_accuracy": hits / probes if probes else None,
            "final_accuracy_ci": [round(v, 4) for v in wilson_interval(hits, probes)] if probes else None,
            "max_nonfinite": max(row["nonfinite"] for row in rows) if rows else 0,
            "norm_max": max(row["norm_max"] for row in rows) if rows else None,
            "seconds_per_update": seconds,
        }
    }
