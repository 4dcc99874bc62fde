"""Core subcommands: demo, convert, inject, ask, chat, stats, drop-store, restore-previous."""

import argparse


class ReadModeNames:
    """The `--read-mode` choices: the names in the model's table of read modes (`READS`), looked up when an argument
    is checked or a subcommand's help is shown (building the parser, and `memoryllm-hf --help`, stay free of torch)."""

    def _names(self) -> tuple[str, ...]:
        from .modeling import READS

        return tuple(READS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


READ_MODE_CHOICES = ReadModeNames()


def _demo(args: argparse.Namespace) -> int:
    try:
        from .demo import main as demo_main
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.demo":
            raise
        raise FileNotFoundError("the demo is not part of this installation of memoryllm-hf") from None
    return int(demo_main(args.forwarded) or 0)


def _convert(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .convert import convert_official
    from .loading import torch_dtype
    from .modeling import MemoryLlamaForCausalLM

    if args.official:
        convert_official(args.source, args.output, dtype=torch_dtype(args.dtype))
    else:
        memory = {"num_memory_tokens": args.num_memory_tokens, "num_update_tokens": args.num_update_tokens}
        if args.read_mode:
            memory["read_mode"] = args.read_mode
        model = MemoryLlamaForCausalLM.from_base(args.source, gguf_file=args.gguf_file, **memory)
        if args.dtype:
            model = model.to(torch_dtype(args.dtype))
        model.save_pretrained(args.output)
        AutoTokenizer.from_pretrained(args.source, gguf_file=args.gguf_file).save_pretrained(args.output)
    print(f"saved MemoryLlama to {args.output}")
    return 0


def load_folder(folder: str, read_mode: str | None = None, device: str | None = None):
    """(model, tokenizer) of a MemoryLlama folder whose memory a command may save back (a plain Llama folder is
    refused, not wrapped); `memoryllm_hf.load` checks the memory file before reading weights. `read_mode`
    overrides the folder's (a name of `READS`; "retrieve" needs a long-term store); `device` places the model and
    wins over the store device in config.json."""
    from .folder import folder_config, locked
    from .loading import load

    folder_config(folder)
    with locked(folder):  # not while another process swaps the folder
        return load(folder, device=device, read_mode=read_mode)


def _inject(args: argparse.Namespace) -> int:
    from .folder import locked, read_text
    from .messages import inject_message
    from .service import FolderService

    text = read_text(args.file, args.text, args.encoding)
    with locked(args.folder):  # load, inject and save as one step: a concurrent inject waits, none is lost
        model, tokenizer = load_folder(args.folder, device=args.device)
        result = FolderService(args.folder, model, tokenizer).inject(text, args.chunk_size, progress=True)
    print(inject_message(result, args.folder))
    return 0


def _ask(args: argparse.Namespace) -> int:
    from .greedy import reply

    model, tokenizer = load_folder(args.folder, args.read_mode, args.device)
    print(reply(model, tokenizer, [{"role": "user", "content": args.question}], args.max_new_tokens))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, tokenizer = load_folder(args.folder, args.read_mode, args.device)
    ChatSession(args.folder, model, tokenizer, args.max_new_tokens, args.autosave).run()
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .folder import check_folder, folder_config, folder_memory, memory_report, plot_slot_norms, png_path
    from .messages import stats_text

    config, state = folder_config(args.folder), folder_memory(args.folder)
    lines = memory_report(state, config, args.folder) + check_folder(args.folder)
    if args.png:
        plot_slot_norms(state, args.png)
    print(stats_text(args.folder, lines, args.png and png_path(args.png)))
    return 0


def _drop_store(args: argparse.Namespace) -> int:
    from .folder import drop_store

    dropped = drop_store(args.folder)
    what = "a missing or unreadable store" if dropped is None else f"{dropped} stored injections"
    print(f"dropped the long-term store of {args.folder} ({what}); the pool is kept, new injections are stored again")
    return 0


def _restore_previous(args: argparse.Namespace) -> int:
    from .client import running_server
    from .folder import folder_config, locked, restore_previous_memory

    folder_config(args.folder)
    if running_server(args.folder) is not None:
        raise ValueError(f"a `memoryllm-hf serve` holds {args.folder}: stop it first (Ctrl-C), then restore")
    with locked(args.folder):
        state = restore_previous_memory(args.folder)
    print(f"restored the previous memory of {args.folder} ({state.num_injections} injections, content hash "
          f"{state.content_hash()[:16]}); the memory it replaced is kept in previous_memory/ (run again to undo)")
    return 0


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        help="where the model (and a store placed on a device by config.json) runs: cpu, cuda, cuda:1, ... "
        "(wins over config.json's long_term_memory_device)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", add_help=False, help="the quickstart: SmolLM2 remembers a text (`demo --help` for its options)"
    )
    demo.set_defaults(func=_demo, forwards_arguments=True)

    convert = subparsers.add_parser("convert", help="official MemoryLLM checkpoint, Llama or GGUF -> MemoryLlama")
    convert.add_argument("source", help="folder (or Hub id for a base Llama)")
    convert.add_argument("output", help="folder to write")
    convert.add_argument("--official", action="store_true", help="source is an official MemoryLLM checkpoint")
    convert.add_argument("--gguf-file", help="GGUF file name inside `source` (base Llama only)")
    convert.add_argument("--num-memory-tokens", type=int, default=1024, help="N slots per layer (base Llama)")
    convert.add_argument("--num-update-tokens", type=int, default=64, help="K slots per injection (base Llama)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights and memory")
    convert.add_argument(
        "--read-mode",
        choices=READ_MODE_CHOICES,
        metavar="MODE",
        help="base Llama: %(choices)s (default retrieve: retrieval reads from a long-term store; pool: official)",
    )
    convert.set_defaults(func=_convert)

    inject = subparsers.add_parser("inject", help="write a text into a folder's memory and save it (atomically)")
    inject.add_argument("folder", help="MemoryLlama folder")
    source = inject.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="text file to inject")
    source.add_argument("--text", help="text to inject")
    inject.add_argument("--encoding", default="utf-8", help="encoding of --file (default: utf-8)")
    inject.add_argument("--chunk-size", type=int, help="tokens per memory update (default: the model's)")
    add_device_argument(inject)
    inject.set_defaults(func=_inject)

    ask = subparsers.add_parser("ask", help="answer one question from a folder's model and memory (greedy)")
    ask.add_argument("folder", help="MemoryLlama folder")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument(
        "--read-mode", choices=READ_MODE_CHOICES, metavar="MODE",
        help="override the folder's read mode (%(choices)s; retrieve needs a store)",
    )
    add_device_argument(ask)
    ask.set_defaults(func=_ask)

    chat = subparsers.add_parser(
        "chat", help="interactive chat with memory commands (/remember, /forget, /snapshot, /restore, /stats, /save)"
    )
    chat.add_argument("folder", help="MemoryLlama folder")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument(
        "--read-mode", choices=READ_MODE_CHOICES, metavar="MODE",
        help="override the folder's read mode (%(choices)s; retrieve needs a store)",
    )
    chat.add_argument("--autosave", action="store_true", help="save the memory after every change")
    add_device_argument(chat)
    chat.set_defaults(func=_chat)

    stats = subparsers.add_parser(
        "stats", help="describe a folder's memory (N, K, injections, fill, slot norms, long-term store)"
    )
    stats.add_argument("folder", help="MemoryLlama folder")
    stats.add_argument("--png", help="also write a PNG histogram of the slot norms")
    stats.set_defaults(func=_stats)

    drop = subparsers.add_parser(
        "drop-store", help="drop a folder's long-term store on purpose, keeping the pool (e.g. after the file was lost)"
    )
    drop.add_argument("folder", help="MemoryLlama folder")
    drop.set_defaults(func=_drop_store)

    previous = subparsers.add_parser(
        "restore-previous",
        help="bring back the memory a folder held before its last full save (kept in FOLDER/previous_memory/)",
    )
    previous.add_argument("folder", help="MemoryLlama folder")
    previous.set_defaults(func=_restore_previous)
