"""Footprint benchmark: memory held by MemoryLlama in float32 and bfloat16, and what a bfloat16 pool costs in accuracy.

Per (dtype, N): pool bytes (it follows the model dtype), the cached memory keys/values, the weights, and the resident
memory (CPU: RSS; CUDA: allocated bytes) after loading, at the peak of one injection and of one question, and at the
end (the previous pool stays alive for `undo`). Peaks are measured per phase in this process (Linux `VmHWM`, reset
through /proc/self/clear_refs; CUDA: `max_memory_allocated`).

Accuracy: logits of a question read from a pool written by real injections, float32 model with a float32 pool versus
the same pool rounded to bfloat16 (what a separate bfloat16 `memory_dtype` would cost) and versus the whole model in
bfloat16.

Run: python -m benchmarks.footprint --model smollm2 --memory-tokens 4096 12800 --dtypes float32 bfloat16
"""

import gc
from pathlib import Path

import torch

from .common import Run, common_parser, fill_pool, format_table, load_model

MB = 2**20
COLUMNS = (
    "dtype",
    "N",
    "pool_dtype",
    "pool_MB",
    "memory_kv_MB",
    "weights_MB",
    "loaded_MB",
    "inject_peak_MB",
    "question_peak_MB",
    "end_MB",
)
ACCURACY_COLUMNS = ("compared", "max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement")


class ResidentMemory:
    """Bytes resident for this process (CPU RSS) or allocated on the accelerator, and their peak since `reset`."""

    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status_kb("VmRSS") * 1024

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_kb("VmHWM") * 1024

    @staticmethod
    def _status_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} missing from /proc/self/status")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def measure(run: Run, dtype: str, num_memory_tokens: int) -> dict:
    resident = ResidentMemory(run.device)
    resident.reset()
    start = resident.current()
    model = load_model(run, num_memory_tokens, run.args.update_tokens, "input", getattr(torch, dtype))
    fill_pool(model)
    loaded = resident.current()
    ids = torch.randint(3, model.config.vocab_size, (1, run.args.update_tokens), device=run.device)
    resident.reset()
    model.inject(ids, chunk_size=ids.shape[1])
    inject_peak = resident.peak() - loaded
    before_question = resident.current()
    resident.reset()
    model.generate(ids[:, :64], max_new_tokens=4, do_sample=False, pad_token_id=model.config.eos_token_id)
    question_peak = resident.peak() - before_question
    row = {
        "dtype": dtype,
        "N": num_memory_tokens,
        "pool_dtype": str(model.memory.dtype).removeprefix("torch."),
        "pool_MB": model.memory.nbytes / MB,
        "memory_kv_MB": nbytes(t for kv in model.memory_key_values() for t in kv) / MB,
        "weights_MB": nbytes(model.parameters()) / MB,
        "loaded_MB": (loaded - start) / MB,
        "inject_peak_MB": inject_peak / MB,
        "question_peak_MB": question_peak / MB,
        "end_MB": (resident.current() - start) / MB,
    }
    del model
    gc.collect()
    return row


@torch.no_grad()
def pool_precision(run: Run, num_memory_tokens: int, injections: int = 4) -> list[dict]:
    """Logit differences of one question when the pool (written by float32 injections) is rounded to bfloat16,
    and when the whole model runs in bfloat16, both against the float32 model with its float32 pool."""
    model = load_model(run, num_memory_tokens, run.args.update_tokens, "input", torch.float32)
    generator = torch.Generator().manual_seed(0)
    vocab, K = model.config.vocab_size, model.config.num_update_tokens
    for _ in range(injections):
        model.inject(torch.randint(3, vocab, (1, K), generator=generator).to(run.device), chunk_size=K)
    question = torch.randint(3, vocab, (1, 64), generator=generator).to(run.device)
    exact = model(question).logits.float()
    state = model.memory_state()
    state.memory = state.memory.to(torch.bfloat16).float()
    model.load_memory_state(state)
    rounded_pool = model(question).logits.float()
    bf16_model = model.to(torch.bfloat16)(question).logits.float()
    return [
        {"compared": name, **logit_differences(exact, other)}
        for name, other in (("bf16 pool, fp32 model", rounded_pool), ("bf16 model and pool", bf16_model))
    ]


def logit_differences(exact: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (exact - other).abs()
    agreement = (exact.argmax(-1) == other.argmax(-1)).float().mean().item()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "top1_agreement": agreement,
    }


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[4096, 12800], help="N values")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--update-tokens", type=int, default=256, help="K (tokens of the measured injection)")
    parser.add_argument("--accuracy-memory-tokens", type=int, default=1024, help="N of the pool-precision check")
    run = Run("footprint", parser.parse_args(argv))
    for dtype in run.args.dtypes:
        for num_memory_tokens in run.args.memory_tokens:
            run.rows.append(measure(run, dtype, num_memory_tokens))
            run.progress(run.rows[-1], COLUMNS)
    accuracy = pool_precision(run, run.args.accuracy_memory_tokens)
    notes = [
        "MB = 2**20 bytes; loaded/end: resident memory above the process before loading (end: after one inject and "
        "one question; the previous pool is kept for undo); *_peak: rise of the peak during that phase",
        "pool precision (logits of a 64-token question, 4 injections of K random tokens, against float32 model and "
        "pool):",
        format_table(accuracy, ACCURACY_COLUMNS),
    ]
    run.finish(COLUMNS, notes, extra={"pool_precision": accuracy})


if __name__ == "__main__":
    main()
