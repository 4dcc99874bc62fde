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

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modeling import CallNumbers, MemoryState, check_length, long_term_after, next_state, split_ids


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


class LazyPool:
    """A memory pool as slot indices into the tensors written so far. A commit runs the model's own state
    transition (`next_state`) on the indices, so the drop rule, fill level, generator and `written_at` cannot drift
    from `inject`; the long-term store gets the real slots (`long_term_after`, as in `next_state`)."""

    def __init__(self, state: MemoryState, config):
        self.config = config
        self.pieces = [state.memory]
        layers, slots = state.memory.shape[:2]
        indices = torch.arange(slots).expand(layers, slots)[..., None].clone()
        self.indices = dataclasses.replace(state, memory=indices, long_term=())
        self.long_term = state.long_term
        self._state: MemoryState | None = state

    @property
    def injections(self) -> int:
        return self.indices.num_injections

    def commit(self, new: torch.Tensor, call: int | None = None) -> None:
        """Append new slots [L, k, d] exactly as `model.inject` would (`call`: the injection number of the first
        update of the text they belong to)."""
        layers, k = new.shape[:2]
        total = sum(piece.shape[1] for piece in self.pieces)
        ids = torch.arange(total, total + k).expand(layers, k)[..., None]
        number = self.injections + 1
        self.indices = next_state(self.indices, ids, self.config, with_long_term=False)
        self.long_term = long_term_after(self.long_term, new, number, call, self.config, self.pieces[0].dtype)
        self.pieces.append(new)
        self._state = None

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """The slots [L, n, d] that `index` [L, n] names (indices into the pieces written so far)."""
        out = self.pieces[0].new_empty(index.shape[0], index.shape[1], self.pieces[0].shape[2])
        start = 0
        for piece in self.pieces:
            end = start + piece.shape[1]
            layer, slot = ((index >= start) & (index < end)).nonzero(as_tuple=True)
            if len(layer):
                source = (index[layer, slot] - start).to(piece.device)
                out[layer.to(out.device), slot.to(out.device)] = piece[layer.to(piece.device), source]
            start = end
        return out

    def window_digest(self) -> str:
        """Identifies everything the next write's slots depend on besides its own tokens: the fill level and the
        window of the last min(K, filled) slots (both update rules read exactly these)."""
        filled = self.indices.num_filled_slots
        count = min(self.config.num_update_tokens, filled)
        digest = hashlib.sha256(f"{filled}:".encode())
        if count:
            index = self.indices.memory[..., 0]
            window = self._gather(index[:, index.shape[1] - count :]).cpu().contiguous()
            digest.update(window.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def materialize(self) -> MemoryState:
        """The MemoryState the commits lead to (built once per change; later commits start from it)."""
        if self._state is not None:
            return self._state
        pool = self._gather(self.indices.memory[..., 0])
        self._state = dataclasses.replace(self.indices, memory=pool, long_term=self.long_term)
        self.pieces = [pool]
        layers, slots = pool.shape[:2]
        self.indices = dataclasses.replace(
            self.indices, memory=torch.arange(slots).expand(layers, slots)[..., None].clone()
        )
        return self._state


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
                self.pool.commit(slots, call)
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
    pool.commit(slots, call)
    return slots
