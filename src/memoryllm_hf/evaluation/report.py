"""Markdown tables from evaluation results files (what the README and docs/evaluation.md show).

    python -m memoryllm_hf.evaluation.report docs/results/*.json
    python -m memoryllm_hf.evaluation.report --merge OUT.json SHARD0.json SHARD1.json ...

Each file becomes a heading (task, dataset, examples, model, memory, wall time), the exact command that reproduces it
(rebuilt from the recorded configuration) and its table. `--merge` first joins the results of all shards of one
run (`--shard i/n`) into OUT.json (records in example order, metrics recomputed, PNG beside it) and reports that.
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

# Recorded configuration entries that are not command-line flags of `memoryllm-hf eval TASK`.
NOT_FLAGS = ("command", "task", "output", "resume")


def command(config: dict, output: str | None = None) -> str:
    """The `memoryllm-hf eval` command line that the recorded `config` came from."""
    parts = ["memoryllm-hf eval", config["task"]]
    for key, value in config.items():
        if key in NOT_FLAGS or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif key == "shard":
            parts.append(f"{flag} {value[0]}/{value[1]}")
        elif key == "set":
            parts += [f"{flag} {pair}" for pair in value]
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    if output or config.get("output"):
        parts.append(f"--output {output or config['output']}")
    return " ".join(parts)


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if minutes < 2 else f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _styles(result: dict) -> list[str]:
    return [style for style in ("plain", "chat") if style in result.get("metrics", {})]


def editing_table(result: dict) -> str:
    scores = ["efficacy", "generalization", "specificity", "score", "exact_score"]
    rows = []
    for style in _styles(result):
        for condition in ("no_edit", "memory", "in_context"):
            metrics = result["metrics"][style][condition]
            rows.append([style, condition, metrics["n"], *(metrics[s] for s in scores)])
        sequential = result.get("sequential", {}).get("metrics", {}).get(style)
        if sequential:
            rows.append([style, "memory, sequential", sequential["n"], *(sequential[s] for s in scores)])
    header = ["prompt", "condition", "n", "efficacy", "generalization", "specificity", "Score", "exact Score"]
    return _table(header, rows)


def retention_table(result: dict) -> str:
    grid = result["protocol"]["grid"]
    rows = []
    for style in _styles(result):
        # (results files of the earlier protocol have one in-context condition, "in_context": related + k texts)
        conditions = ("no_memory", "passage_only", "memory", "same_text", "in_context")
        for condition in [c for c in conditions if c in result["metrics"][style]]:
            cells = result["metrics"][style][condition]
            rows.append([style, condition.replace("_", " "), *(cells[str(k)]["exact_hit"] for k in grid)])
        rows.append([style, "memory meets no memory at k", result["metrics"][style]["memory_meets_no_memory_at_k"]])
    rows.append(["", "bound (1-K/N)^u", *(result["metrics"]["retention_bound"][str(k)] for k in grid)])
    rows.append(["", "updates after the passage", *(result["metrics"]["updates_after_related"][str(k)] for k in grid)])
    width = 2 + len(grid)
    rows = [row + [""] * (width - len(row)) for row in rows]
    return _table(["prompt", "exact hit of", *(f"k={k}" for k in grid)], rows)


def longcontext_table(result: dict) -> str:
    rows = [
        [style, condition, cells["n"], cells["f1"], cells["exact_match"], cells["exact_hit"]]
        for style in _styles(result)
        for condition, cells in result["metrics"][style].items()
    ]
    return _table(["prompt", "condition", "n", "F1", "EM", "exact hit"], rows)


def integrity_table(result: dict) -> str:
    m = result["metrics"]
    row = [
        m["injections"],
        m["updates"],
        m["probes"],
        m["final_accuracy"] if m["probes"] else None,
        m["max_nonfinite"],
        m["norm_max"],
        1e3 * m["seconds_per_update"],
    ]
    header = ["injections", "updates", "probes", "running accuracy", "max non-finite", "max slot norm", "ms/update"]
    return _table(header, [row])


TABLES: dict[str, Callable[[dict], str]] = {
    "editing": editing_table,
    "retention": retention_table,
    "longcontext": longcontext_table,
    "integrity": integrity_table,
}


def report(path: str | Path) -> str:
    """Heading, command and table of one results file."""
    result = json.loads(Path(path).read_text())
    model, data = result["model"], result["data"]
    memory = model["memory"]
    examples = data.get("num_examples", sum(part["num_examples"] for part in data.get("parts", [])))
    heading = (
        f"**{result['task']}** · {data['dataset'] or 'random tokens'} · {examples} examples · model `{model['spec']}` "
        f"({model['dtype']}, N = {memory['num_memory_tokens']}, K = {memory['num_update_tokens']}, "
        f"{memory['memory_update']} rule) · {_duration(result['wall_time_s'])} · `{Path(path).name}`"
    )
    return f"{heading}\n\n```\n{command(result['config'], str(path))}\n```\n\n{TABLES[result['task']](result)}\n"


def _task_module(task: str):
    from . import editing, longcontext, retention

    modules = {"editing": editing, "retention": retention, "longcontext": longcontext}
    if task not in modules:
        raise ValueError(f"{task} runs are one chain and are not split into shards: there is nothing to merge")
    return modules[task]


def merge(output: str | Path, shards: list[str | Path]) -> Path:
    """Join the results files of all shards of one run into `output` (and its PNG)."""
    from .plots import PLOTS
    from .records import merge_shards
    from .runner import write_json

    documents = [json.loads(Path(path).read_text()) for path in shards]
    task = documents[0]["task"] if documents else None
    merged = merge_shards(documents, _task_module(task).metrics_of)
    merged["config"]["output"] = str(output)
    write_json(output, merged)
    plot = PLOTS.get(task)
    if plot is not None and (task != "editing" or merged.get("sequential")):
        plot(merged, Path(output).with_suffix(".png"))
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files written by `memoryllm-hf eval`")
    parser.add_argument("--merge", metavar="OUT", help="merge the given shard results into OUT, then report it")
    args = parser.parse_args(argv)
    paths = [merge(args.merge, args.results)] if args.merge else args.results
    print("\n".join(report(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
