"""Knowledge editing (paper Table 1, ROME protocol) on CounterFact and zsRE.

Each record's `edit_text` is injected into a fresh pool; then, for the edit prompt (efficacy), its paraphrases
(generalization) and neighbourhood prompts (specificity), the log-probabilities of `target_new` and `target_true` as
continuations are compared (sum over the target's tokens, all candidates in one batch). A probe succeeds when
P(new) > P(true), for neighbourhood prompts when P(neighbour's target) > P(new). Score = harmonic mean of the three
rates. The exact-match style accuracy asks whether greedy decoding would produce the target (new target for
efficacy/generalization, the neighbour's own target for specificity): every target token is the argmax.

Conditions on the same records: no edit (`use_memory=False`), memory, and in-context editing (IKE-style,
zero-shot: "New fact: {edit_text}" before the prompt). Sequential mode injects all edits one after another into one
pool, then probes every edit and its neighbourhood: success against the number of later edits shows forgetting.
Both read modes (`--read-mode pool|retrieve`) run the same protocol; with retrieval reads the model's settings
(`retrieval_threshold`, margin, neighbours, read budget) are in force as configured, and every memory probe records
whether its prompt read the edit's own injections (`read_edit`; rates `*_read_edit` in the summaries) and whether it
read nothing at all (`read_nothing`: all below the threshold). Several read modes in one run (`read_modes`, see
`modes`): each edit is injected once, the no-edit and in-context probes are made once, and every mode probes the
memory in turn (one record per mode and edit, equal to a run of that mode alone).
"""

from collections.abc import Sequence

from tqdm.auto import tqdm

from .data import EvalData
from .metrics import bootstrap_interval, harmonic_mean, interval, mean
from .modes import ReadModes
from .prompts import Prompter
from .records import RecordLog, interleave
from .runner import Timer, continuation_scores, example_seed, with_drop_seed

PROMPT_KIND = {"counterfact": "sentence", "zsre": "question"}
PROBES = ("efficacy", "generalization", "specificity")


def probe_pairs(prompter: Prompter, record: dict, kind: str, context: str | None = None) -> tuple[list, list]:
    """(pairs of (prefix ids, target ids), layout [(probe, index into pairs of the wanted target, of the rival)])."""
    pairs, layout = [], []

    def add(probe: str, prompt: str, wanted: str, rival: str) -> None:
        layout.append((probe, len(pairs), len(pairs) + 1))
        pairs.append(prompter.completion(prompt, wanted, kind, context))
        pairs.append(prompter.completion(prompt, rival, kind, context))

    add("efficacy", record["prompt"], record["target_new"], record["target_true"])
    for prompt in record["paraphrase_prompts"]:
        add("generalization", prompt, record["target_new"], record["target_true"])
    for neighbour in record["neighborhood_prompts"]:
        add("specificity", neighbour["prompt"], neighbour["target"], record["target_new"])
    return pairs, layout


def probe_record(
    model,
    prompter: Prompter,
    record: dict,
    kind: str,
    use_memory: bool,
    context: str | None,
    pad_id: int,
    edit_injections: Sequence[int] | None = None,
) -> dict:
    """Per probe type, a list of {wanted, rival (log-probs), success, exact} for one condition. Reading the memory of
    a model that reports what it retrieved (`model.last_retrieval`), each probe also says whether its prompt read
    one of `edit_injections` (the edit's own injections): `read_edit` (wanted for efficacy and generalization, not
    for the neighbourhood), and `read_nothing` (every injection scored below the retrieval threshold)."""
    pairs, layout = probe_pairs(prompter, record, kind, context)
    reads = use_memory and edit_injections is not None
    if reads:
        model.last_retrieval = None  # (set again by a retrieval read)
    result = judge(continuation_scores(model, pairs, use_memory, pad_id), layout)
    retrieval = getattr(model, "last_retrieval", None) if reads else None
    if retrieval is not None:
        # continuation_scores runs each distinct prefix once, in order of first appearance: one retrieval row each
        prefixes = list(dict.fromkeys(tuple(prefix) for prefix, _ in pairs))
        counts = {probe: 0 for probe in PROBES}
        for probe, wanted, _ in layout:
            read = list(retrieval[prefixes.index(tuple(pairs[wanted][0]))])
            entry = result[probe][counts[probe]]
            entry["read_edit"] = bool(set(read) & set(edit_injections))
            entry["read_nothing"] = not read
            counts[probe] += 1
    return result


def judge(scores: Sequence[dict], layout: Sequence[tuple[str, int, int]]) -> dict:
    """Success = the wanted target is strictly more likely than its rival; exact = greedy decoding produces it."""
    result = {probe: [] for probe in PROBES}
    for probe, wanted, rival in layout:
        result[probe].append(
            {
                "wanted": round(scores[wanted]["logprob"], 4),
                "rival": round(scores[rival]["logprob"], 4),
                "success": scores[wanted]["logprob"] > scores[rival]["logprob"],
                "exact": scores[wanted]["greedy"],
            }
        )
    return result


def _rates(results: Sequence[dict]) -> dict:
    """Rates over records (each record's probes averaged first, as ROME does) and the harmonic-mean Scores."""
    summary = {}
    for probe in PROBES:
        summary[probe] = mean(mean(p["success"] for p in r[probe]) for r in results if r[probe])
        summary[f"{probe}_exact"] = mean(mean(p["exact"] for p in r[probe]) for r in results if r[probe])
    rates = [summary[probe] for probe in PROBES if summary[probe] is not None]
    summary["score"] = harmonic_mean(rates) if rates else None
    summary["exact_score"] = harmonic_mean([summary[f"{p}_exact"] for p in PROBES if summary[f"{p}_exact"] is not None])
    return summary


def summarize(results: Sequence[dict]) -> dict:
    """`_rates` with n and a 95% interval for each (Wilson where every record has one probe of a kind, else a
    bootstrap over records; the Scores by a bootstrap over records)."""
    results = list(results)
    summary = {"n": len(results), **_rates(results)}
    for probe in PROBES:
        for name, field in ((probe, "success"), (f"{probe}_exact", "exact")):
            summary[f"{name}_ci"] = interval([mean(p[field] for p in r[probe]) for r in results if r[probe]])
    for probe in PROBES:  # how often a probe's prompt read the edit (models that report their reads)
        read = [mean(p["read_edit"] for p in r[probe]) for r in results if r[probe] and "read_edit" in r[probe][0]]
        if read:
            summary.update({f"{probe}_read_edit": mean(read), f"{probe}_read_edit_ci": interval(read)})
    for name in ("score", "exact_score"):
        found = bootstrap_interval(results, lambda rows, name=name: _rates(rows)[name])
        summary[f"{name}_ci"] = [round(v, 4) for v in found] if found else None
    return summary


def run_editing(
    model,
    tokenizer,
    data: EvalData,
    styles: Sequence[str],
    sequential: bool = False,
    seed: int = 0,
    window: int | None = None,
    age_buckets: int = 10,
    sequential_probe_every: int = 1,
    log: RecordLog | None = None,
    read_modes: Sequence[str] | None = None,
) -> dict:
    """Individual edits (three conditions) and, with `sequential`, all edits in one pool. Records are kept in
    `log` as they finish (its shard's records only; the sequential probes are split between shards too).
    `read_modes`: several read modes served by one run (see `modes`)."""
    kind = PROMPT_KIND[data.dataset]
    log = log or RecordLog()
    window = window or model.config.max_position_embeddings
    prompters = {style: Prompter(tokenizer, style, window) for style in styles}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.reset_memory(seed)
    empty = model.memory_state()
    timer = Timer()
    modes = ReadModes(model, read_modes)
    keys = [f"edit:{record['case_id']}" for record in data.examples]
    mode_keys = {mode: modes.keys(mode, keys) for mode in modes.names}
    for index in modes.pending(log, keys, f"editing {data.dataset}", "edit"):
        record, record_timer = data.examples[index], Timer()
        model.set_memory_state(with_drop_seed(empty, example_seed(seed, str(record["case_id"]))))
        before = model.num_injections
        model.inject(record["edit_text"], tokenizer=tokenizer, progress=False)
        injections = list(range(before + 1, model.num_injections + 1))

        row = {
            "case_id": record["case_id"],
            "subject": record["subject"],
            "target_new": record["target_new"],
            "target_true": record["target_true"],
            "no_edit": {},
            "memory": {},
            "in_context": {},
        }
        statement = f"New fact: {record['edit_text']}"
        earlier = modes.shared(log, keys[index])  # (a resumed edit: the conditions without memory are done)
        for style, prompter in prompters.items():
            for condition, context in (("no_edit", None), ("in_context", statement)):
                row[condition][style] = (
                    earlier[condition][style]
                    if earlier is not None
                    else probe_record(model, prompter, record, kind, False, context, pad_id)
                )
        for mode in modes.missing(log, keys[index]):
            with modes.reading(mode):
                memory = {
                    style: probe_record(model, prompter, record, kind, True, None, pad_id, injections)
                    for style, prompter in prompters.items()
                }
            entry = modes.tag(mode, {**row, "memory": memory, "wall_time_s": record_timer.seconds()})
            log.add(mode_keys[mode][index], index, entry)
    individual_seconds = timer.seconds()
    found = {}
    if sequential:
        found = run_sequential(
            model,
            tokenizer,
            data.examples,
            prompters,
            kind,
            empty,
            pad_id,
            age_buckets,
            sequential_probe_every,
            log,
            modes,
        )

    def fields(mode) -> dict:
        result = {"records": log.records(mode_keys[mode])}
        if sequential:
            result["sequential"] = found[mode]
        return {**result, **metrics_of({**result, "prompt_styles": list(styles)})}

    return {**modes.fields(fields), "individual_wall_time_s": individual_seconds, "wall_time_s": timer.seconds()}


def run_sequential(
    model,
    tokenizer,
    examples: Sequence[dict],
    prompters: dict,
    kind: str,
    empty,
    pad_id: int,
    age_buckets: int,
    probe_every: int = 1,
    log: RecordLog | None = None,
    modes: ReadModes | None = None,
) -> dict:
    """Inject every edit in order into one pool, then probe every `probe_every`-th edit counted from the newest
    (age 0), in each read mode of `modes`; success by age (edits injected after the probed one), oldest bucket
    first. (A resumed or sharded run injects all edits again, then probes the ones its shard has no record of.)
    Returns {mode: the sequential fields of the results}."""
    log = log or RecordLog()
    modes = modes or ReadModes(model)
    timer = Timer()
    count = len(examples)
    probed = [(i, count - 1 - i) for i in range(count) if (count - 1 - i) % probe_every == 0]
    keys = [f"sequential:{examples[index]['case_id']}" for index, _ in probed]
    mode_keys = {mode: modes.keys(mode, keys) for mode in modes.names}
    todo = modes.pending(log, keys, "sequential probes", "edit")
    first = next(todo, None)
    model.set_memory_state(empty)
    injections = []  # per edit, the injection numbers that wrote it
    if first is not None:
        for record in tqdm(examples, desc="sequential edits", unit="edit"):
            before = model.num_injections
            model.inject(record["edit_text"], tokenizer=tokenizer, progress=False)
            injections.append(list(range(before + 1, model.num_injections + 1)))
    inject_seconds = timer.seconds()
    for position in ([first] if first is not None else []) + list(todo):
        index, age = probed[position]
        for mode in modes.missing(log, keys[position]):
            row = {"case_id": examples[index]["case_id"], "age": age}
            with modes.reading(mode):
                for style, prompter in prompters.items():
                    row[style] = probe_record(
                        model, prompter, examples[index], kind, True, None, pad_id, injections[index]
                    )
            log.add(mode_keys[mode][position], position, modes.tag(mode, row))
    wall_time = timer.seconds()
    return {
        mode: {
            "records": log.records(mode_keys[mode]),
            "probe_every": probe_every,
            "age_buckets": age_buckets,
            "num_filled_slots": model.num_filled_slots,
            "inject_seconds": inject_seconds,
            "wall_time_s": wall_time,
        }
        for mode in modes.names
    }


def sequential_metrics(records: Sequence[dict], styles: Sequence[str], age_buckets: int) -> dict:
    """Summaries over the probed edits and by age (records ordered newest-probed last, i.e. oldest first)."""
    size = max(1, -(-len(records) // age_buckets))
    by_age = {
        style: [
            {
                "age_min": records[min(start + size, len(records)) - 1]["age"],
                "age_max": records[start]["age"],
                **summarize([r[style] for r in records[start : start + size]]),
            }
            for start in range(0, len(records), size)
        ]
        for style in styles
    }
    return {"metrics": {style: summarize([r[style] for r in records]) for style in styles}, "by_age": by_age}


def metrics_of(document: dict) -> dict:
    """The metrics (and sequential summaries) of a results document, from its records."""
    styles, records = document["prompt_styles"], document["records"]
    fields = {
        "metrics": {
            style: {c: summarize([r[c][style] for r in records]) for c in ("no_edit", "memory", "in_context")}
            for style in styles
        }
    }
    sequential = document.get("sequential")
    if sequential:
        if "shard_documents" in document:  # merging shards: their probes back in order
            sequential = {
                **sequential,
                "records": interleave([d["sequential"]["records"] for d in document["shard_documents"]]),
            }
        fields["sequential"] = {
            **sequential,
            **sequential_metrics(sequential["records"], styles, sequential.get("age_buckets", 10)),
        }
    return fields
