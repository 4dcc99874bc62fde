"""Train a MemoryLlama: `accelerate launch -m memoryllm_hf.train --config configs/tiny_kv.yaml`
(or `python -m memoryllm_hf.train ...` for one process; also `memoryllm-hf train ...`)."""

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config (.yaml or .json), see configs/")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.max_steps=10 (repeatable)",
    )
    parser.add_argument("--output-dir", help="where checkpoints, the adapter and loss curves go (config output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def run(args: argparse.Namespace) -> int:
    from .training import Trainer, load_config, make_accelerator

    overrides = args.overrides + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_config(args.config, overrides)
    trainer = Trainer(config, make_accelerator(config, cpu=args.cpu))
    if args.resume and trainer.resume():
        trainer.accelerator.print(f"resumed at step {trainer.step}")
    summary = trainer.train()
    trainer.accelerator.print(json.dumps(summary))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train memory adapters with the MemoryLLM objective")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoryllm_hf.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
