"""Markdown tables from evaluation results files (what the README and docs/evaluation.md show).

    python -m memoryllm_hf.evaluation.report docs/results/*.json
    python -m memoryllm_hf.evaluation.report --merge OUT.json SHARD0.json SHARD1.json ...
    python -m memoryllm_hf.evaluation.report --recompute docs/results/*.json   # metrics (with intervals) from records
    python -m memoryllm_hf.evaluation.report --readme README.md [--check]

Each file becomes a heading (task, dataset, examples, model, memory, wall time), the exact command that reproduces it
(rebuilt from the recorded configuration) and its table. `--merge` first joins the results of all shards of one
run (`--shard i/n`) into OUT.json (records in example order, metrics recomputed, PNG beside it) and reports that.
`--recompute` rewrites each file's metrics from its records (e.g. to add the 95% intervals to an older file).
A results file of several read modes (`--read-modes`) gets one table per read mode, under one heading and command.
`--readme FILE` regenerates every block of FILE between `<!-- report: PATH ... -->` and `<!-- /report -->` from the
result files it names (paths relative to FILE's folder); `--check` only says whether the blocks are up to date
(exit 1 if not), which the tests run on the repository's README.
"""

import argparse
import json
import re
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
        elif key == "read_modes":
            parts.append(f"{flag} {' '.join(value)}")
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    if output or config.get("output"):
        parts.append(f"--output {output or config['output']}")
    return " ".join(parts)


def _ci(value, interval) -> str:
    """`value [low, high]` (the 95% interval), or the value alone where the file has no interval."""
    if value is None:
        return "-"
    return f"{_number(value)} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else _number(value)


def _cell(cells: dict, name: str) -> str:
    return _ci(cells.get(name), cells.get(f"{name}_ci"))


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
            rows.append([style, condition.replace("_", " "), metrics["n"], *(_cell(metrics, s) for s in scores)])
        sequential = result.get("sequential", {}).get("metrics", {}).get(style)
        if sequential:
            row = [style, "memory, sequential", sequential["n"], *(_cell(sequential, s) for s in scores)]
            rows.append(row)
    header = [
        "prompt",
        "condition",
        "n",
        *(f"{name} [95%]" for name in ("efficacy", "generalization", "specificity")),
        "Score [95%]",
        "exact Score [95%]",
    ]
    return _table(header, rows)


def retention_table(result: dict) -> str:
    if result["protocol"].get("name") == "stream":
        return stream_table(result)
    grid = result["protocol"]["grid"]
    rows = []
    for style in _styles(result):
        conditions = ("no_memory", "passage_only", "memory", "same_text")
        for condition in [c for c in conditions if c in result["metrics"][style]]:
            cells = result["metrics"][style][condition]
            counts = {cells[str(k)]["n"] for k in grid}
            n = counts.pop() if len(counts) == 1 else "/".join(str(cells[str(k)]["n"]) for k in grid)
            rows.append([style, condition.replace("_", " "), n, *(_cell(cells[str(k)], "exact_hit") for k in grid)])
    rows.append(["", "bound (1-K/N)^u", "", *(result["metrics"]["retention_bound"][str(k)] for k in grid)])
    updates = result["metrics"]["updates_after_related"]
    rows.append(["", "updates after the passage", "", *(updates[str(k)] for k in grid)])
    return _table(["prompt", "exact hit [95%] of", "n", *(f"k={k}" for k in grid)], rows)


def stream_table(result: dict) -> str:
    """One row per prompt style, condition and bin of updates since the passage (or of tokens stored); the
    once-per-question baselines once."""

    def row(style: str, condition: str, label: str, cells: dict) -> list:
        read = _cell(cells, "passage_read") if "passage_read" in cells else ""
        questions = cells.get("questions", cells["n"])
        return [style, condition, label, cells["n"], questions, _cell(cells, "exact_hit"), _cell(cells, "f1"), read]

    rows = []
    for style in _styles(result):
        found = result["metrics"][style]
        rows += [row(style, condition.replace("_", " "), "", found[condition]) for condition in ONCE_CONDITIONS]
        for name, condition in STREAM_CURVES:
            rows += [row(style, condition, label, cells) for label, cells in found[name].items()]
    header = ["prompt", "condition", "updates since passage", "n", "questions", "exact hit [95%]", "F1 [95%]"]
    return _table([*header, "passage read [95%]"], rows)


ONCE_CONDITIONS = ("no_memory", "passage_only")
STREAM_CURVES = (
    ("memory_by_updates", "memory"),
    ("same_text_by_updates", "same text"),
    ("memory_by_stored_tokens", "memory, by tokens stored (bin of tokens)"),
)


def longcontext_table(result: dict) -> str:
    rows = [
        [
            style,
            condition.replace("_", " "),
            cells["n"],
            _cell(cells, "f1"),
            _cell(cells, "exact_match"),
            _cell(cells, "exact_hit"),
        ]
        for style in _styles(result)
        for condition, cells in result["metrics"][style].items()
    ]
    return _table(["prompt", "condition", "n", "F1 [95%]", "EM [95%]", "exact hit [95%]"], rows)


def integrity_table(result: dict) -> str:
    m = result["metrics"]
    row = [
        m["injections"],
        m["updates"],
        m["probes"],
        _ci(m["final_accuracy"], m.get("final_accuracy_ci")) if m["probes"] else None,
        m["max_nonfinite"],
        m["norm_max"],
        1e3 * m["seconds_per_update"],
    ]
    header = [
        "injections",
        "updates",
        "probes (n)",
        "running accuracy [95%]",
        "max non-finite",
        "max slot norm",
        "ms/update",
    ]
    return _table(header, [row])


TABLES: dict[str, Callable[[dict], str]] = {
    "editing": editing_table,
    "retention": retention_table,
    "longcontext": longcontext_table,
    "integrity": integrity_table,
}


def report(path: str | Path, root: str | Path | None = None) -> str:
    """Heading, command and table of one results file (`path` relative to `root`, if given, and named so)."""
    from .modes import sub_documents

    result = json.loads((Path(root) / path if root is not None else Path(path)).read_text())
    model, data = result["model"], result["data"]
    memory = model["memory"]
    read = model.get("read", {}).get("read_mode")
    if result.get("read_modes"):
        read = " / ".join(result["read_modes"])
    examples = data.get("num_examples", sum(part["num_examples"] for part in data.get("parts", [])))
    cost = ""
    if result.get("cpu_time_s") is not None:  # (runs timed over all their sittings)
        sittings = result.get("sittings", 1)
        cost = f" ({result['cpu_time_s'] / 3600:.2f} CPU h{f', {sittings} sittings' if sittings > 1 else ''})"
    heading = (
        f"**{result['task']}** · {data['dataset'] or 'random tokens'} · {examples} examples · model `{model['spec']}` "
        f"({model['dtype']}, N = {memory['num_memory_tokens']}, K = {memory['num_update_tokens']}, "
        f"{memory['memory_update']} rule{f', {read} read' if read else ''}) · {_duration(result['wall_time_s'])}{cost} · "
        f"`{Path(path).name}`"
    )
    tables = [
        TABLES[result["task"]](sub) if mode is None else f"*{mode} read*\n\n{TABLES[result['task']](sub)}"
        for mode, sub in sub_documents(result)
    ]
    body = "\n\n".join(tables)
    return f"{heading}\n\n```\n{command(result['config'], str(path))}\n```\n\n{body}\n"


def agreement(stream: dict, per_question: dict, style: str = "chat") -> dict:
    """The two retention protocols side by side on the questions both answered: exact hit of the memory at each
    distance k (contexts since the passage) that both have, with n and Wilson intervals, and how often the two gave the
    same answer to the same question at the same k. Records may come from results files or from logs in progress."""
    from .metrics import wilson_interval

    asks = {(r["id"], r["contexts_since_passage"]): r for r in stream["records"] if r.get("kind") == "ask"}
    rows = {}
    for record in per_question["records"]:
        for k, answers in record["memory"].items():
            found = asks.get((record["id"], int(k)))
            if found is not None and style in answers and style in found["memory"]:
                rows.setdefault(int(k), []).append((answers[style], found["memory"][style], found))
    table = {}
    for k, pairs in sorted(rows.items()):
        n = len(pairs)
        paper, mine = sum(a["exact_hit"] for a, _, _ in pairs), sum(b["exact_hit"] for _, b, _ in pairs)
        table[str(k)] = {
            "n": n,
            "per_question": paper / n,
            "per_question_ci": [round(v, 4) for v in wilson_interval(paper, n)],
            "stream": mine / n,
            "stream_ci": [round(v, 4) for v in wilson_interval(mine, n)],
            "same_answer": sum(a["answer"] == b["answer"] for a, b, _ in pairs) / n,
            "stream_updates_since_passage_mean": sum(r["updates_since_passage"] for _, _, r in pairs) / n,
        }
    return table


def agreement_table(table: dict) -> str:
    rows = [
        [
            k,
            cells["n"],
            cells["stream_updates_since_passage_mean"],
            _ci(cells["per_question"], cells["per_question_ci"]),
            _ci(cells["stream"], cells["stream_ci"]),
            cells["same_answer"],
        ]
        for k, cells in table.items()
    ]
    header = [
        "k (contexts since passage)",
        "n",
        "stream: updates since passage",
        "per-question exact hit [95%]",
        "stream exact hit [95%]",
        "same answer",
    ]
    return _table(header, rows)


def _task_module(task: str, document: dict | None = None):
    """The module whose `metrics_of` recomputes a `task` document (a retention run of the stream protocol: `stream`)."""
    from . import editing, longcontext, retention, stream

    if task == "retention" and document is not None and document.get("protocol", {}).get("name") == "stream":
        return stream
    modules = {"editing": editing, "retention": retention, "longcontext": longcontext}
    if task not in modules:
        raise ValueError(f"{task} runs are one chain and are not split into shards: there is nothing to merge")
    return modules[task]


def recompute(path: str | Path) -> Path:
    """Rewrite a results file's metrics from its records (and redraw its PNG if it has one)."""
    from . import integrity
    from .modes import recompute_modes, sub_documents
    from .plots import PLOTS
    from .runner import write_json

    document = json.loads(Path(path).read_text())
    task = document["task"]
    module = integrity if task == "integrity" else _task_module(task, document)
    document.update(recompute_modes(document, module.metrics_of))
    write_json(path, document)
    for mode, sub in sub_documents(document):
        picture = _picture(path, mode)
        if picture.exists() and task in PLOTS:
            PLOTS[task](sub, picture)
    return Path(path)


def _picture(path: str | Path, mode: str | None) -> Path:
    """The PNG beside a results file (one per read mode in a file of several)."""
    path = Path(path)
    return path.with_suffix(".png") if mode is None else path.with_name(f"{path.stem}-{mode}.png")


BLOCK = re.compile(r"(<!-- report: (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- /report -->)", re.DOTALL)


def readme(path: str | Path, check: bool = False) -> bool:
    """Regenerate the report blocks of a Markdown file (see the module docstring); True when they were up to date.
    With `check`, nothing is written."""
    path = Path(path)
    text = path.read_text()
    root = path.parent

    def render(match: re.Match) -> str:
        body = "\n".join(report(name, root) for name in match["files"].split())
        return f"{match[1]}{body}{match[4]}"

    updated = BLOCK.sub(render, text)
    if not check and updated != text:
        path.write_text(updated)
    return updated == text


def merge(output: str | Path, shards: list[str | Path]) -> Path:
    """Join the results files of all shards of one run into `output` (and its PNG)."""
    from .modes import MODE_FIELDS, is_multi, sub_documents
    from .plots import PLOTS
    from .records import merge_shards
    from .runner import write_json

    documents = [json.loads(Path(path).read_text()) for path in shards]
    task = documents[0]["task"] if documents else None
    metrics_of = _task_module(task, documents[0] if documents else None).metrics_of
    if documents and is_multi(documents[0]):  # each read mode's records merged on their own
        modes = documents[0]["read_modes"]
        if any(doc.get("read_modes") != modes for doc in documents):
            raise ValueError("the shards come from different runs: their read modes differ")
        views = [dict(sub_documents(doc)) for doc in documents]
        parts = {mode: merge_shards([view[mode] for view in views], metrics_of) for mode in modes}
        merged = {key: value for key, value in parts[modes[0]].items() if key not in (*MODE_FIELDS, "read_mode")}
        merged["by_read_mode"] = {
            mode: {key: value for key, value in part.items() if key in MODE_FIELDS} for mode, part in parts.items()
        }
    else:
        merged = merge_shards(documents, metrics_of)
    merged["config"]["output"] = str(output)
    write_json(output, merged)
    plot = PLOTS.get(task)
    for mode, sub in sub_documents(merged):
        if plot is not None and (task != "editing" or sub.get("sequential")):
            plot(sub, _picture(output, mode))
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="results JSON files written by `memoryllm-hf eval`")
    parser.add_argument("--merge", metavar="OUT", help="merge the given shard results into OUT, then report it")
    parser.add_argument("--recompute", action="store_true", help="rewrite the files' metrics from their records")
    parser.add_argument("--readme", metavar="FILE", help="regenerate the report blocks of a Markdown file")
    parser.add_argument("--check", action="store_true", help="with --readme: only check that the blocks are current")
    args = parser.parse_args(argv)
    if args.readme:
        current = readme(args.readme, check=args.check)
        print(f"{args.readme}: {'up to date' if current else 'out of date' if args.check else 'regenerated'}")
        return 0 if current or not args.check else 1
    if not args.results:
        parser.error("give results files (or --readme FILE)")
    if args.recompute:
        for path in args.results:
            recompute(path)
    paths = [merge(args.merge, args.results)] if args.merge else args.results
    print("\n".join(report(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
