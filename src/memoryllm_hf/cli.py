"""`memoryllm-hf` command line: each feature module registers its own subcommands."""

import argparse
import importlib
import sys

# Modules exposing `register(subparsers)`; each adds one or more subcommands with `set_defaults(func=...)`
# (`client` routes the folder commands registered before it through a running `serve`).
COMMAND_MODULES = (
    "memoryllm_hf.commands",
    "memoryllm_hf.evaluation.cli",
    "memoryllm_hf.hub",
    "memoryllm_hf.train",
    "memoryllm_hf.serve",
    "memoryllm_hf.client",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm-hf", description="MemoryLLM for Hugging Face transformers")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for name, command in subparsers.choices.items():
        if name == "demo":  # the demo forwards its arguments
            continue
        try:
            command.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
        except argparse.ArgumentError:  # the command declares --threads itself
            pass
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input (ValueError, OSError) prints `error: ...` and exits with status 1."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "forwards_arguments", False):
        args.forwarded = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"memoryllm-hf {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
