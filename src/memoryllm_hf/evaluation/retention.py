"""Knowledge retention (paper §4.5): inject a question's context, then k unrelated contexts, ask; k on a grid.

Per question the pool starts from a reset state and is first filled with unrelated contexts ("prefill"), so
forgetting is measured on a full pool as with the official models; then the related context (the passage) is
written, then unrelated contexts of `context_tokens` tokens (texts of other articles/titles than the question's,
concatenated and cut, as the official script builds them). Every question draws its own drops: its pool's generator
is seeded from the run's seed and the question id (`runner.example_seed`), so questions are independent samples and
each one is reproducible on its own (resumed or sharded runs give the same records). The same writes, in the same
order, are what `model.inject` would make; `replay` makes the protocol affordable (see its docstring for the one,
measured, approximation and how to turn it off with `shared_depth=None`).

Conditions, on the same questions: *no memory* (`use_memory=False`, once per question), *passage only* (the passage
in the prompt, once per question: the ceiling a reader of the right text reaches), *memory* (at every k) and *same
text* (the texts the memory was given, prefill + passage + k unrelated contexts, in the prompt, the oldest tokens
cut to fit the window, the question kept; not run once the passage is cut completely, as it then no longer is in
the prompt). Records and metrics also give the memory updates made after the passage at every k.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..modeling import MemoryState
from .data import SOURCE_FIELD, EvalData
from .metrics import mean, rate_summary, score_answer
from .prompts import Prompter
from .records import RecordLog
from .replay import QuestionChain, ReferenceChain, Write, chunk_writes
from .runner import (
    ExtendingPrompts,
    Timer,
    decoding_info,
    example_seed,
    generate,
    greedy_config,
    with_drop_seed,
)

DEFAULT_GRID = (0, 1, 2, 4, 8, 16, 32, 64)
# Conditions per style: asked once per question (the same at every k) / at every k.
ONCE = ("no_memory", "passage_only")
PER_K = ("memory", "same_text")
CONDITIONS = ("no_memory", "passage_only", "memory", "same_text")


@dataclass
class Context:
    """An unrelated context: its token ids, text and the source documents it was cut from."""

    index: int
    ids: list[int]
    text: str
    sources: frozenset


def unrelated_contexts(texts: Sequence[dict], tokenizer, source_field: str, length: int) -> list[Context]:
    """Consecutive texts joined (blank line between) until `length` tokens, cut to exactly `length` tokens; a
    shorter rest is dropped. File order is kept, so a document's paragraphs stay together."""
    contexts, ids, sources = [], [], set()
    for item in texts:
        ids += tokenizer(item["text"] + "\n\n", add_special_tokens=False)["input_ids"]
        sources.add(item.get(source_field))
        if len(ids) >= length:
            cut = ids[:length]
            contexts.append(Context(len(contexts), cut, tokenizer.decode(cut), frozenset(sources)))
            ids, sources = [], set()
    return contexts


def prefill_count(contexts: Sequence[Context], config) -> int:
    """Unrelated contexts needed before the related one to fill an empty pool (at least one)."""
    K, N, chunk = config.num_update_tokens, config.num_memory_tokens, config.inject_chunk_size
    written, count = 0, 0
    while written < N and count < len(contexts):
        n = len(contexts[count].ids)
        pieces = -(-n // chunk)
        written += sum(min(K, len(part)) for part in torch.tensor_split(torch.arange(n), pieces))
        count += 1
    return max(count, 1)


def run_retention(
    model,
    tokenizer,
    data: EvalData,
    styles: Sequence[str],
    grid: Sequence[int] = DEFAULT_GRID,
    context_tokens: int = 512,
    prefill: int | None = None,
    shared_depth: int | None = 6,
    max_new_tokens: int = 16,
    window: int | None = None,
    seed: int = 0,
    in_context_max_k: int | None = None,
    log: RecordLog | None = None,
) -> dict:
    """Run the protocol on `data.examples` (those of `log`'s shard that it has no record of yet); returns
    {"metrics", "records", ...} for the results file. `in_context_max_k` limits the (costly) same-text condition
    to k <= that value."""
    grid = sorted(set(grid))
    cfg = model.config
    log = log or RecordLog()
    window = window or cfg.max_position_embeddings
    source_field = SOURCE_FIELD[data.dataset]
    contexts = unrelated_contexts(data.unrelated, tokenizer, source_field, context_tokens)
    prefill = prefill_count(contexts, cfg) if prefill is None else prefill
    needed = prefill + grid[-1]
    usable = {
        example["id"]: [c for c in contexts if example.get(source_field) not in c.sources] for example in data.examples
    }
    short = [key for key, found in usable.items() if len(found) < needed]
    if short:
        raise ValueError(f"fewer than {needed} unrelated contexts for {short[:3]}; lower --grid or --context-tokens")
    prompters = {style: Prompter(tokenizer, style, window) for style in styles}
    decoding = greedy_config(tokenizer, max_new_tokens)

    def writes_of(context: Context) -> list[Write]:
        return chunk_writes(f"u{context.index}", context.ids, cfg.inject_chunk_size, cfg.min_inject_tokens)

    model.reset_memory(seed)
    start = model.memory_state()
    last = max(found[needed - 1].index for found in usable.values()) if usable else 0
    reference = ReferenceChain(model, [w for c in contexts[: last + 1] for w in writes_of(c)], start, shared_depth)
    setup = _Setup(grid, writes_of, reference, start, seed, prompters, decoding, in_context_max_k)
    keys = [str(example["id"]) for example in data.examples]
    timer = Timer()
    for index in log.pending(keys, desc=f"retention {data.dataset}", unit="question"):
        example, question_timer = data.examples[index], Timer()
        found = usable[example["id"]]
        record = _run_question(model, tokenizer, example, found[:prefill], found[prefill:needed], setup)
        record["wall_time_s"] = question_timer.seconds()
        log.add(keys[index], index, record)
    records = log.records(keys)
    slots_per_update = min(cfg.num_update_tokens, cfg.inject_chunk_size)
    return {
        "metrics": aggregate(records, grid, styles, cfg.num_memory_tokens, slots_per_update),
        "records": records,
        "protocol": {
            "name": "per-question",
            "grid": grid,
            "context_tokens": context_tokens,
            "prefill_contexts": prefill,
            "shared_depth": shared_depth,
            "window": window,
            "in_context_max_k": in_context_max_k,
            "num_unrelated_contexts": len(contexts),
            "slots_per_update": slots_per_update,
            "drop_seeds": "per question: runner.example_seed(seed, id)",
        },
        "decoding": decoding_info(decoding),
        "wall_time_s": timer.seconds(),
    }


@dataclass
class _Setup:
    """What every question of one run shares."""

    grid: list[int]
    writes_of: Callable[[Context], list[Write]]
    reference: ReferenceChain
    start: MemoryState
    seed: int
    prompters: dict[str, Prompter]
    decoding: GenerationConfig
    in_context_max_k: int | None


def _run_question(
    model, tokenizer, example: dict, prefill: list[Context], unrelated: list[Context], setup: _Setup
) -> dict:
    """One question: the write sequence with asks at the grid points."""
    cfg = model.config
    related_ids = tokenizer(example["context"], add_special_tokens=False)["input_ids"]
    related = chunk_writes(f"q:{example['id']}", related_ids, cfg.inject_chunk_size, cfg.min_inject_tokens)
    drop_seed = example_seed(setup.seed, str(example["id"]))
    chain = QuestionChain(model, with_drop_seed(setup.start, drop_seed), setup.reference)
    record = {
        "id": example["id"],
        "question": example["question"],
        "answers": example["answers"],
        "drop_seed": drop_seed,
        "related_tokens": len(related_ids),
        "unrelated_contexts": [c.index for c in unrelated],
        **{condition: {} for condition in CONDITIONS},
        "updates_after_related": {},
    }
    reserve = setup.decoding.max_new_tokens
    questions = {style: p.question(example["question"], reserve=reserve) for style, p in setup.prompters.items()}
    passage = {
        style: p.question(example["question"], example["context"], reserve=reserve)
        for style, p in setup.prompters.items()
    }
    record["no_memory"] = ask(model, tokenizer, questions, False, setup.decoding, example["answers"])
    record["passage_only"] = ask(model, tokenizer, passage, False, setup.decoding, example["answers"])
    for context in prefill:
        chain.write(setup.writes_of(context))
    updates_before = chain.pool.injections
    chain.write(related)
    record["passage_injections"] = list(range(updates_before + 1, chain.pool.injections + 1))
    updates_before = chain.pool.injections
    # The same text as the memory got, in the prompt: the passage ends this many context tokens in.
    lead = "\n\n".join([*(c.text for c in prefill), example["context"]])
    passage_end = len(tokenizer(lead, add_special_tokens=False)["input_ids"])
    same_text = {style: ExtendingPrompts(model, tokenizer, setup.decoding) for style in setup.prompters}
    for k in range(setup.grid[-1] + 1):
        if k:
            chain.write(setup.writes_of(unrelated[k - 1]))
        if k not in setup.grid:
            continue
        chain.load()
        record["updates_after_related"][str(k)] = chain.pool.injections - updates_before
        record["memory"][str(k)] = ask(model, tokenizer, questions, True, setup.decoding, example["answers"])
        record["same_text"][str(k)] = {style: None for style in setup.prompters}
        if setup.in_context_max_k is None or k <= setup.in_context_max_k:
            text = "\n\n".join([lead, *(c.text for c in unrelated[:k])])
            for style, prompter in setup.prompters.items():
                prompt = prompter.question(example["question"], text, reserve=reserve)
                # Once the passage is cut away completely the prompt no longer holds it: not run (None).
                if prompt.truncated_tokens < passage_end:
                    generation = same_text[style].answer(prompt.ids)
                    record["same_text"][str(k)][style] = scores_of(prompt, generation, example["answers"])
    record["chunks"] = chain.counts
    record["same_text_reused_tokens"] = sum(prompts.reused for prompts in same_text.values())
    return record


def ask(model, tokenizer, prompts: dict, use_memory: bool, decoding, answers) -> dict:
    """Scores per style of the greedy answers to `prompts` ({style: Prompt}, generated as one batch)."""
    return ask_batch(model, tokenizer, [(prompts, answers)], use_memory, decoding)[0] if prompts else {}


def ask_batch(model, tokenizer, rows: Sequence[tuple[dict, Sequence[str]]], use_memory: bool, decoding) -> list[dict]:
    """For each (prompts {style: Prompt}, answers) of `rows`, the scores per style of the greedy answers; all prompts
    are generated as one batch (the memory, when read, is one prefix shared by every row). Reading the memory of a
    model that reports what it retrieved (`model.last_retrieval`, one list of injection ids per batch row), the
    retrieved ids are kept per style (`retrieved`: recall@k against the record's `passage_injections`)."""
    flat = [(index, style, prompt) for index, (prompts, _) in enumerate(rows) for style, prompt in prompts.items()]
    if not flat:
        return [{} for _ in rows]
    generations = generate(model, tokenizer, [prompt.ids for _, _, prompt in flat], use_memory, decoding)
    retrieval = getattr(model, "last_retrieval", None) if use_memory else None
    found = [{} for _ in rows]
    for row, ((index, style, prompt), text) in enumerate(zip(flat, generations, strict=True)):
        found[index][style] = scores_of(prompt, text, rows[index][1])
        if retrieval is not None:
            ids = retrieval[row] if row < len(retrieval) else None
            found[index][style]["retrieved"] = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return found


def scores_of(prompt, generation: str, answers) -> dict:
    scores = score_answer(generation, answers)
    if prompt.truncated_tokens:
        scores["truncated_tokens"] = prompt.truncated_tokens
    return scores


def score_summary(scores: Sequence[dict]) -> dict:
    """n, exact hit, F1 and EM of answers, each with its 95% interval (Wilson for the rates, bootstrap for F1)."""
    summary = {"n": len(scores)}
    for name in ("exact_hit", "f1", "exact_match"):
        summary.update(rate_summary([s[name] for s in scores], name))
    return summary


def aggregate(
    records: list[dict], grid: Sequence[int], styles: Sequence[str], num_memory_tokens: int, slots_per_update: int
) -> dict:
    """Accuracy (exact hit, F1, EM) per style, condition and k (the once-per-question conditions repeated at every
    k); the (1-K/N)^u bound; the updates after the passage; where memory meets the no-memory baseline."""
    updates = {str(k): mean(r["updates_after_related"][str(k)] for r in records) for k in grid}
    metrics = {}
    for style in styles:
        curves = {condition: {} for condition in CONDITIONS}
        for k in map(str, grid):
            rows = {
                **{condition: [r[condition][style] for r in records] for condition in ONCE},
                **{
                    condition: [r[condition][k][style] for r in records if r[condition][k][style]]
                    for condition in PER_K
                },
            }
            for condition, scores in rows.items():
                curves[condition][k] = score_summary(scores)
        baseline = curves["no_memory"][str(grid[0])]["exact_hit"]
        meets = [k for k in grid if curves["memory"][str(k)]["exact_hit"] <= baseline]
        metrics[style] = {
            **curves,
            "memory_meets_no_memory_at_k": meets[0] if meets else None,
            "memory_meets_no_memory_at_updates": updates[str(meets[0])] if meets else None,
        }
    metrics["retention_bound"] = {k: (1 - slots_per_update / num_memory_tokens) ** u for k, u in updates.items()}
    metrics["updates_after_related"] = updates
    return metrics


def metrics_of(document: dict) -> dict:
    """The metrics of a per-question results document recomputed from its records (merging shards; a stream run's
    are `stream.metrics_of`)."""
    protocol, memory = document["protocol"], document["model"]["memory"]
    records = document["records"]
    return {
        "metrics": aggregate(
            records,
            protocol["grid"],
            document["prompt_styles"],
            memory["num_memory_tokens"],
            protocol["slots_per_update"],
        )
    }
