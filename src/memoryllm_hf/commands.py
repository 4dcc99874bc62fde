"""Core subcommands: demo, convert, inject, ask, chat, stats."""

import argparse
from pathlib import Path


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


def load_folder(folder: str, read_mode: str | None = None):
    """(model, tokenizer) of a MemoryLlama folder whose memory a command may save back (a plain Llama folder is
    refused, not wrapped); `memoryllm_hf.load` checks the memory file before reading weights. `read_mode`
    overrides the folder's (a name of `READS`; "retrieve" needs a long-term store)."""
    from .folder import folder_config, locked
    from .loading import load

    folder_config(folder)
    with locked(folder):  # not while another process swaps the folder
        return load(folder, read_mode=read_mode)


def _inject(args: argparse.Namespace) -> int:
    from .folder import locked, read_text, replaced_slots, save_memory
    from .modeling import MEMORY_FILE, stored_content_hash

    text = read_text(args.file, args.text, args.encoding)
    with locked(args.folder):  # load, inject and save as one step: a concurrent inject waits, none is lost
        loaded = stored_content_hash(Path(args.folder) / MEMORY_FILE)
        model, tokenizer = load_folder(args.folder)
        before = model.memory_state()
        updates = model.inject(text, tokenizer=tokenizer, chunk_size=args.chunk_size, progress=True)
        save_memory(args.folder, model, expected_hash=loaded)  # (refuses a memory changed meanwhile)
        after = model.memory_state()
    print(
        f"{updates} memory update{'s' * (updates != 1)} ({after.num_injections} in total); "
        f"{replaced_slots(before, after)} of {before.num_filled_slots} stored slots per layer replaced; "
        f"{after.num_filled_slots}/{after.num_slots} slots filled; memory saved to {args.folder}"
    )
    return 0


def _ask(args: argparse.Namespace) -> int:
    from .greedy import reply

    model, tokenizer = load_folder(args.folder, args.read_mode)
    print(reply(model, tokenizer, [{"role": "user", "content": args.question}], args.max_new_tokens))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, tokenizer = load_folder(args.folder, args.read_mode)
    ChatSession(args.folder, model, tokenizer, args.max_new_tokens, args.autosave).run()
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .folder import folder_config, folder_memory, memory_report, plot_slot_norms, png_path

    config, state = folder_config(args.folder), folder_memory(args.folder)
    print("\n".join([f"memory of {args.folder}"] + ["  " + line for line in memory_report(state, config)]))
    if args.png:
        plot_slot_norms(state, args.png)
        print(f"slot norm histogram written to {png_path(args.png)}")
    return 0


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
    inject.set_defaults(func=_inject)

    ask = subparsers.add_parser("ask", help="answer one question from a folder's model and memory (greedy)")
    ask.add_argument("folder", help="MemoryLlama folder")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument(
        "--read-mode", choices=READ_MODE_CHOICES, metavar="MODE",
        help="override the folder's read mode (%(choices)s; retrieve needs a store)",
    )
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
    chat.set_defaults(func=_chat)

    stats = subparsers.add_parser(
        "stats", help="describe a folder's memory (N, K, injections, fill, slot norms, long-term store)"
    )
    stats.add_argument("folder", help="MemoryLlama folder")
    stats.add_argument("--png", help="also write a PNG histogram of the slot norms")
    stats.set_defaults(func=_stats)
