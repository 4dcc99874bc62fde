"""`memoryllm-hf` command line: each feature module registers its own subcommands."""

import argparse
import importlib
import sys

# Modules exposing `register(subparsers)`; each adds one or more subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = ("memoryllm_hf.commands", "memoryllm_hf.evaluation.cli", "memoryllm_hf.hub", "memoryllm_hf.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm-hf", description="MemoryLLM for Hugging Face transformers")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input (ValueError, OSError) prints `error: ...` and exits with status 1."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "forwards_arguments", False):
        args.forwarded = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"memoryllm-hf {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
