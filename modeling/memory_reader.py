"""Retrieval reads: which stored injections each row of a batch reads, and the rows' prefixes side by side.

`read_mode="retrieve"` replaces the pool read `[bos; pool]` by `[bos; the slots of the injections that score best
against the prompt, in the order they were written]`. The scores come from `memory_retrieval`; this file turns them
into a choice per row (`select_injections`) and stacks rows whose prefixes differ in length into one left-padded
cache (`stack_prefixes`): a row's padding columns are masked out, so a batch reads exactly what its rows read alone.
"""

import torch

from .memory_prefix import PrefixKV


def select_injections(
    scores: torch.Tensor,
    sizes: list[int],
    calls: list[int],
    budget: int,
    threshold: float | None = None,
    neighbors: int = 0,
) -> list[int]:
    """Indices (ascending, i.e. in the order written) of the blocks one row reads.

    Blocks are taken best score first while their slots fit the `budget`; a block scoring below `threshold` is never
    taken. With `neighbors` > 0, after each taken block the `neighbors` blocks before and after it that belong to the
    same `inject()` call are taken too, nearest first, while they fit (a long text injected in one call is several
    blocks). Ties are broken by recency (the newer block first), so the choice is deterministic.
    """
    count = len(sizes)
    if scores.shape != (count,):
        raise ValueError(f"need one score per block: {tuple(scores.shape)} scores for {count} blocks")
    order = sorted(range(count), key=lambda i: (-float(scores[i]), -i))
    chosen: set[int] = set()
    used = 0

    def take(index: int) -> None:
        nonlocal used
        if index not in chosen and used + sizes[index] <= budget:
            chosen.add(index)
            used += sizes[index]

    for index in order:
        if threshold is not None and float(scores[index]) < threshold:
            break
        if index in chosen:
            continue
        take(index)
        if index not in chosen:
            continue
        for step in range(1, neighbors + 1):
            for other in (index - step, index + step):
                if 0 <= other < count and calls[other] == calls[index]:
                    take(other)
        if used >= budget:
            break
    return sorted(chosen)


def stack_prefixes(rows: list[PrefixKV]) -> tuple[PrefixKV, torch.Tensor]:
    """Per-layer keys/values [B, kv_heads, P, head_dim] of rows whose prefixes ([1, kv_heads, P_b, head_dim] each)
    differ in length, left-padded with zeros to the longest, and the mask [B, P] of the real prefix columns."""
    lengths = [row[0][0].shape[2] for row in rows]
    longest = max(lengths)
    reference = rows[0][0][0]
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=reference.device)
    for index, length in enumerate(lengths):
        mask[index, longest - length :] = 1
    stacked = []
    for layer in range(len(rows[0])):
        keys, values = [], []
        for row, length in zip(rows, lengths, strict=True):
            k, v = row[layer]
            if length < longest:
                pad = (0, 0, longest - length, 0)
                k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
            keys.append(k)
            values.append(v)
        stacked.append((torch.cat(keys).contiguous(), torch.cat(values).contiguous()))
    return stacked, mask
