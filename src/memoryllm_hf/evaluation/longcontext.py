"""Long context, LongBench style (spec §6.2): HotpotQA distractor setting.

The 10 paragraphs, formatted as LongBench does ("Passage i:\\n{title}\\n{text}", blank line between), are injected
in order (chunked by the model's `inject_chunk_size`) into a fresh pool; the question is asked with LongBench's
instruction. Pinned post-processing: the first non-empty line of the generation, stripped; then SQuAD F1 / EM /
exact hit. The in-context condition puts the passages in the prompt, cut from the front to the model's window.
"""

from collections.abc import Sequence

from .data import EvalData
from .metrics import rate_summary, score_answer
from .prompts import Prompter
from .records import RecordLog
from .runner import Timer, decoding_info, example_seed, generate, greedy_config, with_drop_seed

INSTRUCTION = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
)
MAX_NEW_TOKENS = 32  # LongBench's dataset2maxlen for hotpotqa
SCORES = ("f1", "exact_match", "exact_hit")


def passages_text(example: dict) -> str:
    return "\n\n".join(f"Passage {i}:\n{p['title']}\n{p['text']}" for i, p in enumerate(example["paragraphs"], 1))


def run_longcontext(
    model,
    tokenizer,
    data: EvalData,
    styles: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    window: int | None = None,
    seed: int = 0,
    log: RecordLog | None = None,
) -> dict:
    log = log or RecordLog()
    window = window or model.config.max_position_embeddings
    prompters = {style: Prompter(tokenizer, style, window) for style in styles}
    decoding = greedy_config(tokenizer, max_new_tokens)
    model.reset_memory(seed)
    empty = model.memory_state()
    timer = Timer()
    keys = [str(example["id"]) for example in data.examples]
    for index in log.pending(keys, desc="longcontext hotpotqa", unit="question"):
        example, example_timer = data.examples[index], Timer()
        text, answers = passages_text(example), [example["answer"]]
        model.set_memory_state(with_drop_seed(empty, example_seed(seed, keys[index])))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # what inject(text, tokenizer) would write
        updates = model.inject(ids, progress=False)

        row = {
            "id": example["id"],
            "type": example.get("type"),
            "question": example["question"],
            "answers": answers,
            "context_tokens": len(ids),
            "updates": updates,
            "no_memory": {},
            "memory": {},
            "in_context": {},
        }
        bare = {
            s: p.question(example["question"], reserve=max_new_tokens, instruction=INSTRUCTION).ids
            for s, p in prompters.items()
        }
        full = {
            s: p.question(example["question"], text, reserve=max_new_tokens, instruction=INSTRUCTION)
            for s, p in prompters.items()
        }
        for condition, prompts, use_memory in (
            ("no_memory", bare, False),
            ("memory", bare, True),
            ("in_context", {s: p.ids for s, p in full.items()}, False),
        ):
            generations = generate(model, tokenizer, list(prompts.values()), use_memory, decoding)
            row[condition] = {style: score_answer(g, answers) for style, g in zip(prompts, generations, strict=True)}
        for style, prompt in full.items():
            row["in_context"][style]["truncated_tokens"] = prompt.truncated_tokens
        row["wall_time_s"] = example_timer.seconds()
        log.add(keys[index], index, row)
    records = log.records(keys)
    return {
        **metrics_of({"records": records, "prompt_styles": list(styles)}),
        "records": records,
        "decoding": decoding_info(decoding),
        "wall_time_s": timer.seconds(),
    }


def metrics_of(document: dict) -> dict:
    """F1 / EM / exact hit per style and condition, from the document's records."""
    records, styles = document["records"], document["prompt_styles"]
    metrics = {
        style: {
            condition: {"n": len(records)}
            | {
                key: value
                for name in SCORES
                for key, value in rate_summary([r[condition][style][name] for r in records], name).items()
            }
            for condition in ("no_memory", "memory", "in_context")
        }
        for style in styles
    }
    for style in styles:
        metrics[style]["in_context"]["truncated_examples"] = sum(
            r["in_context"][style]["truncated_tokens"] > 0 for r in records
        )
    return {"metrics": metrics}
