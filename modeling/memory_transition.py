"""The one memory state transition: what an injection's new slots do to a memory state (the pool's drop rule is
`memory_pool`; the long-term store's append rule `memory_store`). Pure functions: `inject`, `commit_memory_slots`
and the evaluation replay all use them; `LazyPool` runs them on slot indices (a commit copies no pool), which the
journal's `replay` and the evaluation replay use."""

import dataclasses
import hashlib

import torch

from .memory_fields import MemoryStateError
from .memory_pool import drop_and_append, kept_slot_indices, tile_pool
from .memory_settings import store_device, store_dtype
from .memory_state import MemoryState
from .memory_store import LongTermStore, MemoryBlock, store_append


def check_finite_slots(slots: torch.Tensor) -> torch.Tensor:
    """New memory slots [L, k, d] before they are committed: refuse NaN/inf, naming the first broken layer."""
    finite = torch.isfinite(slots).flatten(1).all(dim=1)
    if not bool(finite.all()):
        layer = int((~finite).nonzero()[0])
        raise MemoryStateError(
            f"the new memory slots of layer {layer} hold NaN/inf values (broken weights or overflow in this dtype); "
            "nothing was written, the memory is unchanged"
        )
    return slots


def next_state(
    state: MemoryState,
    new: torch.Tensor,
    config,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    call: int | None = None,
    with_long_term: bool = True,
    token_ids: torch.Tensor | None = None,
) -> MemoryState:
    """The memory after committing new slots [L, k, d] (the one state transition: `inject`, `commit_memory_slots` and
    the evaluation replay all use it). Pure: `state` is not changed.

    Pool: an empty "tile" pool is filled with copies; otherwise k slots are dropped (empty ones first, then random
    ones drawn by `generator`, default the state's own generator, whose advanced state the result carries) and the
    new slots are appended at the end (written into `out`, an unused pool-shaped buffer, when given).
    Long-term store (when `config.long_term_memory_tokens` > 0): the new slots become one more block, numbered like
    `written_at`, of `inject()` call `call` (default: its own number), keeping the `token_ids` it was written from;
    the oldest blocks leave past the bound.
    (`with_long_term=False` leaves the store as it is: the evaluation replay runs the pool rule on slot indices and
    stores the real slots with `long_term_after`.)
    """
    N, filled = config.num_memory_tokens, int(state.filled)
    rng_state, number = state.rng_state, int(state.injections) + 1
    if filled == 0 and config.fresh_pool == "tile":
        pool, filled = tile_pool(new.to(state.memory.dtype), N), N
        written_at = torch.full_like(state.written_at, number)
    else:
        drawer = generator
        if drawer is None:
            drawer = torch.Generator()
            drawer.set_state(state.rng_state.cpu())
        L, per_layer = config.num_hidden_layers, config.drop_memory_per_layer
        keep = kept_slot_indices(N, filled, new.shape[1], L, per_layer, drawer)
        pool, filled = drop_and_append(state.memory, new, keep, out), min(N, filled + new.shape[1])
        stamps = torch.full((L, new.shape[1], 1), number, dtype=torch.long, device=state.written_at.device)
        written_at = drop_and_append(state.written_at[..., None], stamps, keep)[..., 0]
        if generator is None:
            rng_state = drawer.get_state()
    long_term = state.long_term
    if with_long_term:
        long_term = long_term_after(long_term, new, number, call, config, state.memory.dtype, token_ids)
    return dataclasses.replace(
        state,
        memory=pool,
        filled=torch.full_like(state.filled, filled),
        injections=state.injections + 1,
        rng_state=rng_state,
        written_at=written_at,
        long_term=long_term,
    )


def long_term_after(
    long_term: LongTermStore,
    new: torch.Tensor,
    number: int,
    call: int | None,
    config,
    pool_dtype: torch.dtype,
    token_ids: torch.Tensor | None = None,
) -> LongTermStore:
    """The long-term store after injection `number` wrote `new` [L, k, d] from `token_ids` [n] (None: not known)
    (unchanged when the store is off)."""
    bound = getattr(config, "long_term_memory_tokens", 0)
    if not bound:
        return long_term
    slots = new.detach().to(device=store_device(config), dtype=store_dtype(config, pool_dtype), copy=True)
    ids = None if token_ids is None else token_ids.detach().reshape(-1).to("cpu", torch.int32, copy=True)
    return store_append(long_term, MemoryBlock(number, call or number, slots, ids), bound)


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

    def commit(self, new: torch.Tensor, call: int | None = None, generator: torch.Generator | None = None,
               token_ids: torch.Tensor | None = None) -> None:
        """Append new slots [L, k, d] exactly as `model.inject` would (`call`: the injection number of the first
        update of the text they belong to; `generator`: an external generator drawing the dropped slots; `token_ids`:
        the tokens the slots were written from, kept by the long-term store)."""
        layers, k = new.shape[:2]
        total = sum(piece.shape[1] for piece in self.pieces)
        ids = torch.arange(total, total + k).expand(layers, k)[..., None]
        number = self.injections + 1
        self.indices = next_state(self.indices, ids, self.config, generator, with_long_term=False)
        self.long_term = long_term_after(
            self.long_term, new, number, call, self.config, self.pieces[0].dtype, token_ids
        )
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


def replay(state: MemoryState, entries, config) -> MemoryState:
    """The memory after the journal's `entries` (`memory_files.JournalEntry`, consecutive injections following
    `state`): each one committed with `next_state` exactly as `inject` did (same slots, call number and generator
    state), so the pool, its generator and the long-term store come out bit-exact."""
    pool = LazyPool(state, config)  # the drop rule runs on slot indices; the pool is gathered once
    for entry in entries:
        if entry.injection != pool.injections + 1:
            raise MemoryStateError(
                f"journal entry of injection {entry.injection} does not follow a memory of {pool.injections} "
                "injections: the journal belongs to another memory"
            )
        generator = None
        if entry.generator is not None:
            generator = torch.Generator()
            generator.set_state(entry.generator.cpu())
        pool.commit(entry.slots.to(state.memory.device), entry.call, generator, entry.token_ids)
    return pool.materialize()
