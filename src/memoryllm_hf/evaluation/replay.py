"""Fast, checked replay of long injection sequences (the retention protocol's engine).

Two pieces:

* `LazyPool` commits new slots to a pool kept as *indices* into the slot tensors written so far, replaying the
  model's own drop rule (`memory_pool`, the model's generator state) on the indices. A commit costs no tensor copy;
  `materialize()` builds the real `MemoryState` only when the model has to read or write (tests check it equals
  the state `model.inject` reaches, bit for bit).
* `ReferenceChain` shares the slots of unrelated chunks between questions. The slots a chunk writes depend on the
  chunk and on the window `[bos; last K slots]`, i.e. on the slots the previous chunk wrote, which depend on the
  chunk before it, and so on: the question's own text influences every later chunk, but the influence shrinks
  with each write (measured on SmolLM2: relative difference 2e-1, 8e-2, 2.5e-2, 6e-3, 1.2e-3, 3e-4 after 0..5
  chunks). A chunk whose last `depth` predecessors are the same as in the reference chain (the unrelated texts
  written in order from an empty pool) takes the reference chain's slots; every other chunk is computed in the
  question's own chain. `depth=None` shares nothing (the exact protocol). While a question's chain is still
  the reference's own write sequence (the prefill), sharing is exact, and stays so with per-question drop seeds
  only when the write sees the same window as in the reference (`LazyPool.window_digest`, checked): a write of
  fewer than K slots leaves older survivors in the next window, and which survive depends on the drops.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modeling import CallNumbers, LazyPool, MemoryState, check_length, split_ids


@dataclass
class Write:
    """One memory update: a chunk of token ids [1, n] and a key naming the text (`u12/1` = unrelated context 12,
    chunk 1); keys are unique per text, so equal key histories mean equal inputs."""

    key: str
    ids: torch.Tensor


def chunk_writes(key: str, ids: list[int], chunk_size: int, min_tokens: int) -> list[Write]:
    """The updates `model.inject(ids)` makes: near-equal chunks of at most `chunk_size` tokens."""
    check_length(len(ids), min_tokens, f"text {key}")
    chunks = split_ids(torch.tensor(ids, dtype=torch.long), chunk_size)
    return [Write(f"{key}/{i}", chunk) for i, chunk in enumerate(chunks)]


class ReferenceChain:
    """Slots of the reference writes (computed lazily, in order, from `start`), handed out to a question's chain
    wherever its last `depth` writes match the reference's (see the module docstring)."""

    def __init__(self, model, writes: list[Write], start: MemoryState, depth: int | None):
        self.model, self.writes, self.depth = model, writes, depth
        self.keys = [write.key for write in writes]
        self.position = {key: i for i, key in enumerate(self.keys)}
        self.slots: list[torch.Tensor] = []
        self.windows: list[str] = []  # window_digest() of the reference pool before each write
        self._pool = LazyPool(start, model.config)

    def lookup(self, history: list[str], write: Write, window: Callable[[], str]) -> torch.Tensor | None:
        """The shared slots for `write` after `history`, or None when it must be computed in the question's chain.
        `window()` is the question pool's `window_digest()`, asked only where sharing is meant to be exact."""
        position = self.position.get(write.key)
        if self.depth is None or position is None:
            return None
        if len(history) == position and history == self.keys[:position]:
            # The question's chain so far is the reference's own writes: sharing is exact when the write also sees
            # the same window (with per-question drop seeds a short write can leave other survivors in it).
            slots = self._slots(position)
            return slots if window() == self.windows[position] else None
        if position < self.depth:
            return None
        if self.depth and history[-self.depth :] != self.keys[position - self.depth : position]:
            return None
        return self._slots(position)

    def _slots(self, position: int) -> torch.Tensor:
        while len(self.slots) <= position:
            self.windows.append(self._pool.window_digest())
            self.slots.append(compute_slots(self.model, self._pool, self.writes[len(self.slots)]))
        return self.slots[position]


class QuestionChain:
    """One question's writes on a `LazyPool`: shared slots from the reference where allowed, the rest computed."""

    def __init__(self, model, start: MemoryState, reference: ReferenceChain | None):
        self.model, self.reference = model, reference
        self.pool = LazyPool(start, model.config)
        self.history: list[str] = []
        self.counts = {"shared": 0, "computed": 0}
        self.calls = CallNumbers()  # as `inject` numbers the chunks of one text

    def write(self, writes: list[Write]) -> None:
        for write in writes:
            slots = self.reference.lookup(self.history, write, self.pool.window_digest) if self.reference else None
            call = self.calls(write.key.rsplit("/", 1)[0], self.pool.injections + 1)
            if slots is None:
                compute_slots(self.model, self.pool, write, call)
                self.counts["computed"] += 1
            else:
                self.pool.commit(slots, call, token_ids=write.ids)
                self.counts["shared"] += 1
            self.history.append(write.key)

    def load(self) -> None:
        """Make the chain's current pool the model's memory."""
        self.model.set_memory_state(self.pool.materialize(), validate=False)


@torch.no_grad()
def compute_slots(model, pool: LazyPool, write: Write, call: int | None = None) -> torch.Tensor:
    """New slots of `write` with the model's memory set to `pool`'s state; commits them to `pool`."""
    model.set_memory_state(pool.materialize(), validate=False)
    slots = model.new_memory_slots(write.ids.to(model.device))
    pool.commit(slots, call, token_ids=write.ids)
    return slots
