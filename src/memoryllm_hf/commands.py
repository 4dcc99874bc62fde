"""Core subcommands: `convert` (official checkpoint, base Llama or GGUF -> MemoryLlama folder)."""

import argparse

import torch


def _convert(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .convert import convert_official
    from .modeling import MemoryLlamaForCausalLM

    if args.official:
        convert_official(args.source, args.output, dtype=getattr(torch, args.dtype) if args.dtype else None)
    else:
        memory = {"num_memory_tokens": args.num_memory_tokens, "num_update_tokens": args.num_update_tokens}
        model = MemoryLlamaForCausalLM.from_base(args.source, gguf_file=args.gguf_file, **memory)
        if args.dtype:
            model = model.to(getattr(torch, args.dtype))
        model.save_pretrained(args.output)
        AutoTokenizer.from_pretrained(args.source, gguf_file=args.gguf_file).save_pretrained(args.output)
    print(f"saved MemoryLlama to {args.output}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser("convert", help="official MemoryLLM checkpoint, Llama or GGUF -> MemoryLlama")
    convert.add_argument("source", help="folder (or Hub id for a base Llama)")
    convert.add_argument("output", help="folder to write")
    convert.add_argument("--official", action="store_true", help="source is an official MemoryLLM checkpoint")
    convert.add_argument("--gguf-file", help="GGUF file name inside `source` (base Llama only)")
    convert.add_argument("--num-memory-tokens", type=int, default=1024, help="N slots per layer (base Llama)")
    convert.add_argument("--num-update-tokens", type=int, default=64, help="K slots per injection (base Llama)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights and memory")
    convert.set_defaults(func=_convert)
