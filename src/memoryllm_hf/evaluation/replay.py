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

from dataclasses import dataclass

import torch

from ..modeling.memory_pool import drop_and_append, kept_slot_indices, tile_pool
from ..modeling.memory_state import MemoryState


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
    """A memory pool as slot indices into the tensors written so far; commits replay the model's drop rule."""

    def __init__(self, state: MemoryState, config):
        self.config = config
        self.pieces = [state.memory]
        layers, slots = state.memory.shape[:2]
        self.index = torch.arange(slots).expand(layers, slots).clone()
        self.filled, self.injections = int(state.filled), int(state.injections)
        self.rng_state = state.rng_state.cpu().clone()
        self._state: MemoryState | None = state

    def commit(self, new: torch.Tensor) -> None:
        """Append new slots [L, k, d] exactly as `model._state_after(new, None)` would."""
        layers, k = new.shape[:2]
        slots = self.config.num_memory_tokens
        total = sum(piece.shape[1] for piece in self.pieces)
        ids = torch.arange(total, total + k).expand(layers, k)
        if self.filled == 0 and self.config.fresh_pool == "tile":
            self.index, self.filled = tile_pool(ids, slots), slots
        else:
            drawer = torch.Generator()
            drawer.set_state(self.rng_state)
            keep = kept_slot_indices(slots, self.filled, k, layers, self.config.drop_memory_per_layer, drawer)
            self.index = drop_and_append(self.index[..., None], ids[..., None], keep)[..., 0]
            self.filled, self.rng_state = min(slots, self.filled + k), drawer.get_state()
        self.pieces.append(new)
        self.injections += 1
        self._state = None

    def materialize(self) -> MemoryState:
        """The MemoryState the commits lead to (built once per change; later commits start from it)."""
        if self._state is not None:
            return self._state
        pool = torch.empty_like(self.pieces[0])
        start = 0
        for piece in self.pieces:
            end = start + piece.shape[1]
            layer, slot = ((self.index >= start) & (self.index < end)).nonzero(as_tuple=True)
            if len(layer):
                source = (self.index[layer, slot] - start).to(piece.device)
                pool[layer.to(pool.device), slot.to(pool.device)] = piece[layer.to(piece.device), source]
            start = end
        long = dict(dtype=torch.long, device=pool.device)
        self._state = MemoryState(
            memory=pool,
            filled=torch.tensor(self.filled, **long),
            injections=torch.tensor(self.injections, **long),
            rng_state=self.rng_state.clone(),
        )
        self.pieces = [pool]
        self.index = torch.arange(pool.shape[1]).expand(pool.shape[0], -1).clone()
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
            if slots is None:
                compute_slots(self.model, self.pool, write)
                self.counts["computed"] += 1
            else:
                self.pool.commit(slots)
                self.counts["shared"] += 1
            self.history.append(write.key)

    def load(self) -> None:
        """Make the chain's current pool the model's memory."""
        self.model._set_state(self.pool.materialize())


@torch.no_grad()
def compute_slots(model, pool: LazyPool, write: Write) -> torch.Tensor:
    """New slots of `write` with the model's memory set to `pool`'s state; commits them to `pool`."""
    model._set_state(pool.materialize())
    slots = model.new_memory_slots(write.ids.to(model.device))
    pool.commit(slots)
    return slots
