"""PNG plots where a curve says more than a table: retention, sequential editing, integrity."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONDITION_STYLE = {
    "memory": {"color": "tab:blue", "marker": "o", "label": "memory"},
    "same_text": {"color": "tab:green", "marker": "s", "label": "same text in context (window-cut)"},
    "passage_only": {"color": "tab:green", "marker": None, "label": "passage only in context", "linestyle": "--"},
    "no_memory": {"color": "tab:red", "marker": None, "label": "no memory", "linestyle": ":"},
}


def _label_axis(axis, xlabel: str, ylabel: str, title: str, rate: bool = False) -> None:
    """Labels, title, grid and legend of one panel (`rate`: a 0-1 y axis)."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if rate:
        axis.set_ylim(0, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_stream(result: dict, path: str | Path) -> Path:
    """Stream protocol: exact-hit accuracy (95% intervals as bars) against the updates since the passage (bins), for
    memory and same text, with the once-per-question baselines as bands, per prompt style."""
    metrics = result["metrics"]
    styles = result["prompt_styles"]
    figure, axes = plt.subplots(1, len(styles), figsize=(6.5 * len(styles), 4.4), squeeze=False)
    for axis, style in zip(axes[0], styles, strict=True):
        found = metrics[style]
        labels = list(found["memory_by_updates"])
        for name, condition in (("memory_by_updates", "memory"), ("same_text_by_updates", "same_text")):
            cells = [(i, found[name][label]) for i, label in enumerate(labels) if label in found[name]]
            if not cells:
                continue
            x = [i for i, _ in cells]
            y = [cell["exact_hit"] for _, cell in cells]
            errors = [
                [cell["exact_hit"] - cell["exact_hit_ci"][0] for _, cell in cells],
                [cell["exact_hit_ci"][1] - cell["exact_hit"] for _, cell in cells],
            ]
            look = {k: v for k, v in CONDITION_STYLE[condition].items() if k != "linestyle"}
            axis.errorbar(x, y, yerr=errors, capsize=3, **look)
        for condition in ("passage_only", "no_memory"):
            cell, look = found[condition], CONDITION_STYLE[condition]
            if cell["n"]:
                axis.axhline(cell["exact_hit"], color=look["color"], linestyle=look["linestyle"], label=look["label"])
                axis.axhspan(*cell["exact_hit_ci"], color=look["color"], alpha=0.08)
        counts = [found["memory_by_updates"][label]["n"] for label in labels]
        axis.set_xticks(
            range(len(labels)), [f"{label}\nn={n}" for label, n in zip(labels, counts, strict=True)], fontsize=7
        )
        _label_axis(
            axis,
            "memory updates since the passage (asks per bin)",
            "exact-hit accuracy (95% interval)",
            f"{result['data']['dataset']} stream, {style} prompts ({metrics['questions']} questions)",
            rate=True,
        )
    return _save(figure, path)


def plot_retention(result: dict, path: str | Path) -> Path:
    """Exact-hit accuracy against the number of unrelated contexts k (and the memory updates made after the
    passage, under each k), per prompt style, with both in-context baselines and the (1-K/N)^u bound."""
    if result["protocol"].get("name") == "stream":
        return plot_stream(result, path)
    metrics, grid = result["metrics"], result["protocol"]["grid"]
    styles = [s for s in metrics if s not in ("retention_bound", "updates_after_related")]
    figure, axes = plt.subplots(1, len(styles), figsize=(6 * len(styles), 4.2), squeeze=False)
    positions = range(len(grid))
    memory = result["model"]["memory"]
    for axis, style in zip(axes[0], styles, strict=True):
        for condition, look in CONDITION_STYLE.items():
            points = [(x, metrics[style][condition][str(k)]["exact_hit"]) for x, k in zip(positions, grid, strict=True)]
            points = [(x, y) for x, y in points if y is not None and metrics[style][condition][str(grid[x])]["n"]]
            if points:
                axis.plot(*zip(*points, strict=True), **look)
        bound = [metrics["retention_bound"][str(k)] for k in grid]
        axis.plot(
            positions,
            bound,
            color="gray",
            linestyle="--",
            label=f"(1-K/N)^u, K={memory['num_update_tokens']}, N={memory['num_memory_tokens']}",
        )
        updates = metrics["updates_after_related"]
        axis.set_xticks(list(positions), [f"{k}\n{updates[str(k)]:g}" for k in grid])
        _label_axis(
            axis,
            "k unrelated contexts after the passage\n(memory updates after the passage)",
            "exact-hit accuracy / fraction of slots kept",
            f"{result['data']['dataset']} retention, {style} prompts (n={result['data']['num_examples']})",
            rate=True,
        )
    return _save(figure, path)


def plot_sequential_editing(result: dict, path: str | Path) -> Path:
    """Per-probe success rate of sequentially injected edits against their age (edits injected after them)."""
    by_age = result["sequential"]["by_age"]
    figure, axes = plt.subplots(1, len(by_age), figsize=(6 * len(by_age), 4), squeeze=False)
    for axis, (style, buckets) in zip(axes[0], by_age.items(), strict=True):
        ages = [(b["age_min"] + b["age_max"]) / 2 for b in buckets]
        for probe in ("efficacy", "generalization", "specificity"):
            axis.plot(ages, [b[probe] for b in buckets], marker="o", label=probe)
        _label_axis(
            axis,
            "edits injected after the probed one",
            "P(wanted) > P(rival) rate",
            f"{result['data']['dataset']} sequential edits, {style} prompts",
            rate=True,
        )
    return _save(figure, path)


def plot_integrity(result: dict, path: str | Path) -> Path:
    """Running accuracy (QA mode) and slot norms against injections."""
    rows = result["rows"]
    steps = [row["injections"] for row in rows]
    has_accuracy = "running_accuracy" in rows[0]
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(12 if has_accuracy else 6, 4), squeeze=False)
    norms = axes[0][-1]
    norms.plot(steps, [row["norm_mean"] for row in rows], label="mean slot norm")
    norms.plot(steps, [row["norm_max"] for row in rows], label="max slot norm")
    nonfinite = result["metrics"]["max_nonfinite"]
    _label_axis(norms, "injections", "L2 norm of memory slots", f"memory norms (non-finite values: max {nonfinite})")
    if has_accuracy:
        accuracy = axes[0][0]
        accuracy.plot(steps, [row["running_accuracy"] for row in rows], label="running")
        accuracy.plot(steps, [row["window_accuracy"] for row in rows], label="last window", alpha=0.6)
        ylabel = f"probe accuracy ({result['probe']['mode']})"
        _label_axis(accuracy, "injections", ylabel, "question about the latest injected context", rate=True)
    return _save(figure, path)


# Each task's plot (what `report --merge` redraws for a merged run).
PLOTS = {"retention": plot_retention, "editing": plot_sequential_editing, "integrity": plot_integrity}
