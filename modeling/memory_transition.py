"""The one memory state transition: what an injection's new slots do to a memory state (the pool's drop rule is
`memory_pool`; the long-term store's append rule `memory_store`). Pure functions: `inject`, `commit_memory_slots`
and the evaluation replay all use them."""

import dataclasses

import torch

from .memory_fields import MemoryStateError, torch_dtype
from .memory_pool import drop_and_append, kept_slot_indices, tile_pool
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
) -> MemoryState:
    """The memory after committing new slots [L, k, d] (the one state transition: `inject`, `commit_memory_slots` and
    the evaluation replay all use it). Pure: `state` is not changed.

    Pool: an empty "tile" pool is filled with copies; otherwise k slots are dropped (empty ones first, then random
    ones drawn by `generator`, default the state's own generator, whose advanced state the result carries) and the
    new slots are appended at the end (written into `out`, an unused pool-shaped buffer, when given).
    Long-term store (when `config.long_term_memory_tokens` > 0): the new slots become one more block, numbered like
    `written_at`, of `inject()` call `call` (default: its own number); the oldest blocks leave past the bound.
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
        long_term = long_term_after(long_term, new, number, call, config, state.memory.dtype)
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
    long_term: LongTermStore, new: torch.Tensor, number: int, call: int | None, config, pool_dtype: torch.dtype
) -> LongTermStore:
    """The long-term store after injection `number` wrote `new` [L, k, d] (unchanged when the store is off)."""
    bound = getattr(config, "long_term_memory_tokens", 0)
    if not bound:
        return long_term
    dtype = torch_dtype(config.long_term_memory_dtype) or pool_dtype
    slots = new.detach().to(device=config.long_term_memory_device or "cpu", dtype=dtype, copy=True)
    return store_append(long_term, MemoryBlock(number, call or number, slots), bound)
