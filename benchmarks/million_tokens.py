"""A million stored tokens: one disk-backed SmolLM2 store built up to 1,000,000 tokens, measured along the way.

One model (`from_base` defaults: "input" rule, N = 4,096, K = 256, retrieval reads) with
`long_term_memory_storage="disk"`, `long_term_memory_dtype="bfloat16"` and the store bound raised past the target.
The stream, in order (`build_stream`; one `inject` per item, token ids):

1. the passages of the SQuAD and NQ dev questions (`squad_qa` / `nq_qa` `context`), alternating SQuAD, NQ, ...,
   each distinct text once (a text shared by several questions is their common passage);
2. unrelated dev text, grouped into `--context-tokens` contexts as the evaluation harness does
   (`retention.unrelated_contexts`, file order): `squad_paragraphs` of articles no question comes from (the shipped
   file has none: all its paragraphs are of the questions' articles), `nq_passages` of titles no NQ question has,
   HotpotQA paragraphs (titles no question has); never a text equal to a question's passage, each text once;
3. filler where the dev data runs out (`filler_texts`): the prose of the Python standard library's documentation
   as installed with the interpreter: the `pydoc_data.topics` help texts (the language reference topics of
   `help()`), then module, class and function docstrings of the standard library's `.py` files, then of the
   installed packages' (`purelib`: transformers, torch, ...; each sorted by path, tests excluded, >= 12 words),
   grouped into contexts the same way, until the target of stored tokens.

Checkpoints (stored tokens >= 10k, 30k, 100k, 300k, 600k, 1M, and the first point with >= 1,000 injections): for
each scorer available ("bm25", "model", and "bm25+encoder" when the encoder package is installed) and each dataset,
recall@1 / recall@4 of the question's own passage among the scored blocks and how often the read chose it, for the
questions whose passages are stored (Wilson 95% intervals); the wall time of one question read with retrieval vs
the same question read from the pool (N = 4,096), side by side in this process (median of a handful, greedy,
`--timing-new-tokens` new tokens); resident memory (RSS, anonymous, file-backed, peak) and the bytes on disk. One
JSON record per checkpoint is appended to `--records`. At the first checkpoint with >= 1,000 injections the folder
is copied (hard links: every file of a model folder is immutable once written) for the `answers` run.

Resumable: the model folder (FOLDER/store) is saved every `--save-every` injections (a journal record or a
compaction writing one new segment file), and a killed build resumes from it: the stream is rebuilt (its
fingerprint must match the one recorded), the position is the item after which the folder's injection count is
reached, and checkpoints already recorded are skipped. The disk is checked before every item: the build stops
cleanly (saved, exit status 3) when less than `--min-free-gb` would be left.

Commands (one thread):
  OMP_NUM_THREADS=1 python -m benchmarks.million_tokens build --folder /data/million-store      # also resumes
  python -m benchmarks.million_tokens report                                                     # summary + plot
  OMP_NUM_THREADS=1 python -m benchmarks.million_tokens answers --folder /data/million-store/copy-1000 \\
      --read-modes retrieve --questions 200
  python -m benchmarks.million_tokens recall --text-only 1000 --scorers bm25 bm25+encoder   # no build: text scorers
"""

import argparse
import ast
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memoryllm_hf.evaluation.data import default_data_dir, read_jsonl
from memoryllm_hf.evaluation.metrics import score_answer, wilson_interval
from memoryllm_hf.evaluation.prompts import Prompter
from memoryllm_hf.evaluation.retention import unrelated_contexts
from memoryllm_hf.greedy import generate, greedy_config
from memoryllm_hf.loading import load
from memoryllm_hf.modeling.atomic_io import atomic_write, link_tree
from memoryllm_hf.modeling.memory_reader import select_injections
from memoryllm_hf.modeling.memory_store import MemoryBlock, store_num_slots
from memoryllm_hf.modeling.memory_text import split_ids
from memoryllm_hf.modeling.memory_writer import write_layout

DATASETS = {"squad": ("squad_qa.jsonl", "article"), "nq": ("nq_qa.jsonl", "title")}
CHECKPOINT_TOKENS = (10_000, 30_000, 100_000, 300_000, 600_000, 1_000_000)
COPY_INJECTIONS = 1000
STORE_TOKENS = 1_050_112  # the store bound (long_term_memory_tokens): past the target, a whole number of updates
STORE_DIR, COPY_DIR, PROGRESS_FILE = "store", "copy-1000", "progress.json"
RECORDS = Path("docs/results/million_tokens.records.jsonl")
SUMMARY = Path("docs/results/million_tokens.json")
PLOT = Path("docs/results/million_tokens.png")
FILLER_MIN_WORDS = 12
FILLER_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages")
EXIT_DISK = 3


# ---------------------------------------------------------------------------------------------------- the stream
@dataclass
class Item:
    """One `inject` call: its token ids, what it is ("passage", "unrelated", "filler") and, for a passage, the
    questions it answers ((dataset, row index) pairs)."""

    kind: str
    ids: list[int]
    owners: list[tuple[str, int]] = field(default_factory=list)


def normal_title(value) -> str:
    return str(value or "").replace("_", " ").strip().casefold()


def question_rows(data_dir: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(Path(data_dir) / file) for name, (file, _) in DATASETS.items()}


def unrelated_dev_texts(data_dir: Path, questions: dict[str, list[dict]]) -> list[dict]:
    """The dev unrelated texts ({"text", "source"}), in file order: SQuAD paragraphs of other articles than the
    questions', NQ passages of other titles, HotpotQA paragraphs of other titles (a title matching any question's
    article or title is left out: its text could answer the question); duplicates and passages left out."""
    data_dir = Path(data_dir)
    taken = {row["context"] for rows in questions.values() for row in rows}
    sources = {normal_title(row.get(source)) for name, (_, source) in DATASETS.items() for row in questions[name]}
    texts = []
    for row in read_jsonl(data_dir / "squad_paragraphs.jsonl"):
        texts.append((row["text"], row.get("article"), "squad_paragraphs"))
    for row in read_jsonl(data_dir / "nq_passages.jsonl"):
        texts.append((row["text"], row.get("title"), "nq_passages"))
    if (data_dir / "hotpotqa.jsonl").exists():
        for row in read_jsonl(data_dir / "hotpotqa.jsonl"):
            texts += [(p["text"], p["title"], "hotpotqa") for p in row["paragraphs"]]
    out = []
    for text, title, origin in texts:
        if text in taken or normal_title(title) in sources or not text.strip():
            continue
        taken.add(text)
        out.append({"text": text, "source": f"{origin}:{title}"})
    return out


def filler_texts():
    """Prose of the Python standard library's documentation (see the module docstring), in a fixed order."""
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield {"text": pydoc_data.topics.topics[name].strip(), "source": f"pydoc:{name}"}
    paths = sysconfig.get_paths()
    for label, folder in (("stdlib", Path(paths["stdlib"])), ("packages", Path(paths["purelib"]))):
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if any(part in FILLER_SKIP or part.startswith("test_") for part in relative.parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= FILLER_MIN_WORDS:
                        yield {"text": doc, "source": f"{label}:{relative}"}


def build_stream(tokenizer, data_dir: Path, target_tokens: int, context_tokens: int, filler=filler_texts) -> list[Item]:
    """The stream (see the module docstring), long enough to store `target_tokens` tokens."""
    questions = question_rows(data_dir)
    passages: dict[str, Item] = {}
    for index in range(max(map(len, questions.values()))):
        for name, rows in questions.items():
            if index < len(rows):
                text = rows[index]["context"]
                if text not in passages:
                    passages[text] = Item("passage", tokenizer(text, add_special_tokens=False)["input_ids"])
                passages[text].owners.append((name, index))
    items = list(passages.values())
    unrelated = unrelated_dev_texts(data_dir, questions)
    items += [Item("unrelated", c.ids) for c in unrelated_contexts(unrelated, tokenizer, "source", context_tokens)]
    missing = target_tokens - sum(len(item.ids) for item in items)
    if missing > 0:
        items += [Item("filler", ids) for ids in filler_contexts(tokenizer, filler(), missing, context_tokens,
                                                                   set(passages) | {t["text"] for t in unrelated})]
    return items


def filler_contexts(tokenizer, texts, tokens: int, context_tokens: int, seen: set) -> list[list[int]]:
    """Contexts (token ids) of the filler `texts` (not in `seen`, each once), grouped as the harness groups
    unrelated texts, holding at least `tokens` tokens in all (fewer only when the texts run out). A text's tokens
    past a context's end are dropped by the grouping, so texts are taken until the contexts themselves suffice."""
    chosen, count, goal, contexts = [], 0, tokens + 2 * context_tokens, []
    while True:
        exhausted = True
        for text in texts:
            if text["text"] in seen:
                continue
            seen.add(text["text"])
            chosen.append(text)
            count += len(tokenizer(text["text"] + "\n\n", add_special_tokens=False)["input_ids"])
            if count >= goal:
                exhausted = False
                break
        contexts = [c.ids for c in unrelated_contexts(chosen, tokenizer, "source", context_tokens)]
        have = sum(map(len, contexts))
        if have >= tokens or exhausted:
            return contexts
        goal = count + 2 * (tokens - have) + context_tokens


def stream_fingerprint(items: list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.kind, item.ids, item.owners]).encode())
    return digest.hexdigest()[:16]


def updates_of(item: Item, chunk: int) -> int:
    """Updates (injections) one `inject` of the item makes: its ids split into chunks of at most `chunk` tokens."""
    return -(-len(item.ids) // chunk)


# ---------------------------------------------------------------------------------------------------- measuring
def item_ends(items: list[Item], chunk: int) -> list[int]:
    """Injections stored after each prefix of the stream: [0, after item 0, after items 0-1, ...]."""
    ends = [0]
    for item in items:
        ends.append(ends[-1] + updates_of(item, chunk))
    return ends


def process_memory() -> dict[str, int]:
    """Resident memory of this process in bytes (Linux /proc; empty elsewhere)."""
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def disk_bytes(path: Path, seen: set | None = None) -> int:
    """Bytes allocated by the files under `path` (a file hard-linked twice counted once across calls sharing
    `seen`)."""
    seen = set() if seen is None else seen
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def rate(successes: int, n: int) -> dict:
    low_high = wilson_interval(successes, n)
    return {"n": n, "rate": successes / n if n else None, "ci95": [round(x, 4) for x in low_high] if n else None}


def available_scorers() -> list[str]:
    import importlib.util

    scorers = ["bm25", "model"]
    if importlib.util.find_spec("all_minilm_l6_v2") is not None:
        scorers.append("bm25+encoder")
    return scorers


def reranked(model, scores: torch.Tensor, prompt: list[int], weight: float) -> tuple[list[int], int | None]:
    """(the blocks the read chooses with the rerank of `memory_check` at `weight`, the best reranked candidate or None
    when there is none) for one question."""
    cfg, store, check = model.config, model.long_term_memory, model.reads["retrieve"].check
    select = functools.partial(select_injections, sizes=[block.num_slots for block in store],
                               calls=[block.call for block in store], budget=cfg.read_tokens,
                               threshold=cfg.retrieval_threshold)
    kept = cfg.retrieval_likelihood_weight
    cfg.retrieval_likelihood_weight = weight
    try:
        rescored, skip = check.rescore(model, store, scores, prompt, select)
        chosen = check.select_rescored(model, rescored, skip, select)
    finally:
        cfg.retrieval_likelihood_weight = kept
    candidates = [i for i in range(len(store)) if i not in skip]
    return chosen, max(candidates, key=lambda i: (float(rescored[i]), i), default=None)


def own_injections(items: list[Item], chunk: int, position: int) -> dict[tuple[str, int], set[int]]:
    """Injection numbers of each stored question's passage (items before `position`)."""
    out, done = {}, 0
    for item in items[:position]:
        numbers = set(range(done + 1, done + updates_of(item, chunk) + 1))
        for owner in item.owners:
            out[tuple(owner)] = numbers
        done += len(numbers)
    return out


@torch.no_grad()
def recall(model, prompts: dict, owned: dict, scorers: list[str], likelihood_weight: float | None = None) -> dict:
    """Per scorer and dataset: recall@1, recall@4 of the own passage among all blocks and how often the read chose
    it (with the scorer's calibrated cut and margin, `read_settings`: none for "model"; until 2026-12-07 the read
    kept the folder's, bm25's cut 0.1 and margin 0.05, whatever the scorer); seconds of scoring per question. With
    `likelihood_weight` (the rerank of `memory_check`), recall@1 is the own passage first among the reranked
    candidates, and the read is the read with the rerank in force."""
    read, cfg, store = model.reads["retrieve"], model.config, model.long_term_memory
    sizes, calls = [block.num_slots for block in store], [block.call for block in store]
    injections = torch.tensor([block.injection for block in store])
    results, kept = {}, {field: getattr(cfg, field) for field in READ_FIELDS}
    try:
        for scorer in scorers:
            for field, value in read_settings(model, f"retrieve@{scorer}").items():
                setattr(cfg, field, value)
            counts, seconds = {}, []
            for key in tqdm(sorted(owned), desc=f"recall ({scorer})", unit="q", leave=False):
                ids = torch.tensor([prompts[key]])
                start = time.perf_counter()
                row = read.scores(model, ids, torch.ones_like(ids))[0].float().cpu()
                seconds.append(time.perf_counter() - start)
                own = torch.isin(injections, torch.tensor(sorted(owned[key])))
                rank = int(own[row.argsort(descending=True, stable=True)].nonzero()[0, 0])
                first = rank < 1
                if likelihood_weight is None:
                    chosen = select_injections(row, sizes, calls, cfg.read_tokens, cfg.retrieval_threshold,
                                               cfg.retrieval_neighbors, cfg.retrieval_margin)
                else:
                    chosen, best = reranked(model, row, prompts[key], likelihood_weight)
                    first = first if best is None else bool(own[best])  # (no candidate: the scorer's order)
                hits = counts.setdefault(key[0], [0, 0, 0, 0])
                hits[0] += 1
                hits[1] += first
                hits[2] += rank < 4
                hits[3] += any(bool(own[i]) for i in chosen)
            results[scorer] = {
                name: {"recall@1": rate(h[1], h[0]), "recall@4": rate(h[2], h[0]), "read": rate(h[3], h[0])}
                for name, h in sorted(counts.items())
            }
            results[scorer]["seconds_per_question"] = statistics.median(seconds) if seconds else None
            if scorer == "model":  # its features (~4.6 KB per stored token) are dropped again: RAM stays bounded
                results[scorer]["memory_with_features"] = process_memory()
                read.clear()
    finally:
        for field, value in kept.items():
            setattr(cfg, field, value)
    return results


@torch.no_grad()
def read_timing(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> dict:
    """Seconds of one question (greedy, `new_tokens` tokens) read with retrieval vs from the pool, alternating
    which goes first; medians and the median of the per-question ratios."""
    cfg, kept = model.config, model.config.read_mode
    decoding = greedy_config(tokenizer, new_tokens)
    times = {"retrieve": [], "pool": []}
    try:
        for index, prompt in enumerate([prompts[0], *prompts]):  # the first one warms up, untimed
            for mode in ("retrieve", "pool") if index % 2 else ("pool", "retrieve"):
                cfg.read_mode = mode
                start = time.perf_counter()
                generate(model, tokenizer, [prompt], True, decoding)
                if index:
                    times[mode].append(time.perf_counter() - start)
    finally:
        cfg.read_mode = kept
    return {
        "questions": len(prompts),
        "new_tokens": new_tokens,
        "retrieve_s": statistics.median(times["retrieve"]),
        "pool_s": statistics.median(times["pool"]),
        "retrieve_over_pool": statistics.median(a / b for a, b in zip(times["retrieve"], times["pool"], strict=True)),
        "pool_slots": model.num_filled_slots,
        "scorer": cfg.retrieval_scorer,
    }


# ---------------------------------------------------------------------------------------------------- the build
def load_records(path: Path, run: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if run is None or r.get("run") == run]


def new_model(args):
    return load(
        args.model,
        long_term_memory_storage="disk",
        long_term_memory_dtype="bfloat16",
        long_term_memory_tokens=args.store_tokens,
        **({"read_mode": "retrieve"} if args.model == "tiny" else {}),
    )


def base_tokenizer(args):
    if args.model == "tiny":
        return load("tiny")[1]
    from transformers import AutoTokenizer

    from memoryllm_hf.default_model import smollm2_base_folder

    return AutoTokenizer.from_pretrained(smollm2_base_folder())


def save(model, folder: Path) -> float:
    """Save the memory into `folder`; the spill files of blocks now in the folder's segments are removed."""
    start = time.perf_counter()
    model.save_memory(folder)
    spill = model.store_spill.path
    if spill and not any(block.source and block.source.startswith(spill) for block in model.long_term_memory):
        model.store_spill.remove()
    return time.perf_counter() - start


def build(args) -> int:
    torch.set_num_threads(args.threads)
    root = Path(args.folder)
    folder, progress_path = root / STORE_DIR, root / PROGRESS_FILE
    tokenizer = base_tokenizer(args)
    if folder.exists():
        model, _ = load(str(folder))
        print(f"resuming from {folder}: {model.num_injections} injections", file=sys.stderr)
    else:
        root.mkdir(parents=True, exist_ok=True)
        model, _ = new_model(args)
        model.save_pretrained(folder)
    model.retrieval_tokenizer = tokenizer
    cfg, chunk = model.config, model.config.inject_chunk_size
    items = build_stream(tokenizer, Path(args.data), args.target_tokens, args.context_tokens)
    run = f"{Path(args.folder).name}-{stream_fingerprint(items)}"
    kinds = {kind: sum(item.kind == kind for item in items) for kind in ("passage", "unrelated", "filler")}
    print(f"stream {run}: {len(items)} items {kinds}, {sum(len(item.ids) for item in items)} tokens",
          file=sys.stderr, flush=True)
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if progress and progress.get("stream") != stream_fingerprint(items):
        raise SystemExit(f"{progress_path} was written for another stream ({progress.get('stream')}): use another "
                         "--folder, or the same data, target and context size as the run being resumed")
    ends = item_ends(items, chunk)
    if model.num_injections not in ends:
        raise SystemExit(f"{folder} holds {model.num_injections} injections, not the end of any stream item: not a "
                         "folder of this build")
    position = ends.index(model.num_injections)
    # wall seconds injecting, saving, measuring; CPU seconds of this process injecting (the machine may be shared)
    seconds = {key: progress.get(f"{key}_seconds", 0.0) for key in ("inject", "inject_cpu", "save", "eval")}
    if progress.get("injections") != model.num_injections:  # killed after a save, before its progress line
        progress = {}
    done = {label for record in load_records(args.records, run) for label in record["labels"]}
    checkpoints = [(f"tokens>={t}", lambda s, n, t=t: s >= t) for t in args.checkpoints]
    checkpoints.append((f"injections>={args.copy_at}", lambda s, n: n >= args.copy_at))
    prompter = Prompter(tokenizer, args.style, cfg.max_position_embeddings)
    questions = question_rows(Path(args.data))
    prompts = {(name, i): prompter.question(row["question"]).ids for name, rows in questions.items()
               for i, row in enumerate(rows)}
    scorers = args.scorers or available_scorers()

    def write_progress() -> None:
        text = json.dumps({
            "stream": stream_fingerprint(items), "run": run, "position": position, "items": len(items),
            "injections": model.num_injections, "stored_tokens": store_num_slots(model.long_term_memory),
            **{f"{key}_seconds": value for key, value in seconds.items()},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=1)
        atomic_write(str(progress_path), lambda tmp: Path(tmp).write_text(text))

    def checkpoint(labels: list[str]) -> None:
        start = time.perf_counter()
        stored = store_num_slots(model.long_term_memory)
        if f"injections>={args.copy_at}" in labels and not (root / COPY_DIR).exists():
            link_tree(str(folder), str(root / f"{COPY_DIR}.partial"))
            os.replace(root / f"{COPY_DIR}.partial", root / COPY_DIR)
        owned = own_injections(items, chunk, position)
        timed = sorted(owned, key=lambda key: (key[1], key[0]))[: args.timing_questions]  # SQuAD and NQ alternate
        record = {
            "run": run, "labels": labels, "position": position, "items": len(items),
            "kinds_stored": {kind: sum(item.kind == kind for item in items[:position])
                             for kind in ("passage", "unrelated", "filler")},
            "stored_tokens": stored, "stored_injections": len(model.long_term_memory),
            "questions_stored": {name: sum(key[0] == name for key in owned) for name in questions},
            "recall": recall(model, prompts, owned, scorers),
            "timing": read_timing(model, tokenizer, [prompts[key] for key in timed], args.timing_new_tokens),
            "memory": {**process_memory(), "model_bytes": sum(t.numel() * t.element_size()
                                                              for t in (*model.parameters(), *model.buffers()))},
            "disk": {"store_folder": disk_bytes(folder), "free": shutil.disk_usage(root).free,
                     "spill": disk_bytes(Path(model.store_spill.path)) if model.store_spill.path else 0},
            # (tokens per CPU hour: `report`'s throughput between checkpoints; CPU time may start at a resume)
            "build": {**seconds, "stored_tokens_per_inject_hour": stored / max(seconds["inject"], 1e-9) * 3600},
            "settings": {k: getattr(cfg, k) for k in ("num_memory_tokens", "num_update_tokens", "inject_chunk_size",
                                                      "read_tokens", "retrieval_neighbors", "retrieval_threshold",
                                                      "retrieval_margin", "retrieval_scorer", "long_term_memory_tokens",
                                                      "long_term_memory_dtype", "long_term_memory_storage")},
            "meta": {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
                     "model": args.model, "context_tokens": args.context_tokens, "style": args.style,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        seconds["eval"] += time.perf_counter() - start
        args.records.parent.mkdir(parents=True, exist_ok=True)
        with open(args.records, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        done.update(labels)
        summary = {s: {d: r["recall@4"]["rate"] for d, r in v.items() if isinstance(r, dict) and "recall@4" in r}
                   for s, v in record["recall"].items()}
        print(f"checkpoint {labels}: {stored} tokens, {len(model.long_term_memory)} injections, recall@4 {summary}, "
              f"retrieve/pool {record['timing']['retrieve_over_pool']:.2f}", file=sys.stderr, flush=True)

    def due() -> list[str]:
        stored = store_num_slots(model.long_term_memory)
        return [label for label, test in checkpoints if label not in done and test(stored, model.num_injections)]

    bar = tqdm(total=len(items), initial=position, desc="stream", unit="item")
    last_saved = model.num_injections
    status = 0
    while True:
        labels = due()
        if labels:
            if model.num_injections != last_saved:
                seconds["save"] += save(model, folder)
                last_saved = model.num_injections
                write_progress()
            checkpoint(labels)
            write_progress()
        stored = store_num_slots(model.long_term_memory)
        if stored >= args.target_tokens or position >= len(items) or position == args.stop_at:
            break
        if shutil.disk_usage(root).free < args.min_free_gb * 2**30:
            print(f"stopping: under {args.min_free_gb} GB free on {root}'s disk; free space and run the same command "
                  "again to resume", file=sys.stderr)
            status = EXIT_DISK
            break
        start, cpu = time.perf_counter(), time.process_time()
        made = model.inject(items[position].ids, progress=False)
        seconds["inject"] += time.perf_counter() - start
        seconds["inject_cpu"] += time.process_time() - cpu
        if made != updates_of(items[position], chunk):
            raise RuntimeError(f"item {position} made {made} updates, {updates_of(items[position], chunk)} expected")
        position += 1
        bar.update(1)
        bar.set_postfix(tokens=store_num_slots(model.long_term_memory), injections=model.num_injections)
        if model.num_injections - last_saved >= args.save_every:
            seconds["save"] += save(model, folder)
            last_saved = model.num_injections
            write_progress()
    if model.num_injections != last_saved:
        seconds["save"] += save(model, folder)
    write_progress()
    bar.close()
    stored = store_num_slots(model.long_term_memory)
    print(f"{'done' if stored >= args.target_tokens else 'stopped'}: {stored} stored tokens, "
          f"{model.num_injections} injections, item {position} of {len(items)}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------------------------------- answers
def answers(args) -> int:
    """Answer accuracy on the store copy: each read mode (by name) and the passage inside the user turn with no
    memory; one record per question and condition, appended (a rerun skips what is recorded). With `--text-only N`
    (no folder; see `recall_only`) the text read only: it reads the blocks' token ids, which is all that store has."""
    torch.set_num_threads(args.threads)
    tokenizer = base_tokenizer(args)
    if not args.text_only:
        model = folder_model(args, tokenizer)  # (the answers do not need the stream)
    elif any(mode.partition("@")[0] != "text" for mode in args.read_modes):
        raise SystemExit("--text-only stores no slots: only the text read (read modes text or text@SCORER) can be "
                         "measured (use --folder)")
    else:
        model = stored_model(args, tokenizer)[0]
    prompter = Prompter(tokenizer, args.style, model.config.max_position_embeddings)
    decoding = greedy_config(tokenizer, args.max_new_tokens)
    questions = question_rows(Path(args.data))
    done = {(r["dataset"], r["index"], r["condition"]) for r in load_records(args.output)}
    weight = args.likelihood_weight
    # a condition is MODE[@SCORER] and the read options in force: +rerankW (likelihood rerank), +subject (gate)
    suffix = ("" if weight is None else f"+rerank{weight:g}") + ("+subject" if args.subject_gate else "")
    conditions = [*(mode + suffix for mode in args.read_modes), "passage_in_user_turn"]
    todo = [(name, i, c) for i in range(args.questions) for name in questions for c in conditions
            if i < len(questions[name]) and (name, i, c) not in done]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    kept = {field: getattr(model.config, field) for field in READ_FIELDS}
    for name, index, condition in tqdm(todo, desc="answers", unit="q"):
        row = questions[name][index]
        if condition == "passage_in_user_turn":
            prompt, memory = prompter.question(row["question"], context=row["context"]).ids, False
        else:
            for field, value in read_settings(model, condition.removesuffix(suffix), args.subject_gate).items():
                setattr(model.config, field, value)
            model.config.retrieval_likelihood_weight = weight
            model.config.retrieval_subject_gate = args.subject_gate
            memory = True
            prompt = prompter.question(row["question"]).ids
        generation = generate(model, tokenizer, [prompt], memory, decoding)[0]
        # the injections this condition's read mode read (before the folder's settings are restored)
        read = model.last_retrieval[0] if memory and isinstance(model.last_retrieval, list) else None
        for field, value in kept.items():
            setattr(model.config, field, value)
        scores = score_answer(generation, row["answers"])
        record = {"dataset": name, "index": index, "condition": condition, "question": row["question"],
                  "answers": row["answers"], **scores, "read": read}
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    summary = answer_summary(load_records(args.output))
    print(json.dumps(summary, indent=1))
    return 0


READ_FIELDS = ("read_mode", "retrieval_scorer", "retrieval_threshold", "retrieval_margin",
               "retrieval_likelihood_weight", "retrieval_subject_gate")


def read_settings(model, condition: str, subject_gate: bool | None = None) -> dict:
    """The config fields of a condition "MODE" (the folder's scorer) or "MODE@SCORER" (a scorer of the model's
    scorer table with its calibrated cuts, e.g. "text@bm25+encoder"; the cut for reads with or without the subject
    gate: `subject_gate`, else as the model is configured)."""
    from memoryllm_hf.modeling.memory_scoring import RETRIEVAL_SCORERS

    mode, _, scorer = condition.partition("@")
    if mode not in model.reads:
        raise SystemExit(f"read mode {mode!r} is not one of this model's: {sorted(model.reads)}")
    if not scorer:
        return {"read_mode": mode}
    if scorer not in RETRIEVAL_SCORERS:
        raise SystemExit(f"scorer {scorer!r} is not one of {sorted(RETRIEVAL_SCORERS)}")
    entry = RETRIEVAL_SCORERS[scorer]
    gate = model.config.retrieval_subject_gate if subject_gate is None else subject_gate
    return {"read_mode": mode, "retrieval_scorer": scorer, "retrieval_threshold": entry.cut(gate),
            "retrieval_margin": entry.margin}


def answer_summary(records: list[dict]) -> dict:
    out = {}
    for record in records:
        out.setdefault(record["condition"], {}).setdefault(record["dataset"], []).append(record)
    summary = {
        condition: {
            name: {"exact_hit": rate(int(sum(r["exact_hit"] for r in rows)), len(rows)),
                   "f1": sum(r["f1"] for r in rows) / len(rows)}
            for name, rows in sorted(by_data.items())
        }
        for condition, by_data in out.items()
    }
    baseline = out.get("passage_in_user_turn", {})
    for condition, by_data in out.items():  # on the questions both conditions answered
        for name, rows in by_data.items():
            base = {r["index"]: r["exact_hit"] for r in baseline.get(name, [])}
            paired = [(r["exact_hit"], base[r["index"]]) for r in rows if r["index"] in base]
            hits = sum(b for _, b in paired)
            if condition != "passage_in_user_turn" and hits:
                summary[condition][name]["vs_passage"] = {
                    "n": len(paired), "ratio": sum(a for a, _ in paired) / hits,
                    "gains": sum(1 for a, b in paired if a and not b), "losses": sum(1 for a, b in paired if b and not a)}
    return summary


# ---------------------------------------------------------------------------------------------------- recall
def stream_position(model, items_of) -> tuple[list[Item], int]:
    """The stream a saved folder was built from and the item it reached: the stream without filler first (a
    folder still in the dev data's passages and unrelated texts does not depend on the installed packages), else
    with it."""
    chunk = model.config.inject_chunk_size
    for filler in (lambda: iter(()), filler_texts):
        items = items_of(filler)
        ends = item_ends(items, chunk)
        if model.num_injections in ends:
            return items, ends.index(model.num_injections)
    raise SystemExit(f"the folder holds {model.num_injections} injections, not the end of any item of this stream: "
                     "not a folder of this build (or built with other --data / --context-tokens)")


def text_only_store(model, items: list[Item], injections: int) -> int:
    """Put into `model`'s long-term store what the build's store holds after the first stream items that make at
    least `injections` injections, as far as the text scorers, the likelihood check and the text read use it: every
    block's token ids exactly as `inject` cuts the item (`memory_text.split_ids`), its injection and call numbers,
    and as many slots as the write makes (`memory_writer.write_layout`), a zero view (no memory is written: the
    "model" scorer and the slot reads cannot use it). Returns the position (items stored)."""
    config, store, filled, position = model.config, [], 0, 0
    zero = torch.zeros((), dtype=model.memory.dtype)
    while len(store) < injections and position < len(items):
        call, position = len(store) + 1, position + 1
        for piece in split_ids(torch.tensor(items[position - 1].ids), config.inject_chunk_size):
            slots = write_layout(config, filled, piece.shape[1])[-1]  # as many slots as the write makes
            view = zero.expand(config.num_hidden_layers, slots, config.hidden_size)
            store.append(MemoryBlock(len(store) + 1, call, view, piece[0].to(torch.int32)))
            # the pool's fill after the write (memory_transition.next_state): a fresh "tile" pool is filled at once
            fresh_tile = filled == 0 and config.fresh_pool == "tile"
            filled = config.num_memory_tokens if fresh_tile else min(config.num_memory_tokens, filled + slots)
    if len(store) < injections:
        raise SystemExit(f"the stream holds {len(store)} injections, fewer than --text-only {injections}: raise "
                         "--target-tokens")
    model.swap_memory_state(dataclasses.replace(model.live_memory_state(), long_term=tuple(store)))
    return position


def folder_model(args, tokenizer):
    """The model saved in `--folder`, its text scorers reading with `tokenizer`."""
    model, _ = load(str(args.folder))
    model.retrieval_tokenizer = tokenizer
    return model


def stored_model(args, tokenizer) -> tuple:
    """(model, stream items, position) of `--folder` (the saved folder and the item it reached) or of
    `--text-only N` (a `from_base` model whose store is `text_only_store` after N injections)."""
    items_of = lambda filler: build_stream(tokenizer, Path(args.data), args.target_tokens,  # noqa: E731
                                           args.context_tokens, filler=filler)
    if not args.text_only:
        model = folder_model(args, tokenizer)
        return model, *stream_position(model, items_of)
    model, _ = load(args.model, long_term_memory_tokens=STORE_TOKENS,
                    **({"read_mode": "retrieve"} if args.model == "tiny" else {}))
    model.retrieval_tokenizer = tokenizer
    items = items_of(lambda: iter(()))
    if sum(updates_of(item, model.config.inject_chunk_size) for item in items) < args.text_only:
        items = items_of(filler_texts)
    return model, items, text_only_store(model, items, args.text_only)


def recall_only(args) -> int:
    """Recall of the scorers on a saved folder of the build (e.g. the 1,000-injection copy), measured as the
    build's checkpoints measure it; one record per run, appended to --output. With `--text-only N` no folder is
    needed: the store the build holds after N injections is rebuilt from the stream's token ids alone
    (`text_only_store`), which is all the text scorers read (seconds instead of the build's hours; the "model"
    scorer reads slots and is refused)."""
    torch.set_num_threads(args.threads)
    tokenizer = base_tokenizer(args)
    if args.text_only and "model" in (args.scorers or []):
        raise SystemExit('--text-only stores no slots: the "model" scorer cannot be measured (use --folder)')
    model, items, position = stored_model(args, tokenizer)
    if args.text_only:
        args.scorers = args.scorers or [name for name in available_scorers() if name != "model"]
    prompter = Prompter(tokenizer, args.style, model.config.max_position_embeddings)
    questions = question_rows(Path(args.data))
    owned = own_injections(items, model.config.inject_chunk_size, position)
    if args.questions:
        owned = {key: value for key, value in owned.items() if key[1] < args.questions}
    prompts = {key: prompter.question(questions[key[0]][key[1]]["question"]).ids for key in owned}
    scorers = args.scorers or available_scorers()
    record = {"folder": str(args.folder) if args.folder else f"text-only:{args.text_only}",
              "stored_tokens": store_num_slots(model.long_term_memory),
              "stored_injections": len(model.long_term_memory), "position": position,
              "questions_stored": {name: sum(key[0] == name for key in owned) for name in questions},
              "recall": recall(model, prompts, owned, scorers, args.likelihood_weight),
              "likelihood_weight": args.likelihood_weight,
              "memory": process_memory(),
              "meta": {"threads": torch.get_num_threads(), "torch": torch.__version__, "style": args.style,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({scorer: {name: {metric: value["rate"] for metric, value in by.items()}
                               for name, by in result.items() if isinstance(by, dict) and "recall@1" in by}
                      for scorer, result in record["recall"].items()}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------- report
def report(args) -> int:
    """The summary JSON and the plot (recall and read time against stored tokens, log x) from the records."""
    records = load_records(args.records)
    if args.run:
        records = [r for r in records if r["run"] == args.run]
    if not records:
        raise SystemExit(f"no records in {args.records}")
    records.sort(key=lambda r: r["stored_tokens"])
    rows = []
    for r in records:
        row = {"labels": r["labels"], "stored_tokens": r["stored_tokens"], "stored_injections": r["stored_injections"],
               "questions_stored": r["questions_stored"], "timing": r["timing"],
               "rss": r["memory"].get("rss"), "rss_anon": r["memory"].get("rss_anon"),
               "model_bytes": r["memory"]["model_bytes"], "store_folder_bytes": r["disk"]["store_folder"]}
        for scorer, by_data in r["recall"].items():
            for name, values in by_data.items():
                if isinstance(values, dict) and "recall@1" in values:
                    for metric in ("recall@1", "recall@4", "read"):
                        row[f"{scorer}/{name}/{metric}"] = values[metric]
        rows.append(row)
    summary = {"run": records[-1]["run"], "settings": records[-1]["settings"], "meta": records[-1]["meta"],
               "build": records[-1]["build"], "throughput": throughput(records), "rows": rows}
    if args.answers and args.answers.exists():
        summary["answers"] = answer_summary(load_records(args.answers))
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=1))
    plot(records, args.plot)
    print(f"wrote {args.summary} and {args.plot}")
    return 0


def throughput(records: list[dict]) -> list[dict]:
    """Stored tokens per hour of injecting between consecutive checkpoints: wall clock, and CPU time of the build
    process (where both records counted it)."""
    out = []
    for before, after in zip(records, records[1:], strict=False):
        tokens = after["stored_tokens"] - before["stored_tokens"]
        wall = after["build"]["inject"] - before["build"]["inject"]
        counted = "inject_cpu" in before["build"]  # (CPU time is recorded from the first resume with this code on)
        cpu = after["build"].get("inject_cpu", 0.0) - before["build"].get("inject_cpu", 0.0)
        out.append({"from_tokens": before["stored_tokens"], "to_tokens": after["stored_tokens"],
                    "tokens_per_wall_hour": tokens / wall * 3600 if wall > 0 else None,
                    "tokens_per_cpu_hour": tokens / cpu * 3600 if cpu > 0 and counted else None})
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["stored_tokens"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scorer in dict.fromkeys(scorer for record in records for scorer in record["recall"]):  # (every scorer run)
        for name, marker in (("squad", "o"), ("nq", "s")):
            points = [(t, r["recall"][scorer][name]["recall@4"]["rate"]) for t, r in zip(tokens, records, strict=True)
                      if name in r["recall"].get(scorer, {})]
            if points:
                left.plot(*zip(*points, strict=True), marker=marker, label=f"{scorer}, {name}")
    left.set_ylim(-0.02, 1.02)
    left.set_ylabel("recall@4 (own passage among the best 4 blocks)")
    left.set_title("Finding the passage (questions whose passage is stored)")
    left.legend(fontsize=8)
    right.plot(tokens, [r["timing"]["retrieve_s"] for r in records], "o-", label="retrieval read")
    right.plot(tokens, [r["timing"]["pool_s"] for r in records], "s-", label="pool read (N = 4,096)")
    right.set_ylabel("seconds per question (median)")
    right.set_title("One question as the store grows (times vary with load)")
    ratio = right.twinx()  # (measured side by side in one process: the comparison the load does not move)
    ratio.plot(tokens, [r["timing"]["retrieve_over_pool"] for r in records], "^--", color="grey",
               label="retrieval / pool (right axis)")
    ratio.set_ylim(0, max(1.05, max(r["timing"]["retrieve_over_pool"] for r in records) * 1.1))
    ratio.set_ylabel("retrieval read / pool read")
    lines = right.get_legend_handles_labels()
    more = ratio.get_legend_handles_labels()
    right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xlabel("stored tokens")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=default_data_dir())
    common.add_argument("--model", choices=("default", "tiny"), default="default")
    common.add_argument("--style", choices=("chat", "plain"), default="chat")
    common.add_argument("--threads", type=int, default=1)
    b = commands.add_parser("build", parents=[common], help="build (or resume) the store and measure checkpoints")
    b.add_argument("--folder", required=True, type=Path, help="outside the repository: grows to ~35 GB")
    b.add_argument("--target-tokens", type=int, default=1_000_000)
    b.add_argument("--store-tokens", type=int, default=STORE_TOKENS, help="long_term_memory_tokens (the store bound)")
    b.add_argument("--context-tokens", type=int, default=512)
    b.add_argument("--checkpoints", type=int, nargs="*", default=list(CHECKPOINT_TOKENS))
    b.add_argument("--copy-at", type=int, default=COPY_INJECTIONS, help="checkpoint + folder copy at this many "
                   "injections")
    b.add_argument("--scorers", nargs="*", help="default: bm25, model (+ bm25+encoder when installed)")
    b.add_argument("--save-every", type=int, default=32, help="save the folder every this many injections")
    b.add_argument("--timing-questions", type=int, default=5)
    b.add_argument("--timing-new-tokens", type=int, default=8)
    b.add_argument("--min-free-gb", type=float, default=8.0)
    b.add_argument("--stop-at", type=int, default=-1, help="stop after this many stream items (tests)")
    b.add_argument("--records", type=Path, default=RECORDS)
    stored = argparse.ArgumentParser(add_help=False)  # where the store comes from (answers, recall)
    where = stored.add_mutually_exclusive_group(required=True)
    where.add_argument("--folder", type=Path, help="a folder of the build (FOLDER/copy-1000)")
    where.add_argument("--text-only", type=int, metavar="N", help="no folder: the build's store after N injections "
                       "rebuilt from the stream's token ids (text scorers and the text read only)")
    stored.add_argument("--target-tokens", type=int, default=1_000_000)
    stored.add_argument("--context-tokens", type=int, default=512)
    a = commands.add_parser("answers", parents=[common, stored], help="answer accuracy on the 1,000-injection copy")
    a.add_argument("--read-modes", nargs="+", default=["retrieve"],
                   help='read modes by name, each optionally with a scorer: "text@bm25+encoder"')
    a.add_argument("--questions", type=int, default=200, help="per dataset")
    a.add_argument("--max-new-tokens", type=int, default=24)
    a.add_argument("--output", type=Path, default=Path("docs/results/million_tokens.answers.jsonl"))
    a.add_argument("--likelihood-weight", type=float, help="read with the rerank (retrieval_likelihood_weight); "
                   "conditions are recorded as MODE+rerankW")
    a.add_argument("--subject-gate", action="store_true", help="read with the subject gate (retrieval_subject_gate); "
                   "conditions are recorded as MODE+subject")
    c = commands.add_parser("recall", parents=[common, stored], help="recall of the scorers on a saved folder of "
                            "the build (or on its token ids alone: --text-only)")
    c.add_argument("--scorers", nargs="*", help="default: bm25, model (+ bm25+encoder when installed)")
    c.add_argument("--questions", type=int, default=0, help="only the first this many per dataset (0: all stored)")
    c.add_argument("--output", type=Path, default=Path("docs/results/million_tokens.recall.jsonl"))
    c.add_argument("--likelihood-weight", type=float, help="rerank the candidates (retrieval_likelihood_weight)")
    r = commands.add_parser("report", help="summary JSON and plot from the records")
    r.add_argument("--records", type=Path, default=RECORDS)
    r.add_argument("--run", help="only this run's records (default: all)")
    r.add_argument("--answers", type=Path, default=Path("docs/results/million_tokens.answers.jsonl"))
    r.add_argument("--summary", type=Path, default=SUMMARY)
    r.add_argument("--plot", type=Path, default=PLOT)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return {"build": build, "answers": answers, "recall": recall_only, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
