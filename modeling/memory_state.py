"""Memory states: the complete, restorable content of a memory pool, and the model API around them."""

import dataclasses
import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .memory_pool import drop_and_append, is_sole_reference, kept_slot_indices, tile_pool
from .memory_storage import atomic_write
from .memory_store import (
    LongTermStore,
    LongTermStoreError,
    MemoryBlock,
    store_append,
    store_from_tensors,
    store_num_slots,
    store_to_tensors,
    validate_store,
)

# Buffers that make up a memory state; they are saved together in their own safetensors file.
MEMORY_BUFFERS = ("memory", "memory_filled", "memory_injections", "memory_rng_state", "memory_written_at")
STATE_FORMAT = "memoryllm-hf/memory-state/1"
_TENSOR_FIELDS = ("memory", "filled", "injections", "rng_state", "written_at")
_RNG_STATE_BYTES = torch.Generator().get_state().numel()


class MemoryStateError(ValueError):
    """A memory state that must not be used: truncated or corrupted, non-finite, or made for another model."""


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
    long_term: LongTermStore = ()

    def __post_init__(self) -> None:
        if self.written_at is None:
            self.written_at = torch.zeros(self.memory.shape[:2], dtype=torch.long, device=self.memory.device)
        self.long_term = tuple(self.long_term)

    def __repr__(self) -> str:
        L, N, d = self.memory.shape
        store = f", long_term={len(self.long_term)} injections/{store_num_slots(self.long_term)} slots" if self.long_term else ""
        return (
            f"MemoryState({L}x{N}x{d} {str(self.memory.dtype).removeprefix('torch.')}, filled={self.num_filled_slots}, "
            f"injections={self.num_injections}, K={self.num_update_tokens}, fingerprint={self.fingerprint}{store})"
        )

    def as_buffers(self) -> dict[str, torch.Tensor]:
        tensors = (self.memory, self.filled, self.injections, self.rng_state, self.written_at)
        return dict(zip(MEMORY_BUFFERS, tensors, strict=True))

    @classmethod
    def from_buffers(cls, buffers: Mapping[str, torch.Tensor], **info) -> "MemoryState":
        return cls(*(buffers.get(name) for name in MEMORY_BUFFERS), **info)  # written_at may be absent (older files)

    def clone(self) -> "MemoryState":
        """A copy that shares nothing mutable (long-term blocks are immutable and are shared)."""
        return dataclasses.replace(self, **{f: getattr(self, f).detach().clone() for f in _TENSOR_FIELDS})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by file name: the pool buffers and the long-term store's (when not empty)."""
        return {**self.as_buffers(), **store_to_tensors(self.long_term)}

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
        """sha256 of the tensors (names, dtypes, shapes and bytes), long-term store included: equal hashes mean
        identical memories."""
        digest = hashlib.sha256()
        for name, tensor in self.tensors().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def metadata(self) -> dict[str, str]:
        """What `save` writes beside the tensors (safetensors metadata is str -> str)."""
        L, N, d = self.memory.shape
        info = {
            "format": "pt",
            "memory_state": STATE_FORMAT,
            "num_layers": L,
            "num_memory_tokens": N,
            "hidden_size": d,
            "dtype": str(self.memory.dtype).removeprefix("torch."),
            "filled": self.num_filled_slots,
            "injections": self.num_injections,
            "content_hash": self.content_hash(),
            "num_update_tokens": self.num_update_tokens,
            "fingerprint": self.fingerprint,
        }
        return {key: str(value) for key, value in info.items() if value is not None}

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
        if rng.dtype != torch.uint8 or tuple(rng.shape) != (_RNG_STATE_BYTES,):
            raise MemoryStateError(
                f"rng_state must be a CPU generator state (uint8[{_RNG_STATE_BYTES}]), "
                f"got {rng.dtype} {tuple(rng.shape)}"
            )
        if not bool(torch.isfinite(memory).all()):
            bad = int((~torch.isfinite(memory)).sum())
            raise MemoryStateError(f"memory holds {bad} NaN/inf values; refusing to use it")
        try:
            validate_store(self.long_term, memory.shape[0], memory.shape[2], int(injections))
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with metadata, atomically: a crash mid-save leaves the previous file intact."""
        self.validate()
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors().items()}
        metadata = self.metadata()
        atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemoryState":
        """Read a file written by `save` (or a checkpoint's memory.safetensors); checks it completely first."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no memory state file at {path}")
        try:
            with safe_open(path, "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise MemoryStateError(f"{path} is truncated or corrupted ({err}); restore it from a backup") from err
        missing = [name for name in MEMORY_BUFFERS[:4] if name not in tensors]
        if missing:
            raise MemoryStateError(f"{path} is not a memory state: tensors {missing} are missing")
        K = metadata.get("num_update_tokens")
        if K is not None and not K.isdigit():
            raise MemoryStateError(f"{path} is corrupted: num_update_tokens={K!r} in its metadata")
        try:
            state = cls.from_buffers(
                tensors,
                fingerprint=metadata.get("fingerprint"),
                num_update_tokens=int(K) if K is not None else None,
                long_term=store_from_tensors(tensors),
            )
            state.validate()
        except (MemoryStateError, LongTermStoreError) as err:
            raise MemoryStateError(f"{path}: {err}") from None
        expected = metadata.get("content_hash")
        if expected is not None and expected != state.content_hash():
            raise MemoryStateError(f"{path} is corrupted: its content differs from the hash recorded when it was saved")
        return state


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
    dtype = getattr(torch, config.long_term_memory_dtype) if config.long_term_memory_dtype else pool_dtype
    slots = new.detach().to(device=config.long_term_memory_device or "cpu", dtype=dtype, copy=True)
    return store_append(long_term, MemoryBlock(number, call or number, slots), bound)


def seeded_rng_state(seed: int) -> torch.Tensor:
    """State of a fresh CPU generator seeded with `seed` (what a new pool starts from)."""
    return torch.Generator().manual_seed(seed).get_state()


class MemoryLock:
    """A re-entrant lock around memory updates; copies and pickles as a fresh lock (models stay deep-copyable)."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self) -> "MemoryLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo) -> "MemoryLock":
        return MemoryLock()

    def __reduce__(self):
        return (MemoryLock, ())


class MemoryStateMixin:
    """Memory-state API of MemoryLlama: states, snapshots, undo and per-user memories (relies on the model's
    `_current_state` / `_set_state` and `_memory_lock`)."""

    # How many injections `undo()` can take back; each step keeps one old pool alive (0 turns undo off).
    undo_depth: int = 1
    # On the CPU, keep one pool that nothing references anymore (it left the undo history, or sat between two chunks
    # of one inject) and write the next update into it: one more resident pool, no page faults for a fresh one.
    # (CUDA's caching allocator already reuses freed blocks.)
    recycle_pools: bool = True
    _spare_pool: torch.Tensor | None = None

    def memory_fingerprint(self) -> str:
        """Identifies the model a memory belongs to: the pool geometry, the update rule and a digest of the frozen
        norm weights (cheap to compute; differs between base models, survives LoRA training)."""
        cfg = self.config
        digest = hashlib.sha256(
            repr(
                (
                    cfg.num_hidden_layers,
                    cfg.num_memory_tokens,
                    cfg.hidden_size,
                    cfg.num_update_tokens,
                    cfg.vocab_size,
                    cfg.memory_update,
                    cfg.add_bos_embedding,
                )
            ).encode()
        )
        for layer in self.model.layers:
            digest.update(layer.input_layernorm.weight.detach().float().cpu().numpy().tobytes())
        digest.update(self.model.norm.weight.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def memory_state(self) -> MemoryState:
        """A copy of the current memory (pool, fill level, injections, drop RNG, this model's fingerprint);
        `load_memory_state` restores it exactly, including which slots the next injection drops."""
        with self._memory_lock:
            state = self._current_state().clone()
        return dataclasses.replace(
            state, fingerprint=self.memory_fingerprint(), num_update_tokens=self.config.num_update_tokens
        )

    def load_memory_state(self, state: MemoryState) -> None:
        """Replace the memory by a copy of `state`. Refuses (changing nothing) a state that is broken or belongs to
        another model: wrong pool shape, other K, other fingerprint, NaN/inf."""
        self._check_compatible(state)
        with self._memory_lock:
            self._set_state(state.clone())

    def _check_compatible(self, state: MemoryState) -> None:
        state.validate()
        if tuple(state.memory.shape) != tuple(self.memory.shape):
            raise MemoryStateError(
                f"memory state has shape {tuple(state.memory.shape)}, this model's pool is {tuple(self.memory.shape)}"
            )
        K = self.config.num_update_tokens
        if state.num_update_tokens is not None and state.num_update_tokens != K:
            raise MemoryStateError(f"memory state was written with K={state.num_update_tokens}, this model has K={K}")
        if state.fingerprint is not None and state.fingerprint != self.memory_fingerprint():
            raise MemoryStateError(
                f"memory state belongs to another model (fingerprint {state.fingerprint}, this model's is "
                f"{self.memory_fingerprint()}); load it into the model it was saved from"
            )

    # ------------------------------------------------------------------ snapshots
    @property
    def snapshots(self) -> Mapping[str, MemoryState]:
        """Named snapshots taken with `snapshot(name)` (read-only view)."""
        return MappingProxyType(self.__dict__.setdefault("_memory_snapshots", {}))

    def snapshot(self, name: str) -> MemoryState:
        """Keep a copy of the current memory under `name` (replacing an older snapshot of that name)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"snapshot names must be non-empty strings, got {name!r}")
        state = self.memory_state()
        self.__dict__.setdefault("_memory_snapshots", {})[name] = state
        return state

    def restore(self, name: str) -> None:
        """Bring back the memory saved by `snapshot(name)` (the snapshot stays available)."""
        if name not in self.snapshots:
            known = ", ".join(sorted(self.snapshots)) or "none"
            raise KeyError(f"no snapshot named {name!r} (snapshots: {known})")
        self.load_memory_state(self.snapshots[name])

    # ------------------------------------------------------------------ undo
    def _remember_undo(self, before: MemoryState) -> None:
        """Called by `inject`, under the memory lock, after a successful write; `before` is the state it replaced."""
        if self.undo_depth <= 0:
            return
        history = self.__dict__.setdefault("_undo_history", deque())
        history.append((before, self.memory, self.memory._version))
        del before
        while len(history) > self.undo_depth:
            pool = history.popleft()[0].memory
            if self._recycles(pool) and is_sole_reference(pool):  # inline: see is_sole_reference
                self._spare_pool = pool
            del pool

    def _recycles(self, pool: torch.Tensor) -> bool:
        """Whether a pool that nobody references may be kept as the spare (see `recycle_pools`)."""
        return self.recycle_pools and pool.device.type == "cpu"

    def _take_spare_pool(self) -> torch.Tensor | None:
        """The recycled pool for the next update, if there is one that fits the current pool."""
        spare, self._spare_pool = self._spare_pool, None
        layout = (self.memory.shape, self.memory.dtype, self.memory.device)
        return spare if spare is not None and (spare.shape, spare.dtype, spare.device) == layout else None

    def undo(self) -> None:
        """Take back the last `inject` (up to `undo_depth` of them, newest first). Refuses when the memory was
        replaced since (`load_memory_state`, `restore`, `reset_memory`, an in-place edit)."""
        with self._memory_lock:
            history = self.__dict__.setdefault("_undo_history", deque())
            if not history:
                raise ValueError(
                    f"nothing to undo: no inject since loading or since the last undo (undo_depth={self.undo_depth})"
                )
            before, after, version = history[-1]
            if after is not self.memory or self.memory._version != version:
                history.clear()
                raise ValueError("the memory was replaced since the last inject; there is nothing to undo")
            history.pop()
            self._set_state(before)

    # ------------------------------------------------------------------ per-user memories
    @contextmanager
    def use_memory(self, state: MemoryState) -> Iterator[MemoryState]:
        """Serve `state` for the duration of the block (one loaded model, many users' memories).

        Injections made inside the block are written back into `state`; the previous memory and its undo history
        come back on exit, even on error. The block holds the memory lock: other threads' injections and reads
        wait until it ends, so they never see this memory.
        """
        self._check_compatible(state)
        entering = state.clone()
        with self._memory_lock:
            previous = self._current_state()
            previous_history = self.__dict__.pop("_undo_history", None)
            self._set_state(entering)
            try:
                yield state
            finally:
                final = self._current_state()
                for name in _TENSOR_FIELDS:
                    setattr(state, name, getattr(final, name))
                state.fingerprint, state.num_update_tokens = self.memory_fingerprint(), self.config.num_update_tokens
                self._set_state(previous)
                self.__dict__["_undo_history"] = previous_history if previous_history is not None else deque()
