"""The full evaluation plan as one script: every run of the README's tables at its full dev size, all read modes.

    python -m memoryllm_hf.evaluation.plan --list
    python -m memoryllm_hf.evaluation.plan --device cuda --dtype bfloat16            # all runs, one after another
    python -m memoryllm_hf.evaluation.plan --device cuda --dtype bfloat16 --only retention-nq editing-zsre
    python -m memoryllm_hf.evaluation.plan --dry-run                                  # print the commands

Each task runs once for all the default model's read modes (`--read-modes`: the memory is written once, every mode
reads it in turn, the conditions without memory are asked once; one results file with a table per read mode).

Each run writes `OUT_DIR/NAME.json` (+ `.records.jsonl`, PNG) with `memoryllm-hf eval`; a run whose log exists is
continued with `--resume` (so the script can be started again after any stop), a run whose results file exists is
skipped, and a run whose log another process holds (a second plan process on the other core) is left to it, so two
`plan` processes share the runs. `--cap N` caps every size (examples, stream contexts, integrity updates) for a
smoke run (the tests run the whole plan this way on the tiny model and the CPU). Then
`python -m memoryllm_hf.evaluation.report --readme README.md` regenerates the README's tables from the results files.
"""

import argparse
import sys
import time
from pathlib import Path

# Read modes (names of the model's table `READS`) that need a trained checkpoint the default model is not.
TRAINED_READS = ("mplus",)


def default_read_modes() -> list[str]:
    """The default model's read modes: every entry of `READS` but those that need a trained checkpoint."""
    from ..modeling import READS

    return [name for name in READS if name not in TRAINED_READS]


# name -> arguments of `memoryllm-hf eval` (the read modes, device, dtype, output are added per run)
RUNS = {
    "retention-squad": ["retention", "--dataset", "squad", "--limit", "400", "--protocol", "stream",
                        "--checkpoint-every", "8", "--ask-spacing", "doubling", "--prompt-style", "chat"],
    "retention-nq": ["retention", "--dataset", "nq", "--limit", "400", "--protocol", "stream",
                     "--checkpoint-every", "8", "--ask-spacing", "doubling", "--prompt-style", "chat"],
    "editing-counterfact": ["editing", "--dataset", "counterfact", "--limit", "2000", "--sequential",
                            "--prompt-style", "chat"],
    "editing-zsre": ["editing", "--dataset", "zsre", "--limit", "700", "--sequential", "--prompt-style", "chat"],
    "longcontext-hotpotqa": ["longcontext", "--dataset", "hotpotqa", "--limit", "300", "--prompt-style", "chat"],
    "integrity-smollm2": ["integrity", "--dataset", "both", "--updates", "10000", "--probe-every", "50",
                          "--record-every", "100", "--prompt-style", "chat"],
}  # fmt: skip
# Runs whose results do not depend on how the memory is read (no reads of a real model): once, not per read mode.
ONCE = {"integrity-tiny-1m": ["integrity", "--tiny", "--updates", "1000000", "--record-every", "1000"]}
CAPPED = ("--limit", "--updates", "--stream-contexts")


def plan(read_modes=None) -> dict[str, list[str]]:
    """Every run of the plan: name -> `memoryllm-hf eval` arguments (each run serves all `read_modes`, default: the
    default model's)."""
    read_modes = list(read_modes or default_read_modes())
    runs = {name: [*args, "--read-modes", *read_modes] for name, args in RUNS.items()}
    return {**runs, **ONCE}


def capped(args: list[str], cap: int) -> list[str]:
    """`args` with every size at most `cap` (a stream limited to `cap` contexts beyond the prefill)."""
    args = list(args)
    for flag in CAPPED:
        if flag in args:
            index = args.index(flag) + 1
            args[index] = str(min(int(args[index]), cap))
    if args[0] == "retention" and "--stream-contexts" not in args:
        args += ["--stream-contexts", str(cap + 8), "--checkpoint-every", "2"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (see --list)")
    parser.add_argument("--list", action="store_true", help="print the runs' names and arguments")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--out-dir", default="docs/results", help="where the results files go")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model", default="default", help="the model under evaluation (default: SmolLM2)")
    parser.add_argument("--data", help="folder of the evaluation data")
    parser.add_argument("--read-modes", nargs="+", help="read modes every run serves (default: the model's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--cap", type=int, help="cap every size at N (smoke runs)")
    parser.add_argument("--cost", action="store_true", help="print what each run has spent so far (wall and CPU "
                        "hours over all its sittings, from its record log) and the plan's total; run nothing")
    args = parser.parse_args(argv)
    runs = plan(args.read_modes)
    unknown = sorted(set(args.only or []) - set(runs))
    if unknown:
        parser.error(f"unknown runs {unknown}; --list shows them")
    from .cli import main as evaluate
    from .records import LogBusy

    if args.cost:
        return print_cost(runs, Path(args.out_dir), args.only)
    for name, run in runs.items():
        if args.only and name not in args.only:
            continue
        if args.list:
            print(f"{name}: memoryllm-hf eval {' '.join(run)}")
            continue
        output = Path(args.out_dir) / f"{name}.json"
        if output.exists():
            print(f"{name}: {output} exists, skipped")
            continue
        command = capped(run, args.cap) if args.cap else list(run)
        command += ["--model", "tiny" if "--tiny" in run else args.model, "--dtype", args.dtype]
        command += ["--threads", str(args.threads), "--output", str(output)]
        command += ["--device", args.device] if args.device else []
        command += ["--data", args.data] if args.data else []
        if "--tiny" not in run:
            command += [part for pair in args.set or [] for part in ("--set", pair)]
        if output.with_name(output.stem + ".records.jsonl").exists():
            command.append("--resume")
        print(f"{name}: memoryllm-hf eval {' '.join(command)}", flush=True)
        if args.dry_run:
            continue
        started = time.perf_counter()
        try:
            evaluate(["eval", *command])
        except LogBusy:  # another plan process runs it: go on with the next run
            print(f"{name}: its record log is held by another run, skipped", flush=True)
            continue
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def print_cost(runs: dict, out_dir: Path, only=None) -> int:
    """One line per run: finished or not, records, sittings, wall and CPU hours so far; then the total CPU hours."""
    from .records import log_path, log_spent

    total = 0.0
    for name in runs:
        if only and name not in only:
            continue
        output = out_dir / f"{name}.json"
        spent = log_spent(log_path(output))
        state = "finished" if output.exists() else "not started" if spent is None else "in progress"
        if spent is None or spent["cpu_s"] is None:
            extra = "" if spent is None else f", {spent['records']} records (no cost recorded)"
            print(f"{name}: {state}{extra}")
            continue
        total += spent["cpu_s"]
        sittings = f"{spent['sittings']} sitting{'s' if spent['sittings'] != 1 else ''}"
        print(f"{name}: {state}, {spent['records']} records, {sittings}, "
              f"{spent['wall_s'] / 3600:.2f} h wall, {spent['cpu_s'] / 3600:.2f} CPU h")
    print(f"total: {total / 3600:.2f} CPU h recorded (records written before costs were recorded are not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
