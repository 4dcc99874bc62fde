"""Inject benchmark: time of one memory update (`inject` of n tokens into a full pool of N slots per layer).

Compared side by side with
* limit: a stock `LlamaModel` forward over the positions whose outputs become memory (the last max(n, K) of the
  write window for the "output" rule; the n context tokens through the first L-1 layers for the "input" rule),
  attending to a cached prefix holding the rest of the window; no lm_head, no pool update;
* official: what the official update does: the concatenation path (`memoryllm_hf.reference.
  reference_new_memory_slots`), final norm + lm_head over the n context positions (logits computed and discarded)
  and its in-place drop (per layer: gather the survivors, concatenate the new slots, write back);
* drop: our pool update alone (`_state_after`: random drop + append, one pass over the pool, into a reused buffer
  like the recycled pool `inject` writes into on the CPU).

Run: python -m benchmarks.inject --model smollm2 --memory-tokens 4096 --context-tokens 16 256 512 2048
"""

import gc

import torch

from memoryllm_hf.modeling.memory_transition import next_state
from memoryllm_hf.reference import reference_new_memory_slots

from .common import (
    Case,
    Run,
    cache_from,
    common_parser,
    fill_pool,
    interleaved_medians,
    load_model,
    paired_ratio,
    plain_decoder,
    prefix_kv,
)

COLUMNS = (
    "rule",
    "N",
    "n",
    "inject_ms",
    "limit_ms",
    "official_ms",
    "drop_ms",
    "vs_limit",
    "speedup_vs_official",
    "drop_share",
)


def official_drop(pool: torch.Tensor, new: torch.Tensor, generator: torch.Generator) -> None:
    """The official per-layer update: keep N-k random slots in order, append the k new ones, write back."""
    num_slots, k = pool.shape[1], new.shape[1]
    for layer in range(pool.shape[0]):
        keep = torch.randperm(num_slots, generator=generator)[: num_slots - k].sort().values.to(pool.device)
        pool[layer] = torch.cat([pool[layer][keep], new[layer].to(pool.dtype)])


class InjectCell:
    """One (rule, pool, context length) cell: the model with a full pool, its write window and the limit decoder."""

    def __init__(self, run: Run, model, full_pool, scratch_pool: torch.Tensor, length: int):
        self.run, self.model, self.full_pool, self.scratch_pool = run, model, full_pool, scratch_pool
        config, device, dtype = model.config, run.device, run.dtype
        self.ids = torch.randint(3, config.vocab_size, (1, length), device=device)
        use_bos, prefix_slots, requeried, _, _ = model.write_layout(length)
        prefix, queries = int(use_bos) + prefix_slots, requeried + length
        layers = config.num_hidden_layers if config.memory_update == "output" else config.num_hidden_layers - 1
        self.decoder = plain_decoder(model, layers)
        self.window_kv = prefix_kv(model, prefix)[:layers]
        self.query_embeds = torch.randn(1, queries, config.hidden_size, device=device, dtype=dtype)
        self.context_hidden = torch.randn(1, length, config.hidden_size, device=device, dtype=dtype)
        self.mask = torch.ones(1, prefix + queries, dtype=torch.long, device=device)
        self.new_slots = model.new_memory_slots(self.ids)
        self.generator = torch.Generator().manual_seed(0)
        self.drop_out = torch.empty_like(model.memory)
        self.state = model.memory_state()  # the pool the drop case updates (taken once, outside the timing)
        self.limit_cache = None

    def restore_pool(self) -> None:
        self.model.load_memory_state(self.full_pool)

    def seed_limit_cache(self) -> None:
        self.limit_cache = cache_from(self.decoder.config, self.window_kv)

    def inject(self):
        return self.model.inject(self.ids, chunk_size=self.ids.shape[1])

    def limit(self):
        return self.decoder(inputs_embeds=self.query_embeds, attention_mask=self.mask, cache=self.limit_cache)

    def official(self) -> None:
        official_drop(self.scratch_pool, reference_new_memory_slots(self.model, self.ids), self.generator)
        self.model.lm_head(self.model.model.norm(self.context_hidden))

    def drop(self):
        return next_state(self.state, self.new_slots, self.model.config, self.generator, self.drop_out)

    def row(self) -> dict:
        samples = {}
        times = interleaved_medians(
            self.run,
            {
                "inject": Case(self.inject, prepare=self.restore_pool),
                "limit": Case(self.limit, prepare=self.seed_limit_cache),
                "official": Case(self.official),
                "drop": Case(self.drop),
            },
            samples,
        )
        return {
            "rule": self.model.config.memory_update,
            "N": self.model.config.num_memory_tokens,
            "n": self.ids.shape[1],
            **{f"{name}_ms": 1e3 * seconds for name, seconds in times.items()},
            "vs_limit": paired_ratio(samples, "inject", "limit"),
            "speedup_vs_official": paired_ratio(samples, "official", "inject"),
            "drop_share": paired_ratio(samples, "drop", "inject"),
            "samples_s": samples,
        }


@torch.no_grad()
def measure(run: Run, rule: str, num_memory_tokens: int) -> list[dict]:
    model = load_model(run, num_memory_tokens, run.args.update_tokens, rule)
    fill_pool(model)
    full_pool = model.memory_state()
    scratch_pool = full_pool.memory.clone()
    rows = []
    for length in run.args.context_tokens:
        rows.append(InjectCell(run, model, full_pool, scratch_pool, length).row())
        run.progress(rows[-1], COLUMNS)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", choices=("output", "input"), default=["output", "input"])
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[4096], help="N values")
    parser.add_argument("--context-tokens", type=int, nargs="+", default=[16, 256, 512, 2048], help="n values")
    parser.add_argument("--update-tokens", type=int, default=256, help="K")
    run = Run("inject", parser.parse_args(argv))
    for rule in run.args.rules:
        for num_memory_tokens in run.args.memory_tokens:
            run.rows += measure(run, rule, num_memory_tokens)
            gc.collect()
    notes = [
        "inject_ms: model.inject(n tokens) as one update into a full pool; vs_limit = inject / limit (goal <= 1.1); "
        "speedup_vs_official = official / inject; drop_share = drop / inject (ratios: medians of same-repeat ratios)",
    ]
    run.finish(COLUMNS, notes)


if __name__ == "__main__":
    main()
