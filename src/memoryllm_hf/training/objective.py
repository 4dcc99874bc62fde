"""The paper's training objective: each step runs one of four processes on one example.

* "new_knowledge": inject the last context WITH gradient and predict the segment reading only `[bos; new slots]`
  (write adapter, as the official code reads a fresh delta);
* "continuous": inject the last 1..max contexts (no gradient, committed one by one as in inference) and predict the
  segment reading the full pool;
* "forgetting": re-score a segment cached at an earlier step after unrelated contexts of later steps were injected;
* "lm": plain language modelling on contexts + segment reading the full pool (keeps the base model's ability).
Every injection is committed to the pool, so the memory keeps changing as in the paper; it is never a parameter.
"""

import bisect
import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling import WRITE
from .config import ObjectiveConfig
from .data import Example

PROCESSES = ("new_knowledge", "continuous", "forgetting", "lm")


@dataclass
class StreamState:
    """What one data stream (one rank) carries from step to step besides the model's memory."""

    rng: random.Random
    cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (segment, labels) kept for a forgetting step
    injected_since_cache: int = 0

    @classmethod
    def seeded(cls, seed: int, rank: int) -> "StreamState":
        return cls(random.Random(f"{seed}-stream-{rank}"))

    def to_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "cached": self.cached, "injected_since_cache": self.injected_since_cache}

    def load_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.cached, self.injected_since_cache = state["cached"], state["injected_since_cache"]


@dataclass
class StepPlan:
    """One step's process and token ids (1-D): the contexts to inject, the tokens to read and their labels."""

    process: str
    segment: torch.Tensor
    labels: torch.Tensor
    contexts: list[torch.Tensor] = field(default_factory=list)


def max_contexts(config: ObjectiveConfig, step: int) -> int:
    """The contexts schedule: most contexts a continuous step may inject at `step`."""
    return config.contexts_schedule_values[bisect.bisect_right(config.contexts_schedule_steps, step)]


def plan_step(config: ObjectiveConfig, stream: StreamState, example: Example, step: int) -> StepPlan:
    """Pick the process (drawing from the stream's generator) and update the forgetting cache.

    Order of the draws: an LM step with probability `lm_ratio`; otherwise, when a cached segment has seen later
    injections, a forgetting step with probability `forgetting_ratio` (which empties the cache with probability
    `forget_cache_refresh`); otherwise a continuous step with probability `full_pool_ratio`, else new knowledge.
    A continuous or new-knowledge step caches its segment when the cache is empty.
    """
    rng = stream.rng
    if rng.random() < config.lm_ratio:
        tokens = torch.cat([*example.contexts, example.segment])[: config.max_lm_tokens]
        return StepPlan("lm", tokens, tokens)
    if stream.cached is not None and stream.injected_since_cache > 0 and rng.random() < config.forgetting_ratio:
        segment, labels = stream.cached
        if rng.random() < config.forget_cache_refresh:
            stream.cached = None
        return StepPlan("forgetting", segment, labels)
    if rng.random() < config.full_pool_ratio:
        limit = min(max_contexts(config, step), len(example.contexts))
        count = rng.randint(1, limit) if config.random_num_contexts else limit
        process, contexts = "continuous", example.contexts[-count:]
    else:
        process, contexts = "new_knowledge", example.contexts[-1:]
    labels = example.segment_labels()
    if stream.cached is None:
        stream.cached, stream.injected_since_cache = (example.segment, labels), 0
    else:
        stream.injected_since_cache += len(contexts)
    return StepPlan(process, example.segment, labels, list(contexts))


class MemoryTrainingModule(nn.Module):
    """The model and the step loss in one `forward`, so accelerate's wrappers (DDP, ...) see a single call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, plan: StepPlan) -> torch.Tensor:
        model = self.model
        segment, labels = plan.segment[None].to(model.device), plan.labels[None].to(model.device)
        if plan.process == "new_knowledge":
            slots = model.new_memory_slots(plan.contexts[-1][None].to(model.device))
            with model.adapters.use(WRITE):
                loss = model(input_ids=segment, labels=labels, memory_slots=slots).loss
            model.commit_memory_slots(slots)
            return loss
        for context in plan.contexts:
            model.inject(context.to(model.device), chunk_size=context.numel())
        return model(input_ids=segment, labels=labels).loss


@contextlib.contextmanager
def _active_adapters(modules: list, names: list) -> Iterator[None]:
    before = [module.active_adapter for module in modules]
    for module, name in zip(modules, names, strict=True):
        module.active_adapter = name
    try:
        yield
    finally:
        for module, name in zip(modules, before, strict=True):
            module.active_adapter = name


def enable_gradient_checkpointing(model) -> None:
    """Gradient checkpointing whose backward replay runs each layer with the adapter (write or read) that was active
    in its forward pass (the role is switched outside the layers, so a plain replay would use the read adapter)."""
    modules = model.adapters.modules

    def context_fn():
        return contextlib.nullcontext(), _active_adapters(modules, [m.active_adapter for m in modules])

    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )
