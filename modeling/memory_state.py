"""The memory state value: the complete, restorable content of a memory pool (its fields are `memory_fields`'
table) and its validation. Its file layout is `memory_files`; how an injection changes it is `memory_transition`;
the model API around states is `memory_state_api`."""

import dataclasses
import os
from collections.abc import Mapping

import torch

from .atomic_io import tensors_digest
from .memory_fields import (
    FIELD_NAMES,
    MEMORY_BUFFERS,
    MEMORY_FIELDS,
    RNG_STATE_BYTES,
    MemoryChangedOnDiskError,
    MemoryStateError,
    all_finite,
    config_geometry,
    fresh_tensors,
    seeded_rng_state,
)
from .memory_files import describe_state, read_state_file, recorded_content_hash, state_metadata, write_state_file
from .memory_store import LongTermStore, LongTermStoreError, store_num_slots, validate_store
from .mplus_memory import MPlusMemory, MPlusMemoryError, empty_long_term

__all__ = [
    "MEMORY_BUFFERS",
    "MemoryChangedOnDiskError",
    "MemoryState",
    "MemoryStateError",
    "seeded_rng_state",
    "stored_content_hash",
]


@dataclasses.dataclass
class MemoryState:
    """A complete memory: the pool [L, N, d], how many slots (at its end) hold memories, injections so far, the
    state of the generator that picks dropped slots, the long-term store (one block per injection, see
    `memory_store`), and (when taken from a model) that model's fingerprint and K."""

    memory: torch.Tensor
    filled: torch.Tensor
    injections: torch.Tensor
    rng_state: torch.Tensor
    written_at: torch.Tensor | None = None  # [L, N]: the injection (1, 2, ...) that wrote each slot; 0 = unknown
    fingerprint: str | None = None
    num_update_tokens: int | None = None
    long_term: LongTermStore | MPlusMemory = ()  # the block store, or an M+ model's long-term memory
    # The retrieval index of the store's blocks ((tensors, metadata), `memory_scoring`; None: none): derived data,
    # saved beside the store so a load need not index it again; checked block by block when used, never hashed.
    retrieval_index: tuple | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for field in MEMORY_FIELDS:  # a field absent from an older file gets its fresh value
            if getattr(self, field.name) is None:
                fresh = field.fresh(tuple(self.memory.shape), self.memory.dtype, 0)
                setattr(self, field.name, fresh.to(self.memory.device))
        if not isinstance(self.long_term, MPlusMemory):
            self.long_term = tuple(self.long_term)

    def __repr__(self) -> str:
        L, N, d = self.memory.shape
        store = ""
        if isinstance(self.long_term, MPlusMemory):
            store = f", long_term={self.long_term!r}"
        elif self.long_term:
            store = f", long_term={len(self.long_term)} injections/{store_num_slots(self.long_term)} slots"
        return (
            f"MemoryState({L}x{N}x{d} {str(self.memory.dtype).removeprefix('torch.')}, filled={self.num_filled_slots}, "
            f"injections={self.num_injections}, K={self.num_update_tokens}, fingerprint={self.fingerprint}{store})"
        )

    @classmethod
    def empty(cls, config, seed: int | None = None, dtype: torch.dtype | None = None, device=None) -> "MemoryState":
        """The empty memory of a model with `config` (what `reset_memory(seed)` installs): a zero pool in `dtype`
        (default float32), no filled slots, no injections, the generator seeded with `seed` (default
        `config.memory_seed`), no long-term store."""
        seed = config.memory_seed if seed is None else seed
        tensors = fresh_tensors(config_geometry(config), dtype or torch.float32, seed)
        if device is not None:
            tensors = {name: t.to(device) for name, t in tensors.items()}
        long_term = empty_long_term(config, dtype or torch.float32)
        return cls(**tensors, num_update_tokens=config.num_update_tokens, long_term=long_term)

    def as_buffers(self) -> dict[str, torch.Tensor]:
        """`{model buffer name: tensor}` of the saved fields (`memory_fields.MEMORY_FIELDS`)."""
        return {field.buffer: getattr(self, field.name) for field in MEMORY_FIELDS if field.saved}

    @classmethod
    def from_buffers(cls, buffers: Mapping[str, torch.Tensor], **info) -> "MemoryState":
        """A state from `{buffer name: tensor}`; a field that is not required may be absent (older files)."""
        return cls(**{field.name: buffers.get(field.buffer) for field in MEMORY_FIELDS}, **info)

    def clone(self) -> "MemoryState":
        """A copy that shares nothing mutable (long-term blocks are immutable and are shared)."""
        return dataclasses.replace(self, **{f: getattr(self, f).detach().clone() for f in FIELD_NAMES})

    @property
    def num_slots(self) -> int:
        """N, slots per layer."""
        return self.memory.shape[1]

    @property
    def num_filled_slots(self) -> int:
        return int(self.filled)

    @property
    def num_injections(self) -> int:
        return int(self.injections)

    def content_hash(self) -> str:
        """sha256 of the pool's tensors (names, dtypes, shapes and bytes): equal hashes mean identical pools (the
        long-term store has its own, `store_content_hash`)."""
        return tensors_digest(self.as_buffers())

    def describe(self) -> dict:
        """The metadata schema of a memory file (`memory_files.describe_state`)."""
        return describe_state(self)

    def metadata(self) -> dict[str, str]:
        """`describe()` as safetensors metadata (str -> str)."""
        return state_metadata(self)

    def validate(self) -> None:
        """Raise MemoryStateError unless the tensors form a usable memory (shapes, dtypes, ranges, all finite)."""
        memory, filled, injections, rng = self.memory, self.filled, self.injections, self.rng_state
        if any(t.is_meta for t in (memory, filled, injections, rng)):
            raise MemoryStateError("memory state tensors are on the meta device (they hold no data)")
        if memory.dim() != 3 or not memory.is_floating_point():
            raise MemoryStateError(
                f"memory must be a floating-point tensor [layers, slots, hidden], got {memory.dtype} "
                f"of shape {tuple(memory.shape)}"
            )
        for name, tensor in (("filled", filled), ("injections", injections)):
            if tensor.dim() != 0 or tensor.is_floating_point() or tensor.dtype == torch.bool:
                raise MemoryStateError(f"{name} must be an integer scalar, got {tensor.dtype} {tuple(tensor.shape)}")
        if not 0 <= int(filled) <= memory.shape[1]:
            raise MemoryStateError(f"filled={int(filled)} is outside [0, {memory.shape[1]}], the pool's slot count")
        if int(injections) < 0:
            raise MemoryStateError(f"injections={int(injections)} is negative")
        written = self.written_at
        if tuple(written.shape) != tuple(memory.shape[:2]) or written.is_floating_point():
            raise MemoryStateError(f"written_at must be an integer tensor {tuple(memory.shape[:2])}")
        empty = memory.shape[1] - int(filled)
        if written.numel() and (int(written.max()) > int(injections) or bool(written[:, :empty].any())):
            raise MemoryStateError(
                f"written_at disagrees with the counters (slots written after injection {int(injections)}, or in "
                f"the {empty} empty slots): a torn or corrupted memory"
            )
        if rng.dtype != torch.uint8 or tuple(rng.shape) != (RNG_STATE_BYTES,):
            raise MemoryStateError(
                f"rng_state must be a CPU generator state (uint8[{RNG_STATE_BYTES}]), "
                f"got {rng.dtype} {tuple(rng.shape)}"
            )
        if not all_finite(memory):
            bad = int((~torch.isfinite(memory)).sum())
            raise MemoryStateError(f"memory holds {bad} NaN/inf values; refusing to use it")
        try:
            if isinstance(self.long_term, MPlusMemory):
                self.long_term.validate(*memory.shape, self.long_term.pending_keys.shape[2])
            else:
                validate_store(self.long_term, memory.shape[0], memory.shape[2], int(injections))
        except (LongTermStoreError, MPlusMemoryError) as err:
            raise MemoryStateError(str(err)) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with metadata, atomically: a crash mid-save leaves the previous file intact. A
        long-term store goes into the same file (with its own hash)."""
        write_state_file(path, self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemoryState":
        """Read a memory file (`save`, a checkpoint's memory.safetensors, a snapshot) and check it completely:
        exactly the memory tensors, valid and finite, counters and shapes as its metadata says, its content hash."""
        return read_state_file(path, cls)


def stored_content_hash(path: str | os.PathLike) -> str | None:
    """Content hash of the memory file at `path` (from its metadata when recorded), None when there is none."""
    return recorded_content_hash(path, MemoryState)
