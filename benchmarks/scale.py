"""Scale benchmark: time per memory update and per question as the pool grows (N = 1k -> 12.8k slots per layer).

Per N, measured side by side: one update (`inject` of K tokens into a full pool), our pool update alone (the drop:
one pass over the pool), a question against an unchanged memory (cached memory keys/values: attention is the only
part that grows with N), and the first question after an update (the memory keys/values are recomputed once).
The official claim (spec section 2) is that an update does not grow with N; the drop is the part that does.

Run: python -m benchmarks.scale --model smollm2 --plot docs/benchmarks/scale_smollm2_cpu.png
(`--replot RESULTS.json --plot FILE.png` redraws a plot from an earlier run, e.g. one made where matplotlib is missing)
"""

import gc
import json
from pathlib import Path

import torch

from memoryllm_hf.modeling.memory_transition import next_state

from .common import Case, Run, common_parser, fill_pool, interleaved_medians, load_model, paired_ratio

COLUMNS = (
    "N",
    "update_ms",
    "drop_ms",
    "question_ms",
    "first_question_ms",
    "drop_share",
    "pool_MB",
    "drop_GB_s",
)


@torch.no_grad()
def measure(run: Run, num_memory_tokens: int) -> dict:
    model = load_model(run, num_memory_tokens, run.args.update_tokens, run.args.rule)
    fill_pool(model)
    full_pool = model.memory_state()
    vocab = model.config.vocab_size
    context = torch.randint(3, vocab, (1, run.args.update_tokens), device=run.device)
    question = torch.randint(3, vocab, (1, run.args.question_tokens), device=run.device)
    new_slots = model.new_memory_slots(context)
    generator = torch.Generator().manual_seed(0)
    drop_out = torch.empty_like(model.memory)  # a reused buffer, like the recycled pool inject writes into

    def forget_memory_kv():
        model.clear_memory_key_values()

    samples = {}
    times = interleaved_medians(
        run,
        {
            "update": Case(
                lambda: model.inject(context, chunk_size=context.shape[1]),
                prepare=lambda: model.load_memory_state(full_pool),
            ),
            "drop": Case(lambda: next_state(full_pool, new_slots, model.config, generator, drop_out)),
            "question": Case(lambda: model(question, logits_to_keep=1)),
            "first_question": Case(lambda: model(question, logits_to_keep=1), prepare=forget_memory_kv),
        },
        samples,
    )
    pool_bytes = model.memory.numel() * model.memory.element_size()
    return {
        "N": num_memory_tokens,
        **{f"{name}_ms": 1e3 * seconds for name, seconds in times.items()},
        "drop_share": paired_ratio(samples, "drop", "update"),
        "pool_MB": pool_bytes / 2**20,
        # the drop reads the kept slots and writes the whole new pool: about two pool sizes of memory traffic
        "drop_GB_s": 2 * pool_bytes / times["drop"] / 1e9,
        "samples_s": samples,
    }


def plot(results: dict, path: Path) -> None:
    """Two panels against N from a results dict (as written to JSON): time per update (and its drop part), time
    per question (cached / after an update)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows, meta = results["rows"], results["meta"]
    sizes = [row["N"] for row in rows]
    figure, (updates, questions) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, series, title in (
        (updates, ("update_ms", "drop_ms"), f"memory update (inject {meta['update_tokens']} tokens)"),
        (questions, ("question_ms", "first_question_ms"), f"question ({meta['question_tokens']} tokens, prefill)"),
    ):
        for key in series:
            axis.plot(sizes, [row[key] for row in rows], marker="o", label=key.removesuffix("_ms"))
        axis.set(title=title, xlabel="N (memory slots per layer)", ylabel="ms", ylim=(0, None))
        axis.legend()
    description = f"{meta['model']}, {meta['machine']}, {meta['dtype']}, {meta['attn']}, {meta['clock']} clock"
    figure.suptitle(f"{description}, median of {meta['repeats']}", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 12800])
    parser.add_argument("--update-tokens", type=int, default=256, help="K = tokens per update")
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--rule", choices=("output", "input"), default="input")
    parser.add_argument("--plot", type=Path, help="write the two curves to this PNG")
    parser.add_argument("--replot", type=Path, help="measure nothing: draw --plot from this earlier --json file")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    run = Run("scale", args)
    for num_memory_tokens in run.args.memory_tokens:
        run.rows.append(measure(run, num_memory_tokens))
        run.progress(run.rows[-1], COLUMNS)
        gc.collect()
    notes = [
        f"update: inject of K={run.args.update_tokens} tokens ({run.args.rule} rule) into a full pool; drop: the pool "
        "update alone; question: prefill with the memory keys/values cached; first_question: right after an update "
        "(keys/values recomputed); drop_GB_s: two pool sizes / drop time",
    ]
    run.finish(COLUMNS, notes)
    if run.args.plot:
        plot(run.results(), run.args.plot)
        print(f"plot: {run.args.plot}")


if __name__ == "__main__":
    main()
