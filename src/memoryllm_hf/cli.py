"""`memoryllm-hf` command line: each feature module registers its own subcommand."""

import argparse
import importlib
import sys

# Modules exposing `register(subparsers)`; each adds one or more subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = ("memoryllm_hf.commands",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm-hf", description="MemoryLLM for Hugging Face transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
