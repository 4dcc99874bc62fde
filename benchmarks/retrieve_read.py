"""Retrieval-read benchmark: what a question costs with `read_mode="retrieve"` against the official pool read, and
how the retrieval read grows with the number of stored injections.

Side by side in one run, on one model with a full pool of N slots per layer and a long-term store of S injections of
K slots (random hidden-state-like slots, stored in bfloat16 like `from_base` models):
* pool: every layer attends to `[bos; pool]` (keys/values cached per memory state);
* retrieve: score every stored injection against the prompt (a memory-less forward for the prompt's states, block
  features cached per block), read the best ones' slots (`read_tokens`), keys/values from the per-block cache.
A question is a chat-length prompt plus `--new-tokens` greedy tokens.

Run: python -m benchmarks.retrieve_read --model smollm2 --threads 1 --clock cpu --stored 10 100 400 --repeats 4
"""

import sys

import torch

from memoryllm_hf.modeling.memory_store import MemoryBlock

from .common import Case, Run, common_parser, fill_pool, interleaved_medians, load_model, paired_ratio

COLUMNS = ("N", "stored_injections", "stored_tokens", "pool_ms", "retrieve_ms", "retrieve_vs_pool", "read_tokens")


@torch.no_grad()
def fill_store(model, count: int, seed: int = 2) -> None:
    """Give the model a long-term store of `count` injections of K random slots each (bfloat16)."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    L, K, d = cfg.num_hidden_layers, cfg.num_update_tokens, cfg.hidden_size
    scale = model.memory[:, -1].float().std().item() or 1.0
    blocks = [
        MemoryBlock(i + 1, i + 1, (scale * torch.randn(L, K, d, generator=generator)).to(torch.bfloat16))
        for i in range(count)
    ]
    cfg.long_term_memory_tokens = max(cfg.long_term_memory_tokens, count * K)
    cfg.long_term_memory_dtype = "bfloat16"
    state = model.memory_state()
    state.long_term = tuple(blocks)
    state.injections.fill_(max(int(state.injections), count))
    model.load_memory_state(state)


def main(argv: list[str] | None = None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--memory-tokens", type=int, default=4096, help="N slots per layer (full pool)")
    parser.add_argument("--update-tokens", type=int, default=256, help="K slots per stored injection")
    parser.add_argument("--stored", type=int, nargs="+", default=[10, 100, 400], help="stored injections")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="prompt length (a chat question)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per question")
    parser.add_argument("--plot", help="PNG of the read time against the number of stored injections")
    args = parser.parse_args(argv)
    run = Run("retrieve_read", args)
    model = load_model(run, args.memory_tokens, args.update_tokens, "input")
    model.config.long_term_memory_tokens = args.update_tokens
    fill_pool(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), device=run.device)

    def ask(mode: str):
        model.config.read_mode = mode
        return model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    for count in sorted(args.stored):
        fill_store(model, count)
        samples: dict = {}
        cases = {"pool": Case(lambda: ask("pool")), "retrieve": Case(lambda: ask("retrieve"))}
        times = interleaved_medians(run, cases, samples)
        row = {
            "N": args.memory_tokens,
            "stored_injections": count,
            "stored_tokens": count * args.update_tokens,
            "pool_ms": 1e3 * times["pool"],
            "retrieve_ms": 1e3 * times["retrieve"],
            "retrieve_vs_pool": paired_ratio(samples, "retrieve", "pool"),
            "read_tokens": model.config.read_tokens,
        }
        run.rows.append(row)
        run.progress(row, COLUMNS)
    notes = [
        f"a question: {args.prompt_tokens} prompt tokens + {args.new_tokens} greedy tokens; retrieve reads at most "
        f"read_tokens={model.config.read_tokens} slots (whole injections, best first)",
    ]
    run.finish(COLUMNS, notes)
    if args.plot:
        plot(run.rows, args.plot)
    return 0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [row["stored_tokens"] for row in rows]
    ax.plot(tokens, [row["retrieve_ms"] for row in rows], "o-", label="retrieve (store + scoring)")
    ax.plot(tokens, [row["pool_ms"] for row in rows], "s--", label=f"pool (N = {rows[0]['N']})")
    ax.set_xlabel("stored tokens (long-term store)")
    ax.set_ylabel("one question (ms)")
    ax.set_title("Read cost against the size of the long-term store")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
