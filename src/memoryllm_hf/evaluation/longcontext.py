"""Long context, LongBench style (spec §6.2): HotpotQA distractor setting.

The 10 paragraphs, formatted as LongBench does ("Passage i:\\n{title}\\n{text}", blank line between), are injected
in order (chunked by the model's `inject_chunk_size`) into a fresh pool; the question is asked with LongBench's
instruction. Pinned post-processing: the first non-empty line of the generation, stripped; then SQuAD F1 / EM /
exact hit. The in-context condition puts the passages in the prompt, cut from the front to the model's window.
Several read modes in one run (`read_modes`, see `modes`): the passages are injected once per question, no memory
and in context are asked once, the memory in every mode (one record per mode and question).
"""

from collections.abc import Sequence

from .data import EvalData
from .metrics import rate_summary, score_answer
from .modes import ReadModes
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
    read_modes: Sequence[str] | None = None,
) -> dict:
    log = log or RecordLog()
    modes = ReadModes(model, read_modes)
    window = window or model.config.max_position_embeddings
    prompters = {style: Prompter(tokenizer, style, window) for style in styles}
    decoding = greedy_config(tokenizer, max_new_tokens)
    model.reset_memory(seed)
    empty = model.memory_state()
    timer = Timer()
    keys = [str(example["id"]) for example in data.examples]
    mode_keys = {mode: modes.keys(mode, keys) for mode in modes.names}
    for index in modes.pending(log, keys, "longcontext hotpotqa", "question"):
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

        def answer(prompts: dict, use_memory: bool) -> dict:
            generations = generate(model, tokenizer, list(prompts.values()), use_memory, decoding)
            return {style: score_answer(g, answers) for style, g in zip(prompts, generations, strict=True)}

        earlier = modes.shared(log, keys[index])  # (a resumed question: the conditions without memory are done)
        if earlier is not None:
            row["no_memory"], row["in_context"] = earlier["no_memory"], earlier["in_context"]
        else:
            row["no_memory"] = answer(bare, False)
            row["in_context"] = answer({s: p.ids for s, p in full.items()}, False)
            for style, prompt in full.items():
                row["in_context"][style]["truncated_tokens"] = prompt.truncated_tokens
        for mode in modes.missing(log, keys[index]):
            with modes.reading(mode):
                memory = answer(bare, True)
            entry = modes.tag(mode, {**row, "memory": memory, "wall_time_s": example_timer.seconds()})
            log.add(mode_keys[mode][index], index, entry)

    def fields(mode) -> dict:
        records = log.records(mode_keys[mode])
        return {**metrics_of({"records": records, "prompt_styles": list(styles)}), "records": records}

    return {**modes.fields(fields), "decoding": decoding_info(decoding), "wall_time_s": timer.seconds()}


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
