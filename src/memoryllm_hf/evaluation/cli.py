"""`memoryllm-hf eval TASK ...` (also `python -m memoryllm_hf.evaluation TASK ...`): run a task, write JSON + PNG."""

import argparse
import sys
from pathlib import Path

from ..loading import DTYPE_NAMES
from .data import default_data_dir, load_data
from .prompts import PROMPT_STYLES

# torch, the model and the tasks are imported when a task runs: `--help` stays fast.

TASK_DATASETS = {
    "retention": ("squad", "nq"),
    "editing": ("counterfact", "zsre"),
    "longcontext": ("hotpotqa",),
    "integrity": ("squad", "nq", "both"),
}


def _styles(args: argparse.Namespace) -> list[str]:
    return list(PROMPT_STYLES) if args.prompt_style == "both" else [args.prompt_style]


def _read_modes(args: argparse.Namespace) -> None:
    """`--read-modes A` alone is `--read-mode A`; several modes leave `read_mode` unset (the model serves them all)."""
    modes = list(dict.fromkeys(args.read_modes or []))
    if modes and args.read_mode is not None:
        raise ValueError("give --read-mode MODE (one) or --read-modes MODE [MODE ...] (several), not both")
    if len(modes) == 1:
        args.read_mode, modes = modes[0], []
    args.read_modes = modes or None


def _setup(args: argparse.Namespace):
    import torch

    from .models import load_model, parse_overrides
    from .runner import Timer, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    seed_everything(args.seed)
    args.timer = Timer()
    memory = {
        "num_memory_tokens": args.num_memory_tokens,
        "num_update_tokens": args.num_update_tokens,
        "memory_update": args.memory_update,
        "fresh_pool": args.fresh_pool,
    }
    overrides = parse_overrides(args.set or [])
    if args.read_mode is not None:
        overrides["read_mode"] = args.read_mode
    if args.read_modes and "read_mode" in overrides:
        raise ValueError("--read-modes chooses the read modes; drop --set read_mode=...")
    model, tokenizer, info = load_model(args.model, args.device, args.dtype, args.seed, overrides=overrides, **memory)
    if args.read_modes:
        from .modes import ReadModes

        ReadModes(model, args.read_modes)  # every mode servable (else an error that says what to set)
        info["read"] = {**info.get("read", {}), "read_modes": args.read_modes}
    return model, tokenizer, info


def _config(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if key not in ("func", "timer", "log")}


def _output(args: argparse.Namespace, dataset: str | None) -> Path:
    if args.output:
        return Path(args.output)
    shard = f"-shard{args.shard[0]}of{args.shard[1]}" if args.shard else ""
    return Path("outputs") / "eval" / f"{args.task}-{dataset or 'tiny'}{shard}.json"


def _log(args: argparse.Namespace, model_info: dict, data_info: dict):
    """The run's record log beside its results file (continued with --resume)."""
    from .records import RecordLog, log_path, run_header

    header = run_header(args.task, _config(args), data_info, model_info)
    path = log_path(_output(args, data_info.get("dataset")))
    args.log = RecordLog(path, header, resume=args.resume, shard=args.shard or (0, 1))  # closed by main()
    return args.log


def _finish(args: argparse.Namespace, model_info: dict, data_info: dict, result: dict, plot=None) -> int:
    from .runner import result_document, write_json

    result.setdefault("wall_time_s", args.timer.seconds())
    if getattr(args, "log", None) is not None:  # the whole run, over the sittings of a resumed one
        spent = args.log.spent()
        result.update(sitting_wall_time_s=result["wall_time_s"], wall_time_s=spent["wall_s"],
                      cpu_time_s=spent["cpu_s"], sittings=spent["sittings"])
    document = result_document(args.task, _config(args), model_info, data_info, args.seed, **result)
    output = _output(args, data_info.get("dataset"))
    write_json(output, document)
    print(f"results: {output}")
    from .modes import sub_documents

    for mode, sub in sub_documents(document):
        if plot is not None:
            picture = output.with_suffix(".png") if mode is None else output.with_name(f"{output.stem}-{mode}.png")
            print(f"plot: {plot(sub, picture)}")
        if mode is not None:
            print(f"read mode {mode}:")
        _print_summary(sub)
    return 0


def _print_summary(document: dict) -> None:
    """A short table of the headline numbers on stdout."""
    metrics = document["metrics"]
    print(f"{document['task']} wall time {document.get('wall_time_s', 0):.1f} s")
    for style, conditions in metrics.items():
        if not isinstance(conditions, dict) or style in ("retention_bound", "updates_after_related"):
            print(f"  {style}: {conditions}")
            continue
        for condition, values in conditions.items():
            if isinstance(values, dict) and "n" not in values:
                values = {k: v["exact_hit"] for k, v in values.items()}
            print(f"  {style:>6} {condition:<12} {values}")


def _retention(args: argparse.Namespace) -> int:
    from .plots import plot_retention

    if args.protocol != "stream" and args.read_modes and len(set(args.read_modes)) > 1:
        raise ValueError(
            "--read-modes (several) is served by the stream protocol; run the per-question protocol once per "
            "--read-mode"
        )
    model, tokenizer, info = _setup(args)
    data = load_data(args.data, args.dataset, args.limit)
    common = {
        "context_tokens": args.context_tokens,
        "prefill": args.prefill,
        "max_new_tokens": args.max_new_tokens or 16,
        "window": args.window,
        "seed": args.seed,
        "log": _log(args, info, data.info()),
    }
    if args.protocol == "stream":
        from .stream import run_retention_stream

        if args.grid or args.in_context_max_k is not None or args.shared_depth != 6:
            raise ValueError(
                "--grid, --in-context-max-k and --shared-depth belong to --protocol per-question; the stream protocol "
                "takes --checkpoint-every, --ask-spacing, --stream-contexts, --max-distance and --same-text-max-contexts"
            )
        result = run_retention_stream(
            model,
            tokenizer,
            data,
            _styles(args),
            checkpoint_every=args.checkpoint_every,
            ask_spacing=args.ask_spacing or "every",
            stream_contexts=args.stream_contexts,
            max_distance=args.max_distance,
            same_text_max_contexts=args.same_text_max_contexts,
            batch_size=args.batch_size,
            read_modes=args.read_modes,
            **common,
        )
    else:
        from .retention import DEFAULT_GRID, run_retention

        args.grid = args.grid or list(DEFAULT_GRID)
        result = run_retention(
            model,
            tokenizer,
            data,
            _styles(args),
            grid=args.grid,
            shared_depth=None if args.shared_depth < 0 else args.shared_depth,
            in_context_max_k=args.in_context_max_k,
            **common,
        )
    return _finish(args, info, data.info(), {"prompt_styles": _styles(args), **result}, plot_retention)


def _editing(args: argparse.Namespace) -> int:
    from .editing import run_editing
    from .plots import plot_sequential_editing

    model, tokenizer, info = _setup(args)
    data = load_data(args.data, args.dataset, args.limit)
    result = run_editing(
        model,
        tokenizer,
        data,
        _styles(args),
        args.sequential,
        args.seed,
        args.window,
        sequential_probe_every=args.sequential_probe_every,
        log=_log(args, info, data.info()),
        read_modes=args.read_modes,
    )
    result.update(prompt_styles=_styles(args), decoding={"scoring": "teacher-forced target log-probabilities"})
    return _finish(args, info, data.info(), result, plot_sequential_editing if args.sequential else None)


def _longcontext(args: argparse.Namespace) -> int:
    from .longcontext import MAX_NEW_TOKENS, run_longcontext

    model, tokenizer, info = _setup(args)
    data = load_data(args.data, args.dataset, args.limit)
    result = run_longcontext(
        model,
        tokenizer,
        data,
        _styles(args),
        args.max_new_tokens or MAX_NEW_TOKENS,
        args.window,
        args.seed,
        log=_log(args, info, data.info()),
        read_modes=args.read_modes,
    )
    return _finish(args, info, data.info(), {"prompt_styles": _styles(args), **result})


def _integrity(args: argparse.Namespace) -> int:
    from .integrity import run_integrity
    from .plots import plot_integrity

    if args.shard:
        raise ValueError("integrity is one chain of injections; it cannot be split into shards (drop --shard)")
    if args.tiny:
        args.model = "tiny"
    model, tokenizer, info = _setup(args)
    if args.tiny:
        examples, data_info = None, {"dataset": None, "source": "random token chunks"}
        updates = args.updates or 1_000_000
    else:
        names = ("squad", "nq") if args.dataset == "both" else (args.dataset,)
        loaded = [load_data(args.data, name, args.limit) for name in names]
        examples = [example for data in loaded for example in data.examples]
        data_info = {"dataset": args.dataset, "parts": [data.info() for data in loaded]}
        updates = args.updates or 10_000
    style = "chat" if args.prompt_style == "both" else args.prompt_style
    result = run_integrity(
        model,
        tokenizer,
        examples,
        updates,
        style,
        args.probe,
        args.record_every,
        args.seed,
        args.probe_every,
        args.max_new_tokens or 16,
        log=_log(args, info, data_info),
        read_modes=args.read_modes,
    )
    result.update(prompt_styles=[style] if examples else [])
    return _finish(args, info, data_info, result, plot_integrity)


def _shard(text: str) -> tuple[int, int]:
    try:
        from .records import parse_shard

        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(parser: argparse.ArgumentParser, task: str) -> None:
    datasets = TASK_DATASETS[task]
    parser.add_argument(
        "--model",
        default="default",
        help="default (SmolLM2, training-free) | tiny | ADAPTER_FOLDER (from training) | MODEL_FOLDER",
    )
    parser.add_argument("--dataset", choices=datasets, default=datasets[-1] if task == "integrity" else datasets[0])
    parser.add_argument("--data", default=default_data_dir(), help="folder of the evaluation data (jsonl files)")
    parser.add_argument("--limit", type=int, help="first N examples (file order)")
    parser.add_argument("--output", help="results JSON (PNG beside it); default outputs/eval/TASK-DATASET.json")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--num-memory-tokens", type=int, help="N (default, tiny and adapter models)")
    parser.add_argument("--num-update-tokens", type=int, help="K (default, tiny and adapter models)")
    parser.add_argument("--memory-update", choices=["input", "output"], help="override the update rule")
    parser.add_argument("--fresh-pool", choices=["tile", "grow"], help="override how an empty pool fills")
    parser.add_argument("--prompt-style", choices=[*PROMPT_STYLES, "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, help="prompt window in tokens (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, help="greedy answer length")
    parser.add_argument(
        "--read-mode",
        help="the model's read_mode config field (e.g. pool | retrieve); an error for a model without that field",
    )
    parser.add_argument(
        "--read-modes",
        nargs="+",
        metavar="MODE",
        help="several read modes in one run (names of the model's READS): the memory is written once and every mode "
        "reads it in turn; the conditions without memory are asked once (results per mode)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a field of the model's config (repeatable); an error for a field the config does not have",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in OUTPUT.records.jsonl (same configuration)"
    )
    shard_help = "run only items I, I+N, I+2N, ... (merge the shards with `python -m memoryllm_hf.evaluation.report`)"
    if task == "integrity":
        shard_help = argparse.SUPPRESS
    parser.add_argument("--shard", type=_shard, metavar="I/N", help=shard_help)


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate retention, editing, long context or integrity")
    tasks = evaluate.add_subparsers(dest="task", required=True)

    retention = tasks.add_parser("retention", help="accuracy vs unrelated contexts injected (SQuAD, NQ)")
    _common(retention, "retention")
    retention.add_argument(
        "--protocol",
        choices=["stream", "per-question"],
        default="stream",
        help="stream: one memory, passages spread through one stream of unrelated contexts, asked at checkpoints; "
        "per-question: the paper's (a fresh chain of k contexts after each question's passage)",
    )
    retention.add_argument(
        "--checkpoint-every", type=int, default=4, help="stream: ask every stored question every N contexts"
    )
    retention.add_argument(
        "--ask-spacing",
        choices=["every", "doubling"],
        help="stream: ask a question at every checkpoint after its passage (every, the default) or at the first past 0, 1, 2, 4, "
        "... contexts since it (doubling: about one ask per distance bin, asks grow with log(distance))",
    )
    retention.add_argument("--stream-contexts", type=int, help="stream: use only the first N unrelated contexts")
    retention.add_argument(
        "--max-distance", type=int, help="stream: ask a question only up to N contexts after its passage"
    )
    retention.add_argument(
        "--same-text-max-contexts",
        type=int,
        help="stream: the same-text condition only up to N contexts after the passage (-1: never; default: while the "
        "passage fits the window)",
    )
    retention.add_argument("--batch-size", type=int, default=16, help="stream: questions per shared-memory batch")
    retention.add_argument(
        "--grid",
        type=lambda s: [int(k) for k in s.split(",")],
        help="per-question: unrelated contexts before each probe (0,1,2,...)",
    )
    retention.add_argument("--context-tokens", type=int, default=512, help="tokens per unrelated context")
    retention.add_argument("--prefill", type=int, help="unrelated contexts written first (default: fill the pool)")
    retention.add_argument(
        "--shared-depth",
        type=int,
        default=6,
        help="per-question: share a chunk's slots once its last D writes match the reference chain; -1: exact",
    )
    retention.add_argument("--in-context-max-k", type=int, help="per-question: same text only up to this k")
    retention.set_defaults(func=_retention)

    editing = tasks.add_parser("editing", help="CounterFact / zsRE efficacy, generalization, specificity")
    _common(editing, "editing")
    editing.add_argument("--sequential", action="store_true", help="also inject all edits into one pool, probe all")
    editing.add_argument(
        "--sequential-probe-every", type=int, default=1, help="sequential mode: probe every Nth edit (from the newest)"
    )
    editing.set_defaults(func=_editing)

    longcontext = tasks.add_parser("longcontext", help="HotpotQA distractor paragraphs injected, F1/EM")
    _common(longcontext, "longcontext")
    longcontext.set_defaults(func=_longcontext)

    integrity = tasks.add_parser("integrity", help="endless injections: running accuracy, norms, NaN, speed")
    _common(integrity, "integrity")
    integrity.add_argument("--updates", type=int, help="injections (default 10,000; 1,000,000 with --tiny)")
    integrity.add_argument("--record-every", type=int, default=100)
    integrity.add_argument(
        "--probe",
        choices=["generate", "teacher-forced"],
        default="generate",
        help="generate: greedy answer, exact hit; teacher-forced: one forward, strict (see docs)",
    )
    integrity.add_argument("--probe-every", type=int, default=1, help="ask after every Nth injection")
    integrity.add_argument("--tiny", action="store_true", help="random tiny model, random tokens, no QA probe")
    integrity.set_defaults(func=_integrity)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoryllm-hf")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        _read_modes(args)
        return int(args.func(args) or 0)
    finally:
        if getattr(args, "log", None) is not None:
            args.log.close()


if __name__ == "__main__":
    sys.exit(main())
