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
  question's own chain. `depth=None` shares nothing (the exact protocol).
"""

import dataclasses
from dataclasses import dataclass

import torch

from ..modeling.memory_state import MemoryState, long_term_after, next_state


@dataclass
class Write:
    """One memory update: a chunk of token ids [1, n] and a key naming the text (`u12/1` = unrelated context 12,
    chunk 1); keys are unique per text, so equal key histories mean equal inputs."""

    key: str
    ids: torch.Tensor


def chunk_writes(key: str, ids: list[int], chunk_size: int, min_tokens: int) -> list[Write]:
    """The updates `model.inject(ids)` makes: near-equal chunks of at most `chunk_size` tokens."""
    if len(ids) < min_tokens:
        raise ValueError(f"text {key} has {len(ids)} tokens, fewer than the model's min_inject_tokens={min_tokens}")
    tensor = torch.tensor(ids, dtype=torch.long)
    count = -(-len(ids) // chunk_size)
    return [Write(f"{key}/{i}", chunk[None]) for i, chunk in enumerate(torch.tensor_split(tensor, count))]


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

    def materialize(self) -> MemoryState:
        """The MemoryState the commits lead to (built once per change; later commits start from it)."""
        if self._state is not None:
            return self._state
        index = self.indices.memory[..., 0]
        pool = torch.empty_like(self.pieces[0])
        start = 0
        for piece in self.pieces:
            end = start + piece.shape[1]
            layer, slot = ((index >= start) & (index < end)).nonzero(as_tuple=True)
            if len(layer):
                source = (index[layer, slot] - start).to(piece.device)
                pool[layer.to(pool.device), slot.to(pool.device)] = piece[layer.to(piece.device), source]
            start = end
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
        self._pool = LazyPool(start, model.config)

    def lookup(self, history: list[str], write: Write) -> torch.Tensor | None:
        """The shared slots for `write` after `history`, or None when it must be computed in the question's chain."""
        position = self.position.get(write.key)
        if self.depth is None or position is None:
            return None
        window = min(self.depth, position)
        if position < self.depth and len(history) != position:
            return None
        if window and history[-window:] != self.keys[position - window : position]:
            return None
        while len(self.slots) <= position:
            self.slots.append(compute_slots(self.model, self._pool, self.writes[len(self.slots)]))
        return self.slots[position]


class QuestionChain:
    """One question's writes on a `LazyPool`: shared slots from the reference where allowed, the rest computed."""

    def __init__(self, model, start: MemoryState, reference: ReferenceChain | None):
        self.model, self.reference = model, reference
        self.pool = LazyPool(start, model.config)
        self.history: list[str] = []
        self.counts = {"shared": 0, "computed": 0}

    def write(self, writes: list[Write]) -> None:
        for write in writes:
            slots = self.reference.lookup(self.history, write) if self.reference else None
            call = self._call(write)
            if slots is None:
                compute_slots(self.model, self.pool, write, call)
                self.counts["computed"] += 1
            else:
                self.pool.commit(slots, call)
                self.counts["shared"] += 1
            self.history.append(write.key)

    def _call(self, write: Write) -> int:
        """The injection number of the first chunk of `write`'s text (the chunks of one text are one inject call)."""
        text = write.key.rsplit("/", 1)[0]
        previous = self.history[-1].rsplit("/", 1)[0] if self.history else None
        if text != previous:
            self._call_start = self.pool.injections + 1
        return self._call_start

    def load(self) -> None:
        """Make the chain's current pool the model's memory."""
        self.model._set_state(self.pool.materialize())


@torch.no_grad()
def compute_slots(model, pool: LazyPool, write: Write, call: int | None = None) -> torch.Tensor:
    """New slots of `write` with the model's memory set to `pool`'s state; commits them to `pool`."""
    model._set_state(pool.materialize())
    slots = model.new_memory_slots(write.ids.to(model.device))
    pool.commit(slots, call)
    return slots
