"""Markdown tables of benchmark JSON results (for benchmarks/README.md).

Run: python -m benchmarks.markdown RESULTS.json [...]
"""

import argparse
import importlib
import json
from pathlib import Path

from .common import cell


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def render(path: Path) -> str:
    """The run's description line, its table and (footprint) the pool-precision table."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    module = importlib.import_module(f"benchmarks.{meta['benchmark']}")
    parts = [
        f"`{path.name}`: {meta['model']}, {meta['machine']}, {meta['dtype']}, {meta['attn']}, "
        f"{meta['clock']} clock, median of {meta['repeats']}",
        "",
        markdown_table(data["rows"], module.COLUMNS),
    ]
    if "pool_precision" in data:
        parts += ["", markdown_table(data["pool_precision"], module.ACCURACY_COLUMNS)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written with --json")
    for path in parser.parse_args(argv).results:
        print(render(path) + "\n")


if __name__ == "__main__":
    main()
