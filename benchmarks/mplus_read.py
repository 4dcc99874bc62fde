"""M+ read benchmark: prefill latency of an M+-shaped read against its limit, side by side in one run.

Random M+ models (read_mode="mplus"): `--model tiny` (2 layers, d 64) or `--model smollm2` (SmolLM2-135M's shape:
30 layers, d 576, 9/3 heads; random weights, nothing downloaded), a full pool of N slots per layer, k retrieved slots
per layer, and a long-term memory of S slots per layer (half merged, half pending is not modelled: all merged).

* mplus: `model(prompt, logits_to_keep=1)`: the retrieval pass (layers 0..L-2 on the prompt, each layer scoring its
  S candidates and reading its k best) then the stock forward against the seeded cache `[bos; k; N]`;
* limit: a stock `LlamaForCausalLM` with the same weights reading a cache that already holds a (1 + k + N)-position
  prefix, plus the retrieval scoring alone as matrix products (per layer: sigmoid(q K^T) averaged over the prompt,
  top-k over S candidates): the least work any M+ read can do;
* parts of mplus: `retrieval` (the retrieval pass alone) and `scoring` (the scoring alone, as in the limit).

Run: python -m benchmarks.mplus_read --model tiny --threads 1 --ltm-slots 150000 --prompt-tokens 16 64
"""

import gc

import torch

from memoryllm_hf.modeling import MemoryLlamaConfig, MemoryLlamaForCausalLM
from memoryllm_hf.modeling.mplus_memory import MPlusMemory, retrieval_scores, top_candidates

from .common import Case, Run, cache_from, common_parser, interleaved_medians, paired_ratio, plain_llama

COLUMNS = ("L", "d", "N", "k", "S", "n", "mplus_ms", "limit_ms", "retrieval_ms", "scoring_ms", "vs_limit")
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, num_update_tokens=16, num_memory_tokens=256, read_tokens=64,
                 retriever_size=16),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, num_update_tokens=64, num_memory_tokens=1024,
                    read_tokens=256, retriever_size=64),
}


@torch.no_grad()
def mplus_model(run: Run, ltm_slots: int) -> MemoryLlamaForCausalLM:
    """A random M+ model with a full pool and a long-term memory of `ltm_slots` slots per layer."""
    shape = SHAPES[run.args.model]
    config = MemoryLlamaConfig(
        **shape, read_mode="mplus", retriever_depth=2, rope_theta=500000.0, max_position_embeddings=8192,
        add_decoder_lora=False, min_inject_tokens=1,
    )
    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(config).eval().to(device=run.device, dtype=run.dtype)
    model.set_attn_implementation(run.args.attn)
    L, N, d, s = config.num_hidden_layers, config.num_memory_tokens, config.hidden_size, config.retriever_size
    generator = torch.Generator().manual_seed(1)
    state = model.memory_state()
    state.memory = torch.randn(L, N, d, generator=generator).to(run.device, run.dtype)
    state.filled.fill_(N)
    state.long_term = MPlusMemory(
        slots=tuple(torch.randn(ltm_slots, d, generator=generator).to(run.dtype) for _ in range(L)),
        keys=tuple(0.5 * torch.randn(ltm_slots, s, generator=generator).to(run.dtype) for _ in range(L)),
        ages=tuple(torch.randperm(ltm_slots, generator=generator) for _ in range(L)),
        recall=tuple(torch.full((ltm_slots,), 5.0, dtype=torch.float64) for _ in range(L)),
        pending_slots=torch.zeros(L, 0, d, dtype=run.dtype),
        pending_keys=torch.zeros(L, 0, s, dtype=run.dtype),
        pending_ages=torch.zeros(L, 0, dtype=torch.long),
        pool_ages=torch.zeros(L, N, dtype=torch.long),
    )
    model.load_memory_state(state)
    return model


class Cell:
    def __init__(self, run: Run, model: MemoryLlamaForCausalLM, plain, length: int):
        self.run, self.model, self.plain = run, model, plain
        cfg = model.config
        self.prompt = torch.randint(3, cfg.vocab_size, (1, length), device=run.device)
        prefix, _ = model.mplus_retrieval(self.prompt)  # the prefix's shape (its content does not matter)
        self.prefix_length = prefix[0][0].shape[2]
        self.mask = torch.ones(1, self.prefix_length + length, dtype=torch.long, device=run.device)
        self.cache = cache_from(cfg, [(k.clone(), v.clone()) for k, v in prefix])
        self.kept = [(layer.keys, layer.values) for layer in self.cache.layers]
        memory = model.long_term_memory
        self.keys = [memory.keys[layer] for layer in range(cfg.num_hidden_layers)]
        self.queries = torch.randn(cfg.num_hidden_layers, 1, length, cfg.retriever_size, device=run.device)
        self.ones = torch.ones(1, length, dtype=torch.bool, device=run.device)

    def rewind(self) -> None:
        for layer, (keys, values) in zip(self.cache.layers, self.kept, strict=True):
            layer.keys, layer.values = keys, values

    def scoring(self) -> None:
        for queries, keys in zip(self.queries, self.keys, strict=True):
            top_candidates(retrieval_scores(queries, self.ones, keys)[0], self.model.config.read_tokens)

    def limit(self) -> None:
        self.plain(self.prompt, attention_mask=self.mask, cache=self.cache, logits_to_keep=1)
        self.scoring()

    def cases(self) -> dict[str, Case]:
        return {
            "mplus": Case(lambda: self.model(self.prompt, logits_to_keep=1)),
            "limit": Case(self.limit, prepare=self.rewind),
            "retrieval": Case(lambda: self.model.mplus_retrieval(self.prompt)),
            "scoring": Case(self.scoring),
        }

    def row(self) -> dict:
        samples = {}
        medians = interleaved_medians(self.run, self.cases(), samples)
        cfg = self.model.config
        return {
            "L": cfg.num_hidden_layers, "d": cfg.hidden_size, "N": cfg.num_memory_tokens, "k": cfg.read_tokens,
            "S": self.model.long_term_memory.slot_counts[0], "n": self.prompt.shape[1],
            **{f"{name}_ms": 1e3 * seconds for name, seconds in medians.items()},
            "vs_limit": paired_ratio(samples, "mplus", "limit"),
            "samples_s": samples,
        }


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--ltm-slots", type=int, nargs="+", default=[150000], help="long-term slots per layer (S)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 64], help="prompt lengths n")
    run = Run("mplus_read", parser.parse_args(argv))
    for slots in run.args.ltm_slots:
        model = mplus_model(run, slots)
        plain = plain_llama(model)
        for length in run.args.prompt_tokens:
            run.rows.append(Cell(run, model, plain, length).row())
            run.progress(run.rows[-1], COLUMNS)
        del model, plain
        gc.collect()
    run.finish(COLUMNS, [
        "mplus_ms: an M+ read of the n-token prompt (logits of the last position); limit_ms: a stock Llama reading a "
        "cached (1 + k + N)-position prefix + the retrieval scoring alone; vs_limit = mplus / limit (median of "
        "same-repeat ratios); retrieval_ms: the retrieval pass alone (scoring + layers 0..L-2 on the prompt + the k "
        "slots' keys/values); scoring_ms: the scoring alone",
    ])


if __name__ == "__main__":
    main()
