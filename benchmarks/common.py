"""Shared pieces of the benchmarks: command-line options, models, interleaved timing, tables and JSON.

Every benchmark measures its variants side by side in one process: each repeat runs every variant once (in a
rotating order) and the table reports medians, so slow drifts of a shared machine hit all variants alike.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaForCausalLM, LlamaModel

from memoryllm_hf import load
from memoryllm_hf.modeling import MemoryLlamaForCausalLM
from memoryllm_hf.modeling.memory_prefix import PrefixKV, prefix_key_values

SMOLLM2 = "smollm2"
TINY = "tiny"


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=(TINY, SMOLLM2), default=SMOLLM2, help="tiny random config or SmolLM2-135M")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--repeats", type=int, default=4, help="timed repeats per variant (median reported; best a multiple of 4)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of this process (steadier on a CPU shared with other jobs)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


@dataclass
class Run:
    """Where and how a benchmark runs, plus the rows it measured."""

    name: str
    args: argparse.Namespace
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self):
        torch.set_num_threads(self.args.threads)
        self.device = torch.device(self.args.device)
        self.dtype = getattr(torch, self.args.dtype)
        if self.args.clock == "cpu" and self.device.type != "cpu":
            raise ValueError("--clock cpu measures CPU work; use --clock wall on an accelerator")
        self.clock = time.process_time if self.args.clock == "cpu" else time.perf_counter

    def machine(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} (torch {torch.__version__})"
        return f"{cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"

    def header(self) -> str:
        a = self.args
        return (
            f"# {self.name}: {a.model}, {self.machine()}, {a.dtype}, {a.attn}, {a.clock} clock, median of {a.repeats}"
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def progress(self, row: dict, columns: Sequence[str]) -> None:
        """One line per measured row on stderr, so long runs show where they are."""
        print(
            f"[{self.name}] "
            + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k in columns),
            file=sys.stderr,
            flush=True,
        )

    def results(self, notes: Sequence[str] = (), extra: dict | None = None) -> dict:
        """Everything this run measured, as written to JSON: meta (machine and options), rows, notes, `extra`."""
        meta = {"benchmark": self.name, "machine": self.machine(), **{k: str(v) for k, v in vars(self.args).items()}}
        return {"meta": meta, "rows": self.rows, "notes": list(notes), **(extra or {})}

    def finish(self, columns: Sequence[str], notes: Sequence[str] = (), extra: dict | None = None) -> None:
        """Print the table (and notes) and write the JSON file if asked."""
        print(self.header())
        print(format_table(self.rows, columns))
        for note in notes:
            print(note)
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.results(notes, extra), indent=1))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cell(value) -> str:
    """Floats with 3 significant digits (whole numbers from 100 up), anything else as `str`."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain-text table of the given columns."""
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class Case:
    """A timed variant: `prepare` runs untimed before every repeat, `run` is timed (or, if it returns a float,
    that is its own measurement in seconds, e.g. the decode part of a `generate` call)."""

    run: Callable[[], object]
    prepare: Callable[[], object] = lambda: None


def balanced_orders(count: int) -> list[list[int]]:
    """Williams design: orders of `count` cases in which every case runs first equally often and follows every
    other case equally often (one cycle of orders), so carry-over effects (caches, allocator state left by the
    previous case) hit all cases alike."""
    first, low, high = [0], 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    orders = [[(case + shift) % count for case in first] for shift in range(count)]
    return orders if count % 2 == 0 else orders + [order[::-1] for order in orders]


def interleaved_medians(run: Run, cases: dict[str, Case], samples: dict | None = None) -> dict[str, float]:
    """Median seconds of each case. After one untimed round, every repeat runs all cases once, in the balanced
    orders of `balanced_orders` (use a multiple of their number as --repeats). The raw seconds go to `samples`."""
    names = list(cases)
    for name in names:
        cases[name].prepare()
        cases[name].run()
    orders = balanced_orders(len(names))
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(run.args.repeats):
        for name in (names[index] for index in orders[repeat % len(orders)]):
            cases[name].prepare()
            run.sync()
            start = run.clock()
            result = cases[name].run()
            run.sync()
            elapsed = run.clock() - start
            times[name].append(result if isinstance(result, float) else elapsed)
            del result  # freed outside the timing (and not in the next case's)
    if samples is not None:
        samples.update(times)
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over repeats of numerator / denominator measured in the same repeat (minutes apart at most), which
    cancels the slow load changes of a shared machine better than a ratio of two medians."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator], strict=True))


# ---------------------------------------------------------------------------------------------------- models
def load_model(
    run: Run, num_memory_tokens: int, num_update_tokens: int, memory_update: str, dtype: torch.dtype | None = None
) -> MemoryLlamaForCausalLM:
    """The benchmark model (tiny random or SmolLM2-135M) on the run's device, in `dtype` (default: the run's), with
    an empty pool."""
    memory = {"num_memory_tokens": num_memory_tokens, "num_update_tokens": num_update_tokens}
    grow = {"fresh_pool": "grow"} if memory_update == "input" else {}
    dtype = dtype or run.dtype
    # the pool read (retrieval reads are measured by benchmarks.retrieve_read)
    model, _ = load(
        run.args.model, device=run.device, dtype=dtype, memory_update=memory_update, read_mode="pool", **grow, **memory
    )
    model.set_attn_implementation(run.args.attn)
    return model


@torch.no_grad()
def fill_pool(model: MemoryLlamaForCausalLM, seed: int = 0) -> None:
    """Make every slot a memory (random hidden-state-like vectors), as after many injections."""
    generator = torch.Generator().manual_seed(seed)
    state = model.memory_state()
    state.memory = torch.randn(state.memory.shape, generator=generator).to(state.memory.dtype)
    state.filled.fill_(model.config.num_memory_tokens)
    state.injections.fill_(1)
    model.load_memory_state(state)


def plain_llama(model: MemoryLlamaForCausalLM) -> LlamaForCausalLM:
    """A stock `LlamaForCausalLM` sharing the memory model's weights (no copy)."""
    with torch.device("meta"):
        plain = LlamaForCausalLM(model.config)
    plain.model, plain.lm_head = model.model, model.lm_head
    plain.generation_config = model.generation_config
    return plain.eval()


def plain_decoder(model: MemoryLlamaForCausalLM, num_layers: int) -> LlamaModel:
    """A stock `LlamaModel` made of the memory model's first `num_layers` layers (shared, no copy)."""
    config = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": num_layers})
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        decoder = LlamaModel(config)
    base = model.model
    decoder.embed_tokens, decoder.norm, decoder.rotary_emb = base.embed_tokens, base.norm, base.rotary_emb
    decoder.layers = torch.nn.ModuleList(model.model.layers[:num_layers])
    return decoder.eval()


@torch.no_grad()
def prefix_kv(model: MemoryLlamaForCausalLM, length: int, seed: int = 1) -> PrefixKV:
    """Keys/values of a `length`-position prefix for every layer (what a forward over that prefix would cache)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(model.config.num_hidden_layers, length, model.config.hidden_size, generator=generator)
    hidden = hidden.to(device=model.device, dtype=model.dtype)
    return prefix_key_values(model.model.layers, model.model.rotary_emb, list(hidden))


def cache_from(config, kv: PrefixKV) -> DynamicCache:
    """A fresh `DynamicCache` holding copies of `kv`, filled through the public `update` API."""
    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(kv):
        cache.update(keys, values, index)
    return cache
