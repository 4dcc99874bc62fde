"""Knowledge retention as one stream (the default protocol; `retention.run_retention` is the paper's per-question one).

One memory per dataset and seed. The unrelated contexts (512-token pieces of the dataset's unrelated texts, built as
`retention.unrelated_contexts` builds them) are injected one after another; each question's passage is injected into
the stream once, before a context position chosen below. At checkpoints (every `checkpoint_every` contexts from the
first possible passage position on, and at the end) every question whose passage is stored is asked, all of them in
shared-prefix batches (one memory, many rows). Each answer is recorded with the updates and stored tokens since its
passage, and the totals stored, so the cost grows with the stream, not with questions x distances.

Placement. A context is *related* to a question when it holds a text of the question's source (SQuAD article, NQ
title), as in the per-question protocol. The first `prefill` contexts fill the pool (as the per-question protocol's
prefill). A question's passage goes to a position in its *clean window*: from `prefill` up to the first related
context (the whole stream when there is none), at the fraction rank/Q of the window, rank being the question's place
in a seeded permutation (so passages are spread through the stream and questions of every source get short and long
distances). A question is asked at the checkpoints from its passage until a related context is stored after it (the
answer could then come from that context): at each of them (`ask_spacing="every"`) or at the first past 0, 1, 2, 4,
... contexts since its passage ("doubling", the full plan's choice: the asks grow with log(distance) per question).
Where a question has no clean window (its source is already in the prefill) it is placed in the same way over the whole stream and its records say how many related contexts were
stored before the passage (`related_before`).

Conditions: *memory* (at checkpoints), *no memory* and *passage only* (once per question, when its passage is
injected), *same text* (the stream's text so far in the prompt, the oldest tokens cut to the window as for the
dataset's longest question, so all asks of a checkpoint keep the same text and share one cache; only while the
passage is still inside the window, and up to `same_text_max_contexts` contexts after it). With one question, a
checkpoint after every context and the same drop seed, the records equal the per-question protocol's with exact
chaining (tested).

Resuming: the stream is injected again from the start (the same writes, the same drops) and only the asks without a
record are made; the stream stops after the last checkpoint that has asks left. Sharding splits the records (the
once-per-question records and the asks of every checkpoint) round robin; every shard injects the whole stream.

Several read modes in one run (`read_modes`, see `modes`): the stream is injected once; at every checkpoint each
mode asks its batches in turn; the once-per-question records (no memory, passage only) are shared by the modes and
the same-text answer of an ask is made once and kept in every mode's record of that ask.
"""

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .data import SOURCE_FIELD, EvalData
from .metrics import rate_summary
from .modes import ReadModes
from .prompts import Prompter
from .records import RecordLog
from .retention import ask_batch, prefill_count, score_summary, scores_of, unrelated_contexts
from .runner import ExtendingPrompts, Timer, decoding_info, example_seed, greedy_config, with_drop_seed

# Bins of updates since the passage: [0], [1, 2], [3, 4], [5, 8], ... (a 512-token context is 2 updates at K = 256).
UPDATE_EDGES = (0, 1, 3, 5, 9, 17, 33, 65, 129, 257, 513, 1025, 2049)
# Bins of tokens stored in the memory in all (the pool's writes, the long-term store's size).
TOKEN_EDGES = (0, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288)


def bin_label(value: int, edges: Sequence[int], unit: str = "") -> str:
    """The label of the bin of `value`: bins are [edges[i], edges[i + 1] - 1], the last one open."""
    index = max(i for i, edge in enumerate(edges) if value >= edge)
    low = edges[index]
    if index + 1 == len(edges):
        return f">={_short(low, unit)}"
    if unit == "tokens":  # [low, next edge), in thousands of tokens (1k = 1,024)
        return f"{_short(low, unit)}-{_short(edges[index + 1], unit)}"
    high = edges[index + 1] - 1
    return str(low) if high == low else f"{low}-{high}"


def _short(value: int, unit: str) -> str:
    return f"{value // 1024}k" if value and value % 1024 == 0 else str(value)


def place_passages(examples: Sequence[dict], contexts, source_field: str, prefill: int, seed: int) -> list[dict]:
    """Per question: `position` (its passage goes before the context of that index), `related_before` (related
    contexts before it) and `clean_until` (the first related context at or after it; asks stop once it is stored)."""
    count, total = len(examples), len(contexts)
    generator = torch.Generator().manual_seed(example_seed(seed, "stream placement"))
    rank = {q: r for r, q in enumerate(torch.randperm(count, generator=generator).tolist())}
    placements = []
    for q, example in enumerate(examples):
        related = [i for i, context in enumerate(contexts) if example.get(source_field) in context.sources]
        first = related[0] if related else total
        width = first - prefill if first > prefill else total - prefill + 1
        position = prefill + math.floor(rank[q] / count * width)
        placements.append(
            {
                "position": position,
                "related_before": sum(i < position for i in related),
                "clean_until": min([i for i in related if i >= position], default=total + 1),
            }
        )
    return placements


def checkpoints(prefill: int, total: int, every: int) -> list[int]:
    """Context counts at which questions are asked: prefill, prefill + every, ..., and the end of the stream."""
    if every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1 (contexts between asks), got {every}")
    return sorted({*range(prefill, total + 1, every), total})


ASK_SPACINGS = ("every", "doubling")


def ask_schedule(placements, points: Sequence[int], max_distance: int | None, spacing: str = "every") -> list[list[int]]:
    """Per question, the checkpoints it is asked at: from its passage until a related context is stored after it.

    spacing "every": at each of those checkpoints; "doubling": at the first of them at or past 0, 1, 2, 4, 8, ...
    contexts since the passage (about one ask per distance bin, so a question's repeated asks do not stand in for
    other questions in a bin's interval, and the asks grow with log(stream) per question instead of the stream)."""
    if spacing not in ASK_SPACINGS:
        raise ValueError(f"--ask-spacing must be one of {ASK_SPACINGS}, got {spacing!r}")
    schedule = []
    for place in placements:
        start = place["position"]
        ks = [
            k
            for k in points
            if start <= k <= place["clean_until"] and (max_distance is None or k - start <= max_distance)
        ]
        if spacing == "doubling" and ks:
            targets = [0, *(2**i for i in range(max(ks[-1] - start, 1).bit_length()))]
            ks = sorted({next(k for k in ks if k - start >= d) for d in targets if ks[-1] - start >= d})
        schedule.append(ks)
    return schedule


def run_retention_stream(
    model,
    tokenizer,
    data: EvalData,
    styles: Sequence[str],
    context_tokens: int = 512,
    prefill: int | None = None,
    checkpoint_every: int = 4,
    ask_spacing: str = "every",
    stream_contexts: int | None = None,
    max_distance: int | None = None,
    same_text_max_contexts: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    window: int | None = None,
    seed: int = 0,
    drop_seed: int | None = None,
    log: RecordLog | None = None,
    read_modes: Sequence[str] | None = None,
) -> dict:
    """Run the stream protocol on `data` (the records of `log`'s shard that it lacks); returns the results fields.
    `same_text_max_contexts` < 0 turns the same-text condition off; `drop_seed` (default: derived from the seed and
    the dataset) seeds the memory's drops."""
    cfg = model.config
    log = log or RecordLog()
    window = window or cfg.max_position_embeddings
    source_field = SOURCE_FIELD[data.dataset]
    contexts = unrelated_contexts(data.unrelated, tokenizer, source_field, context_tokens)
    if stream_contexts is not None:
        contexts = contexts[:stream_contexts]
    prefill = prefill_count(contexts, cfg) if prefill is None else prefill
    if len(contexts) < prefill:
        raise ValueError(f"{len(contexts)} unrelated contexts, fewer than the prefill of {prefill}; lower --prefill")
    examples = data.examples
    placements = place_passages(examples, contexts, source_field, prefill, seed)
    points = checkpoints(prefill, len(contexts), checkpoint_every)
    schedule = ask_schedule(placements, points, max_distance, ask_spacing)
    ids = [str(example["id"]) for example in examples]
    # the same-text prompts of every ask cut the stream as for the longest question (see `_same_text`)
    longest = max((e["question"] for e in examples), key=lambda q: len(tokenizer(q)["input_ids"]), default=None)
    modes = ReadModes(model, read_modes)
    asked = [f"c{k}:{ids[q]}" for k in points for q in range(len(examples)) if k in schedule[q]]
    keys = [f"once:{i}" for i in ids] + asked
    # once records are every mode's; an ask has one record per mode
    mode_keys = {mode: keys[: len(ids)] + modes.keys(mode, asked) for mode in modes.names}
    slot = {key: index for index, key in enumerate(keys)}
    missing = {mode: {keys[i] for i in log.todo(mode_keys[mode])} for mode in modes.names}
    todo = {slot[key] for found in missing.values() for key in found}
    prompters = {style: Prompter(tokenizer, style, window) for style in styles}
    decoding = greedy_config(tokenizer, max_new_tokens)
    reserve = decoding.max_new_tokens
    drop_seed = example_seed(seed, f"stream:{data.dataset}") if drop_seed is None else drop_seed
    model.reset_memory(seed)
    model.set_memory_state(with_drop_seed(model.memory_state(), drop_seed))

    at_position: dict[int, list[int]] = {}
    for q, place in enumerate(placements):
        at_position.setdefault(place["position"], []).append(q)
    # The stream ends after the last position that something still to do needs.
    needed = [placements[q]["position"] for q in range(len(examples)) if slot[f"once:{ids[q]}"] in todo]
    needed += [int(keys[i].split(":")[0][1:]) for i in todo if keys[i].startswith("c")]
    end = max(needed, default=-1)

    items: list[tuple[str, int]] = []  # (text, tokens) of everything injected, in order (the same-text prompt)
    state = {"tokens": 0}
    passage: dict[int, dict] = {}
    same_text = {style: ExtendingPrompts(model, tokenizer, decoding) for style in styles}
    timer, inject_seconds, ask_seconds = Timer(), 0.0, 0.0

    def inject(text: str, token_ids: list[int]) -> list[int]:
        nonlocal inject_seconds
        started, before = Timer(), model.num_injections
        model.inject(token_ids, progress=False)
        inject_seconds += started.seconds()
        items.append((text, len(token_ids)))
        state["tokens"] += len(token_ids)
        return list(range(before + 1, model.num_injections + 1))

    bar = tqdm(total=max(end, 0), desc=f"retention stream {data.dataset}", unit="context", disable=end < 0)
    for k in range(end + 1):
        for q in at_position.get(k, []):
            example = examples[q]
            token_ids = tokenizer(example["context"], add_special_tokens=False)["input_ids"]
            injections = inject(example["context"], token_ids)
            passage[q] = {
                "injections": injections,
                "item": len(items) - 1,
                "updates": model.num_injections,
                "tokens": state["tokens"],
            }
            key = f"once:{ids[q]}"
            if slot[key] in todo:
                started = Timer()
                record = _once_record(model, tokenizer, example, placements[q], injections, prompters, decoding)
                record["wall_time_s"] = started.seconds()
                log.add(key, slot[key], record)
        asks = [q for q in range(len(examples)) if f"c{k}:{ids[q]}" in slot and slot[f"c{k}:{ids[q]}"] in todo]
        for start in range(0, len(asks), batch_size):
            batch = asks[start : start + batch_size]
            answers: dict = {}
            for mode in modes.names:
                rows = [q for q in batch if f"c{k}:{ids[q]}" in missing[mode]]
                if not rows:
                    continue
                started = Timer()
                questions = [
                    (
                        {s: p.question(examples[q]["question"], reserve=reserve) for s, p in prompters.items()},
                        examples[q]["answers"],
                    )
                    for q in rows
                ]
                with modes.reading(mode):
                    found = ask_batch(model, tokenizer, questions, True, decoding)
                seconds = started.seconds()
                ask_seconds += seconds
                for q, memory in zip(rows, found, strict=True):
                    answers.setdefault(q, {})[mode] = (memory, len(rows), seconds)
            for q in batch:
                key = f"c{k}:{ids[q]}"
                earlier = modes.shared(log, key)
                same = {style: None for style in prompters}
                if earlier is not None:  # (a resumed ask: the same text is done)
                    same = earlier["same_text"]
                elif same_text_max_contexts is None or 0 <= k - placements[q]["position"] <= same_text_max_contexts:
                    started = Timer()
                    same = _same_text(
                        tokenizer, examples[q], items, passage[q]["item"], prompters, same_text, reserve, window, longest
                    )
                    ask_seconds += started.seconds()
                for mode, (memory, rows, seconds) in answers[q].items():
                    record = _ask_record(model, examples[q], k, placements[q], passage[q], state["tokens"], memory)
                    record["batch_rows"], record["batch_seconds"] = rows, seconds
                    record["same_text"] = same
                    log.add(modes.key(mode, key), slot[key], modes.tag(mode, record))
        if k < min(end, len(contexts)):
            inject(contexts[k].text, contexts[k].ids)
            bar.update(1)
    bar.close()
    slots_per_update = min(cfg.num_update_tokens, cfg.inject_chunk_size)

    def fields(mode) -> dict:
        records = log.records(mode_keys[mode])
        return {"metrics": aggregate_stream(records, styles), "records": records}

    return {
        **modes.fields(fields),
        "protocol": {
            "name": "stream",
            "context_tokens": context_tokens,
            "prefill_contexts": prefill,
            "stream_contexts": len(contexts),
            "checkpoint_every": checkpoint_every,
            "ask_spacing": ask_spacing,
            "checkpoints": points,
            "max_distance": max_distance,
            "same_text_max_contexts": same_text_max_contexts,
            "batch_size": batch_size,
            "window": window,
            "slots_per_update": slots_per_update,
            "drop_seed": drop_seed,
            "asks": len(keys) - len(examples),
        },
        "decoding": decoding_info(decoding),
        "inject_seconds": round(inject_seconds, 3),
        "ask_seconds": round(ask_seconds, 3),
        "wall_time_s": timer.seconds(),
    }


def _once_record(model, tokenizer, example, place, injections, prompters, decoding) -> dict:
    """No memory and passage only (each asked once per question), with where the passage went."""
    reserve = decoding.max_new_tokens
    bare = {s: p.question(example["question"], reserve=reserve) for s, p in prompters.items()}
    with_passage = {
        s: p.question(example["question"], example["context"], reserve=reserve) for s, p in prompters.items()
    }
    # (two batches, as the per-question protocol asks them: a record does not depend on its batch neighbours)
    no_memory = ask_batch(model, tokenizer, [(bare, example["answers"])], False, decoding)[0]
    passage_only = ask_batch(model, tokenizer, [(with_passage, example["answers"])], False, decoding)[0]
    return {
        "kind": "once",
        "id": example["id"],
        "question": example["question"],
        "answers": example["answers"],
        "passage_position": place["position"],
        "related_before": place["related_before"],
        "passage_injections": injections,
        "no_memory": no_memory,
        "passage_only": passage_only,
    }


def _ask_record(model, example, k, place, passage, tokens, memory) -> dict:
    """One answer read from the memory at checkpoint `k`, with the distances since the passage."""
    return {
        "kind": "ask",
        "id": example["id"],
        "checkpoint": k,
        "contexts_since_passage": k - place["position"],
        "updates_since_passage": model.num_injections - passage["updates"],
        "tokens_since_passage": tokens - passage["tokens"],
        "stored_updates": model.num_injections,
        "stored_tokens": tokens,
        "related_before": place["related_before"],
        "passage_injections": passage["injections"],
        "memory": memory,
        "same_text": {style: None for style in memory},
    }


def _same_text(tokenizer, example, items, passage_item, prompters, same_text, reserve, window, longest) -> dict:
    """The stream's text so far in the prompt, oldest tokens cut to the window as for the `longest` question (so the
    asks of one checkpoint keep the same text and run only their question after the first); None while the passage
    is cut."""
    first, tokens = len(items), 0
    while first > 0 and tokens < window:  # the items that can still be (partly) in the window
        first -= 1
        tokens += items[first][1]
    found = {style: None for style in prompters}
    if first > passage_item:
        return found
    text = "\n\n".join(text for text, _ in items[first:])
    passage_end = len(
        tokenizer("\n\n".join(t for t, _ in items[first : passage_item + 1]), add_special_tokens=False)["input_ids"]
    )
    for style, prompter in prompters.items():
        prompt = prompter.question(example["question"], text, reserve=reserve, cut_as=longest)
        if prompt.truncated_tokens < passage_end:
            found[style] = scores_of(prompt, same_text[style].answer(prompt.ids), example["answers"])
    return found


def aggregate_stream(records: Sequence[dict], styles: Sequence[str]) -> dict:
    """Per style: no memory and passage only (once per question), memory and same text by updates since the passage
    and memory by tokens stored, each with n and 95% intervals; where the model reports its reads, how often the
    passage was read (`passage_read`)."""
    once = [r for r in records if r["kind"] == "once"]
    asks = [r for r in records if r["kind"] == "ask"]
    metrics = {"questions": len(once), "asks": len(asks)}
    for style in styles:
        found = {
            "no_memory": score_summary([r["no_memory"][style] for r in once]),
            "passage_only": score_summary([r["passage_only"][style] for r in once]),
        }
        for name, condition, value, edges, unit in (
            ("memory_by_updates", "memory", "updates_since_passage", UPDATE_EDGES, ""),
            ("same_text_by_updates", "same_text", "updates_since_passage", UPDATE_EDGES, ""),
            ("memory_by_stored_tokens", "memory", "stored_tokens", TOKEN_EDGES, "tokens"),
        ):
            groups: dict[str, list[dict]] = {}
            for r in sorted(asks, key=lambda r: r[value]):
                scores = r[condition].get(style)
                if scores is not None:
                    groups.setdefault(bin_label(r[value], edges, unit), []).append({**scores, "_ask": r})
            found[name] = {label: _bin_summary(rows, value) for label, rows in groups.items()}
        metrics[style] = found
    return metrics


def _bin_summary(rows: list[dict], value: str) -> dict:
    summary = score_summary(rows)
    summary[f"{value}_mean"] = round(sum(r["_ask"][value] for r in rows) / len(rows), 2)
    summary["questions"] = len({r["_ask"]["id"] for r in rows})
    read = [bool(set(r["retrieved"] or []) & set(r["_ask"]["passage_injections"])) for r in rows if "retrieved" in r]
    if read:
        summary.update(rate_summary([float(x) for x in read], "passage_read"))
    return summary


def metrics_of(document: dict) -> dict:
    """The metrics of a stream results document recomputed from its records (merging shards)."""
    return {"metrics": aggregate_stream(document["records"], document["prompt_styles"])}
