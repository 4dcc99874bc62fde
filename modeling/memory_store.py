"""The long-term memory: every injection's slots, kept as one block per injection after they leave the pool.

The pool holds N slots per layer and forgets K random ones per injection. The long-term store keeps each injection's
slots `[L, k, d]` as one immutable block (written when the injection is made, so a block holds its slots in the order
they were written, in every layer, whatever the pool later drops), up to `long_term_memory_tokens` slots per layer;
past that bound the oldest injections leave for good. Retrieval reads (`memory_retrieval`) pick blocks from here.

A store is a tuple of blocks, oldest first. Blocks are never edited in place, so copies of a store (memory states,
snapshots, undo) share their tensors.
"""

import dataclasses
import hashlib

import torch

from .atomic_io import tensor_bytes, tensor_header, tensors_digest
from .memory_fields import all_finite, torch_dtype
from .memory_settings import check_store_dtype

# Names of the store's tensors in a safetensors file (all blocks concatenated along the slot axis).
STORE_TENSORS = ("long_term_slots", "long_term_injection", "long_term_call")
# ... and the token ids each block was written from (all blocks' ids concatenated, int32), with the number of ids of
# each block in store order (-1: none kept, e.g. a store saved before token ids were kept). Absent when no block
# has token ids.
TOKEN_TENSORS = ("long_term_token_ids", "long_term_token_counts")
# The format tag of a store's chain hash (`store_chain_hash`: the head a disk-backed store's folder records).
CHAIN_FORMAT = "memoryllm-hf/store-chain/1"


@dataclasses.dataclass(eq=False)
class MemoryBlock:
    """The slots [L, k, d] written by one injection (number `injection`, 1-based, as in `memory_written_at`), and the
    injection number of the first update of the text it belongs to (`call`: a long text is injected as several
    updates that share it)."""

    injection: int
    call: int
    slots: torch.Tensor
    # The token ids [n] (int32, CPU) the slots were written from (None when not known): lexical retrieval reads them.
    token_ids: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    # The segment file the slots are memory-mapped from (a disk-backed store), None: the slots are in RAM.
    source: str | None = dataclasses.field(default=None, repr=False)
    # Whether `validate_store` found the memory-mapped slots finite: a block mapped from a segment file is checked
    # once, so saving a store larger than RAM does not read every block again (a later change of the mapped bytes
    # fails the segment's hash at the next load); blocks in RAM are checked every time.
    checked_finite: bool = dataclasses.field(default=False, init=False, repr=False)
    # sha256 of the block's own tensors (`block_digest`), computed once: the chain hash of a disk-backed store
    # (`store_chain_hash`) then costs only its new blocks. `dataclasses.replace` gives a block without it.
    digest: str | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def num_slots(self) -> int:
        return self.slots.shape[1]


LongTermStore = tuple[MemoryBlock, ...]


class LongTermStoreError(ValueError):
    """A long-term store that must not be used (inconsistent, non-finite, or of another model's shape)."""


def bytes_per_stored_token(num_layers: int, hidden_size: int, dtype: str | torch.dtype) -> int:
    """Bytes one stored token (one slot in every layer) takes."""
    return num_layers * hidden_size * torch.empty(0, dtype=torch_dtype(dtype)).element_size()


def default_long_term_tokens(num_layers: int, hidden_size: int, dtype: str, num_update_tokens: int) -> int:
    """The default store bound of `from_base` models: about 1 GiB, a whole number of updates (at least one)."""
    tokens = (1 << 30) // bytes_per_stored_token(num_layers, hidden_size, dtype)
    return max(num_update_tokens, tokens - tokens % num_update_tokens)


def store_bound(store: LongTermStore, max_slots: int) -> LongTermStore:
    """The newest blocks of `store` that fit `max_slots` slots per layer (what `store_append` keeps)."""
    total, first = store_num_slots(store), 0
    while total > max_slots and first < len(store):
        total -= store[first].num_slots
        first += 1
    return tuple(store[first:])


def store_in_ram(store: LongTermStore) -> LongTermStore:
    """`store` with every memory-mapped block (`source`) replaced by a block holding its slots in RAM."""
    if not any(block.source for block in store):
        return store
    return tuple(
        dataclasses.replace(block, slots=block.slots.clone(), source=None) if block.source else block
        for block in store
    )


def store_num_slots(store: LongTermStore) -> int:
    """Slots per layer the store holds."""
    return sum(block.num_slots for block in store)


def store_append(store: LongTermStore, block: MemoryBlock, max_slots: int) -> LongTermStore:
    """The store with `block` appended and, while it holds more than `max_slots` slots per layer, its oldest blocks
    removed (whole injections leave, never part of one)."""
    if block.num_slots > max_slots:
        raise LongTermStoreError(
            f"an injection of {block.num_slots} slots does not fit a long-term store of {max_slots} slots per layer; "
            "raise long_term_memory_tokens to at least num_update_tokens"
        )
    return store_bound((*store, block), max_slots)


def store_to_tensors(store: LongTermStore, with_slots: bool = True) -> dict[str, torch.Tensor]:
    """Flat tensors for a file: slots [L, S, d] and, per slot, its injection and call numbers [S] (CPU);
    `with_slots=False`: all but the slots (what `store_content_hash` hashes after streaming them)."""
    if not store:
        return {}
    injection = torch.cat([torch.full((b.num_slots,), b.injection, dtype=torch.long) for b in store])
    call = torch.cat([torch.full((b.num_slots,), b.call, dtype=torch.long) for b in store])
    tensors = dict(zip(STORE_TENSORS[1:], (injection, call), strict=True))
    if with_slots:
        slots = torch.cat([block.slots.detach().cpu() for block in store], dim=1).contiguous()
        tensors = {STORE_TENSORS[0]: slots, **tensors}
    if any(block.token_ids is not None for block in store):
        ids = [block.token_ids.reshape(-1).to("cpu", torch.int32) for block in store if block.token_ids is not None]
        counts = [-1 if block.token_ids is None else block.token_ids.numel() for block in store]
        tensors.update(zip(TOKEN_TENSORS, (torch.cat(ids).contiguous(), torch.tensor(counts)), strict=True))
    return tensors


def store_from_tensors(tensors: dict[str, torch.Tensor], source: str | None = None) -> LongTermStore:
    """The store written by `store_to_tensors` (an empty store when the tensors are absent). Checks consistency.
    With `source` (the tensors are a memory map of that segment file) the blocks' slots stay views of the map."""
    present = [name for name in STORE_TENSORS if name in tensors]
    if not present:
        if any(name in tensors for name in TOKEN_TENSORS):
            raise LongTermStoreError("the long-term store has token ids but no slots: corrupted")
        return ()
    if len(present) != len(STORE_TENSORS):
        missing = sorted(set(STORE_TENSORS) - set(present))
        raise LongTermStoreError(f"the long-term store is incomplete: tensors {missing} are missing")
    slots, injection, call = (tensors[name] for name in STORE_TENSORS)
    if slots.dim() != 3 or not slots.is_floating_point():
        raise LongTermStoreError(f"long_term_slots must be a float tensor [layers, slots, hidden], got {slots.dtype} "
                                 f"{tuple(slots.shape)}")
    for name, ids in (("long_term_injection", injection), ("long_term_call", call)):
        if ids.dim() != 1 or ids.shape[0] != slots.shape[1] or ids.is_floating_point() or ids.dtype == torch.bool:
            raise LongTermStoreError(f"{name} must be an integer tensor [{slots.shape[1]}], got {ids.dtype} "
                                     f"{tuple(ids.shape)}")
    if slots.shape[1] == 0:
        return ()
    # Runs of equal injection numbers are the blocks.
    change = torch.nonzero(injection[1:] != injection[:-1]).squeeze(1) + 1
    bounds = [0, *change.tolist(), injection.shape[0]]
    store = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if bool((call[start:end] != call[start]).any()):
            raise LongTermStoreError(f"injection {int(injection[start])} has slots of different calls: corrupted")
        # in RAM each block owns its memory: an evicted block frees it (a view would keep the whole file alive)
        block = slots[:, start:end] if source is not None else slots[:, start:end].clone()
        store.append(MemoryBlock(int(injection[start]), int(call[start]), block, source=source))
    for block, ids in zip(store, store_token_ids(tensors, len(store)), strict=True):
        block.token_ids = ids
    return tuple(store)


def store_token_ids(tensors: dict[str, torch.Tensor], blocks: int) -> list[torch.Tensor | None]:
    """Each block's token ids from the file's `TOKEN_TENSORS` (all None when absent). Checks consistency."""
    present = [name for name in TOKEN_TENSORS if name in tensors]
    if not present:
        return [None] * blocks
    if len(present) != len(TOKEN_TENSORS):
        missing = sorted(set(TOKEN_TENSORS) - set(present))
        raise LongTermStoreError(f"the long-term store's token ids are incomplete: {missing} missing")
    ids, counts = (tensors[name] for name in TOKEN_TENSORS)
    for name, tensor in zip(TOKEN_TENSORS, (ids, counts), strict=True):
        if tensor.dim() != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise LongTermStoreError(f"{name} must be a 1-D integer tensor, got {tensor.dtype} {tuple(tensor.shape)}")
    if counts.shape[0] != blocks or bool((counts < -1).any()) or int(counts.clamp(min=0).sum()) != ids.shape[0]:
        raise LongTermStoreError(
            f"long_term_token_counts ({counts.shape[0]} entries, {int(counts.clamp(min=0).sum())} ids) does not match "
            f"the store's {blocks} blocks and {ids.shape[0]} token ids: corrupted"
        )
    out, start = [], 0
    for count in counts.tolist():
        out.append(None if count < 0 else ids[start : start + count].to(torch.int32).clone())
        start += max(count, 0)
    return out


def check_block_finite(block: MemoryBlock) -> None:
    """Raise LongTermStoreError when the block's slots hold NaN/inf (or no data); a memory-mapped block is checked
    once (`MemoryBlock.checked_finite`)."""
    if block.slots.is_meta or not (block.checked_finite or all_finite(block.slots)):
        raise LongTermStoreError(f"long-term block of injection {block.injection} holds NaN/inf (or no data)")
    block.checked_finite = block.source is not None


def validate_store(store: LongTermStore, num_layers: int, hidden_size: int, injections: int) -> None:
    """Raise LongTermStoreError unless the blocks fit a pool of this shape after `injections` injections: shapes,
    increasing injection numbers (each at most `injections`), calls that start at or before their injection, all
    values finite, token ids (where kept) 1-D and >= 0 (`check_token_vocab` checks them against a vocabulary)."""
    previous = 0
    for block in store:
        slots = block.slots
        if slots.dim() != 3 or tuple(slots.shape[::2]) != (num_layers, hidden_size) or not slots.is_floating_point():
            raise LongTermStoreError(
                f"long-term block of injection {block.injection} has shape {tuple(slots.shape)} ({slots.dtype}); this "
                f"model needs float slots [{num_layers}, k, {hidden_size}]: the store belongs to another model"
            )
        check_store_dtype(slots.dtype, f"long-term block of injection {block.injection}", LongTermStoreError)
        if not previous < block.injection <= injections or not 1 <= block.call <= block.injection:
            raise LongTermStoreError(
                f"long-term block numbers are inconsistent (injection {block.injection} after {previous}, call "
                f"{block.call}, {injections} injections made): the store is corrupted"
            )
        check_block_finite(block)
        ids = block.token_ids
        if ids is not None and (
            ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool
            or (ids.numel() and int(ids.min()) < 0)
        ):
            raise LongTermStoreError(
                f"long-term block of injection {block.injection} has negative token ids (or not a 1-D integer "
                "tensor): corrupted"
            )
        previous = block.injection


def check_token_vocab(store: LongTermStore, vocab_size: int) -> None:
    """Raise LongTermStoreError when a block's token ids do not fit a vocabulary of `vocab_size` tokens."""
    for block in store:
        ids = block.token_ids
        if ids is not None and ids.numel() and int(ids.max()) >= vocab_size:
            raise LongTermStoreError(
                f"long-term block of injection {block.injection} has token id {int(ids.max())}, outside this model's "
                f"vocabulary of {vocab_size}: the store belongs to another model"
            )


def store_content_hash(store: LongTermStore) -> str:
    """sha256 of the store's tensors (names, dtypes, shapes, bytes): `tensors_digest(store_to_tensors(store))`,
    streamed block by block in the same byte order (layer by layer), so a store larger than RAM (memory-mapped
    blocks) is hashed without a copy of its slots."""
    if not store or len({block.slots.dtype for block in store}) != 1:  # (mixed dtypes: the concatenation promotes)
        return tensors_digest(store_to_tensors(store))
    L, _, d = store[0].slots.shape
    digest = hashlib.sha256(tensor_header(STORE_TENSORS[0], store[0].slots.dtype, (L, store_num_slots(store), d)))
    hash_blocks(store, digest, digest_blocks=False)
    return tensors_digest(store_to_tensors(store, with_slots=False), digest)


def hash_blocks(store: LongTermStore, flat=None, digest_blocks: bool = True) -> None:
    """One pass over the blocks' slots [L, k, d], layer by layer and block by block (the byte order of the slots
    `store_to_tensors(store)` concatenates): every byte goes to `flat` (a sha256 already fed what comes before, or
    None) and, with `digest_blocks`, to the own sha256 of each block without a `digest`, which then gets it
    (`block_digest`). Without `flat` only those blocks are read."""
    pending = {}
    if digest_blocks:
        for index, block in enumerate(store):
            if block.digest is None:
                pending[index] = hashlib.sha256(tensor_header(STORE_TENSORS[0], block.slots.dtype, block.slots.shape))
    read = range(len(store)) if flat is not None else list(pending)
    for layer in range(max((store[index].slots.shape[0] for index in read), default=0)):
        for index in read:
            if layer < store[index].slots.shape[0]:
                data = tensor_bytes(store[index].slots[layer])
                if flat is not None:
                    flat.update(data)
                if index in pending:
                    pending[index].update(data)
    for index, digest in pending.items():
        block = store[index]
        block.digest = tensors_digest(store_to_tensors((block,), with_slots=False), digest)


def block_digest(block: MemoryBlock) -> str:
    """sha256 of the block's own tensors, `tensors_digest(store_to_tensors((block,)))` (its slots, injection and
    call numbers, token ids), computed once and kept on the block (`MemoryBlock.digest`)."""
    if block.digest is None:
        hash_blocks((block,))
    return block.digest


def store_chain_hash(store: LongTermStore) -> str:
    """The chain hash of a store: sha256 over `CHAIN_FORMAT` and its blocks' digests (`block_digest`), oldest
    first. Any change of a block's slots, numbers or token ids, and any block added, dropped or moved, changes it;
    it costs a read of the blocks not digested yet only (a save of a disk-backed store hashes its new blocks; a
    load digests each segment's blocks while checking the segment's hash, `store_file_digest`)."""
    hash_blocks(store)
    digest = hashlib.sha256(CHAIN_FORMAT.encode())
    for block in store:
        digest.update(f";{block.digest}".encode())
    return digest.hexdigest()


def store_file_digest(tensors: dict[str, torch.Tensor], store: LongTermStore) -> str:
    """`tensors_digest` of a store file's tensors (`STORE_TENSORS`, `TOKEN_TENSORS`; `store`: the blocks
    `store_from_tensors` made of them, views of its slots), in one pass over the slots that also gives every block
    its digest (`block_digest`): a memory-mapped file is read once for both."""
    names = [name for name in (*STORE_TENSORS, *TOKEN_TENSORS) if name in tensors]
    if STORE_TENSORS[0] not in tensors or not store:
        return tensors_digest({name: tensors[name] for name in names})
    slots = tensors[STORE_TENSORS[0]]
    digest = hashlib.sha256(tensor_header(STORE_TENSORS[0], slots.dtype, slots.shape))
    hash_blocks(store, digest)
    return tensors_digest({name: tensors[name] for name in names[1:]}, digest)
