"""Loss curves of a training run as a PNG: one smoothed curve per process."""

from pathlib import Path

from .objective import PROCESSES


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(history: list[dict], path: Path, title: str = "training loss", window: int = 50) -> None:
    """`history` rows are {"step", "process", "loss"} (one per rank and micro-step); raw points are drawn faintly."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for process in PROCESSES:
        rows = [row for row in history if row["process"] == process]
        if not rows:
            continue
        steps, losses = [row["step"] for row in rows], [row["loss"] for row in rows]
        line = axes.plot(steps, moving_average(losses, window), label=f"{process} ({len(rows)})")[0]
        axes.scatter(steps, losses, s=2, alpha=0.15, color=line.get_color())
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(f"cross-entropy (moving average of {window})")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
