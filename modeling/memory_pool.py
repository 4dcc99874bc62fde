"""The memory pool's update rule: first-injection tiling, random drops, newest slots at the end; and the check
that lets an old pool be recycled as the next update's output buffer."""

import functools
import sys

import torch


def tile_pool(new: torch.Tensor, num_slots: int) -> torch.Tensor:
    """First injection into an empty pool: repeat the k new slots [L, k, d] to fill all N slots (official rule:
    N // k full copies, then the last N % k new slots)."""
    k = new.shape[1]
    if k >= num_slots:
        return new[:, -num_slots:].clone()
    copies, rest = divmod(num_slots, k)
    return torch.cat([new] * copies + [new[:, k - rest :]], dim=1)


def kept_slot_indices(
    num_slots: int,
    num_filled: int,
    num_dropped: int,
    num_layers: int,
    per_layer: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sorted indices [L, N - k] of the slots that survive an update that writes k new slots.

    Empty slots (the first N - filled) go first; the rest are drawn at random among the filled ones: one
    `randperm(filled)` per layer in layer order (MemoryLLM-8B) or one shared by all layers (MemoryLLM-7B), whose
    first entries survive. A full pool therefore draws exactly like the official code.
    """
    empty = num_slots - num_filled
    from_empty = min(empty, num_dropped)
    from_filled = num_dropped - from_empty
    if from_filled == 0:
        return torch.arange(from_empty, num_slots).expand(num_layers, -1)
    draws = num_layers if per_layer else 1
    survivors = num_filled - from_filled
    keep = [_sorted_prefix(torch.randperm(num_filled, generator=generator), survivors) for _ in range(draws)]
    return (torch.stack(keep) + empty).expand(num_layers, -1)


def _sorted_prefix(permutation: torch.Tensor, length: int) -> torch.Tensor:
    """`permutation[:length]` sorted, in linear time (marks the rest of the permutation and lists what is left)."""
    marked = torch.ones(permutation.numel(), dtype=torch.bool)
    marked[permutation[length:]] = False
    return marked.nonzero().squeeze(1)


def drop_and_append(
    memory: torch.Tensor, new: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """New pool: the kept slots in their old order followed by the new slots. Writes each slot exactly once, into
    `out` when given (a buffer shaped like `memory` that nothing else uses), else into a new tensor."""
    num_kept = keep.shape[1]
    if out is not None and (out.shape != memory.shape or out.dtype != memory.dtype or out.device != memory.device):
        raise ValueError(f"out must be shaped like the pool {tuple(memory.shape)}, got {tuple(out.shape)}")
    pool = torch.empty_like(memory) if out is None else out
    keep = keep.to(memory.device)
    for layer in range(memory.shape[0]):
        torch.index_select(memory[layer], 0, keep[layer], out=pool[layer, :num_kept])
    pool[:, num_kept:] = new.to(pool.dtype)
    return pool


def is_sole_reference(tensor: torch.Tensor) -> bool:
    """True when the caller's one variable is the only reference to `tensor` and to its storage: no other Python
    name, no view, no autograd record. Such a tensor can be overwritten without anyone seeing it change."""
    return all(count <= unshared for count, unshared in zip(_ownership(tensor), _unshared_ownership(), strict=True))


def _ownership(tensor: torch.Tensor) -> tuple[int, int, int]:
    storage_uses = getattr(torch._C, "_storage_Use_Count", None)
    if storage_uses is None:  # torch without the counter: never claim sole ownership
        return sys.maxsize, sys.maxsize, sys.maxsize
    return sys.getrefcount(tensor), tensor._use_count(), storage_uses(tensor.untyped_storage()._cdata)


@functools.cache
def _unshared_ownership() -> tuple[int, int, int]:
    """The counts `is_sole_reference` sees for a tensor held by one local variable (measured, not assumed: they
    differ between Python versions)."""
    probe = torch.empty(1)
    return _probe_ownership(probe)


def _probe_ownership(tensor: torch.Tensor) -> tuple[int, int, int]:
    return _ownership(tensor)  # the same call depth as in is_sole_reference
