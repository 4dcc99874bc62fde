"""Read benchmark: prefill latency and decode speed of MemoryLlama with a full pool of N slots per layer.

Compared side by side with
* limit: a stock `LlamaForCausalLM` with the same weights whose `DynamicCache` already holds an (N+1)-position prefix
  (the least work any memory read can do: the memory's keys/values exist, attention over them remains);
* recompute: MemoryLlama forced to recompute the memory keys/values (norm, k/v projections, RoPE over
  `[bos; memory]`) at every prefill: the work the official concatenation path pays per question, with our attention;
* reference: `memoryllm_hf.reference.reference_logits`, the official concatenation path itself (eager attention,
  logits of every position).

Run: python -m benchmarks.read --model smollm2 --memory-tokens 1024 4096 12800 --prompt-tokens 16 64 512
"""

import gc
import sys
from unittest import mock

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from memoryllm_hf.reference import reference_logits

from .common import (
    Case,
    Run,
    cache_from,
    common_parser,
    fill_pool,
    interleaved_medians,
    load_model,
    paired_ratio,
    plain_llama,
)

COLUMNS = (
    "N",
    "n",
    "ours_ms",
    "limit_ms",
    "recompute_ms",
    "reference_ms",
    "vs_limit",
    "speedup_vs_recompute",
    "speedup_vs_reference",
    "decode_tok_s",
    "limit_tok_s",
    "decode_vs_limit",
    "kv_recomputed",
)


class StepClock(LogitsProcessor):
    """Records the time at which every generation step's logits arrive."""

    def __init__(self, run: Run):
        self.run, self.stamps = run, []

    def __call__(self, input_ids, scores):
        self.run.sync()
        self.stamps.append(self.run.clock())
        return scores

    def seconds_per_token(self) -> float:
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


class ReadCell:
    """One (pool, prompt) cell: the memory model, the plain Llama sharing its weights, and a random prompt."""

    def __init__(self, run: Run, model, plain, length: int):
        self.run, self.model, self.plain = run, model, plain
        self.prompt = torch.randint(3, model.config.vocab_size, (1, length), device=run.device)
        self.mask = torch.ones(1, model.memory_prefix_length + length, dtype=torch.long, device=run.device)
        self.limit_cache = cache_from(model.config, model.memory_key_values())
        self.limit_prefix = [(layer.keys, layer.values) for layer in self.limit_cache.layers]

    def rewind_limit_cache(self) -> None:
        """Put the plain Llama's cache back to holding only the memory prefix, its own contiguous tensors built once
        (no copy here; what the last forward appended is freed here, outside the timing, as ours is)."""
        for layer, (keys, values) in zip(self.limit_cache.layers, self.limit_prefix, strict=True):
            layer.keys, layer.values = keys, values

    def forget_memory_kv(self) -> None:
        self.model.clear_memory_key_values()

    def prefill_cases(self) -> dict[str, Case]:
        model, prompt = self.model, self.prompt
        return {
            "ours": Case(lambda: model(prompt, logits_to_keep=1)),
            "limit": Case(self.limit_prefill, prepare=self.rewind_limit_cache),
            "recompute": Case(lambda: model(prompt, logits_to_keep=1), prepare=self.forget_memory_kv),
            "reference": Case(lambda: reference_logits(model, prompt)),
        }

    def limit_prefill(self):
        return self.plain(self.prompt, attention_mask=self.mask, cache=self.limit_cache, logits_to_keep=1)

    def decode_cases(self) -> dict[str, Case]:
        return {
            "ours": Case(lambda: self.decode(self.model.generate)),
            "limit": Case(
                lambda: self.decode(self.plain.generate, attention_mask=self.mask, cache=self.limit_cache),
                prepare=self.rewind_limit_cache,
            ),
        }

    def decode(self, generate, **inputs) -> float:
        """Seconds per generated token after the first (the prefill step is excluded)."""
        clock = StepClock(self.run)
        new_tokens = self.run.args.new_tokens
        generate(
            self.prompt,
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.model.config.eos_token_id,
            logits_processor=LogitsProcessorList([clock]),
        )
        return clock.seconds_per_token()

    def row(self) -> dict:
        prefill_samples, decode_samples = {}, {}
        prefill = interleaved_medians(self.run, self.prefill_cases(), prefill_samples)
        decode = interleaved_medians(self.run, self.decode_cases(), decode_samples)
        return {
            "N": self.model.config.num_memory_tokens,
            "n": self.prompt.shape[1],
            **{f"{name}_ms": 1e3 * seconds for name, seconds in prefill.items()},
            "vs_limit": paired_ratio(prefill_samples, "ours", "limit"),
            "speedup_vs_recompute": paired_ratio(prefill_samples, "recompute", "ours"),
            "speedup_vs_reference": paired_ratio(prefill_samples, "reference", "ours"),
            "decode_tok_s": 1 / decode["ours"],
            "limit_tok_s": 1 / decode["limit"],
            "decode_vs_limit": paired_ratio(decode_samples, "limit", "ours"),
            "prefill_samples_s": prefill_samples,
            "decode_samples_s_per_token": decode_samples,
        }


def count_memory_kv_computations(model, prompt: torch.Tensor, questions: int = 3) -> int:
    """Memory key/value computations during `questions` forwards + generates against an unchanged memory."""
    module = sys.modules[type(model.reads["pool"]).__module__]  # the pool read computes them
    with mock.patch.object(module, "prefix_key_values", wraps=module.prefix_key_values) as spy:
        for _ in range(questions):
            model(prompt)
            model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=model.config.eos_token_id)
    return spy.call_count


@torch.no_grad()
def measure(run: Run, num_memory_tokens: int) -> list[dict]:
    """Rows for one pool size; `kv_recomputed` counts memory key/value computations during repeated questions."""
    model = load_model(run, num_memory_tokens, run.args.update_tokens, "input")
    fill_pool(model)
    plain = plain_llama(model)
    rows = []
    for length in run.args.prompt_tokens:
        cell = ReadCell(run, model, plain, length)
        rows.append(cell.row())
        run.progress(rows[-1], COLUMNS)
    recomputations = count_memory_kv_computations(model, cell.prompt)
    for row in rows:
        row["kv_recomputed"] = recomputations
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[1024, 4096, 12800], help="N values")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 64, 512], help="prompt lengths n")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens per decode measurement")
    parser.add_argument("--update-tokens", type=int, default=256, help="K (does not affect reads)")
    run = Run("read", parser.parse_args(argv))
    for num_memory_tokens in run.args.memory_tokens:
        run.rows += measure(run, num_memory_tokens)
        gc.collect()
    notes = [
        "ours_ms: forward of the n-token prompt (logits of the last position, as generate's prefill); "
        "vs_limit = ours / limit (goal <= 1.1); speedup_vs_X = X / ours (ratios: medians of same-repeat ratios); "
        "decode_vs_limit = our tokens/s / limit tokens/s (goal >= 0.95)",
        "kv_recomputed: memory key/value computations during 3 more questions (forward + generate) against the "
        "unchanged memory (must be 0)",
    ]
    run.finish(COLUMNS, notes)


if __name__ == "__main__":
    main()
