"""Memory states: the complete, restorable content of a memory pool, and the model API around them."""

import dataclasses
import hashlib
import json
import os
import threading
import unicodedata
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open

from .memory_pool import drop_and_append, is_sole_reference, kept_slot_indices, tile_pool
from .memory_storage import (
    MEMORY_FILE,
    model_owned_files,
    read_tensor_file,
    stage_memory_files,
    tensors_digest,
    update_folder,
    write_tensor_file,
)
from .memory_store import (
    LONG_TERM_FILE,
    STORE_TENSORS,
    TOKEN_TENSORS,
    LongTermStore,
    LongTermStoreError,
    MemoryBlock,
    check_token_vocab,
    store_append,
    store_content_hash,
    store_file_metadata,
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
# Every memory file a folder can hold (the file group of each part of a memory; one today).
MEMORY_GROUP_FILES = (MEMORY_FILE, LONG_TERM_FILE)
# Metadata fields of a memory file (and of the Hub's memory_state.json) that must agree with its tensors.
_COUNTERS = ("num_hidden_layers", "num_memory_tokens", "hidden_size", "filled_slots", "injections")


class MemoryStateError(ValueError):
    """A memory state that must not be used: truncated or corrupted, non-finite, or made for another model."""


class MemoryChangedOnDiskError(MemoryStateError):
    """The memory saved in a folder changed since it was loaded (another process saved it): not overwritten."""


def is_blank_text(text: str) -> bool:
    """True for text with nothing to inject: empty, whitespace, or only invisible format characters (zero-width)."""
    return not "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip()


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
        """The metadata schema of a memory file (also the core of the Hub's `memory_state.json`): format, geometry,
        counters, K, the model fingerprint, the content hash and every tensor's dtype and shape."""
        L, N, d = self.memory.shape
        info = {
            "memory_state": STATE_FORMAT,
            "num_hidden_layers": L,
            "num_memory_tokens": N,
            "hidden_size": d,
            "dtype": str(self.memory.dtype).removeprefix("torch."),
            "filled_slots": self.num_filled_slots,
            "injections": self.num_injections,
            "num_update_tokens": self.num_update_tokens,
            "fingerprint": self.fingerprint,
            "content_hash": self.content_hash(),
            "tensors": {
                name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                for name, t in self.as_buffers().items()
            },
        }
        return {key: value for key, value in info.items() if value is not None}

    def metadata(self) -> dict[str, str]:
        """`describe()` as safetensors metadata (str -> str)."""
        return {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in self.describe().items()}

    def file_groups(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """The files this memory is saved in beside the weights: `{file name: (tensors, metadata)}`."""
        groups = {MEMORY_FILE: (self.as_buffers(), self.metadata())}
        if self.long_term:
            groups[LONG_TERM_FILE] = (store_to_tensors(self.long_term), store_file_metadata(self.long_term, self.fingerprint))
        return groups

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
        """Write a safetensors file with metadata, atomically: a crash mid-save leaves the previous file intact. A
        long-term store goes into the same file (with its own hash)."""
        self.validate()
        metadata = self.metadata()
        if self.long_term:
            metadata["long_term_hash"] = store_content_hash(self.long_term)
        write_tensor_file(os.fspath(path), {**self.as_buffers(), **store_to_tensors(self.long_term)}, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemoryState":
        """Read a memory file (`save`, a checkpoint's memory.safetensors, a snapshot) and check it completely:
        exactly the memory tensors, valid and finite, counters and shapes as its metadata says, its content hash."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no memory state file at {path}")
        try:
            tensors, metadata = read_tensor_file(path)
        except (SafetensorError, OSError) as err:
            raise MemoryStateError(f"{path} is truncated or corrupted ({err}); restore it from a backup") from err
        try:
            return cls._from_file(tensors, metadata)
        except MemoryStateError as err:
            raise MemoryStateError(f"{path}: {err}") from None

    @classmethod
    def _from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "MemoryState":
        described = "memory_state" in metadata  # older files carry only {"format": "pt"}
        required = MEMORY_BUFFERS if described else MEMORY_BUFFERS[:4]
        missing = [name for name in required if name not in tensors]
        if missing:
            raise MemoryStateError(f"not a memory state: tensors {missing} are missing")
        try:
            long_term = store_from_tensors(
                {name: tensors.pop(name) for name in STORE_TENSORS + TOKEN_TENSORS if name in tensors}
            )
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None
        if long_term and metadata.get("long_term_hash") != store_content_hash(long_term):
            raise MemoryStateError("corrupted: its long-term store differs from the hash recorded when it was saved")
        extra = sorted(set(tensors) - set(MEMORY_BUFFERS))
        if extra:
            raise MemoryStateError(f"holds tensors that are not part of a memory ({extra[:5]}); not a memory file")
        numbers = {}
        for key in ("num_update_tokens", *_COUNTERS):
            if key in metadata:
                if not metadata[key].isdigit():
                    raise MemoryStateError(f"corrupted: {key}={metadata[key]!r} in its metadata")
                numbers[key] = int(metadata[key])
        K = numbers.get("num_update_tokens")
        state = cls.from_buffers(
            tensors, fingerprint=metadata.get("fingerprint"), num_update_tokens=K, long_term=long_term
        )
        state.validate()
        if described:
            try:
                recorded = json.loads(metadata.get("tensors", "null"))
            except ValueError:
                recorded = None
            actual = state.describe()
            if recorded != actual["tensors"]:
                raise MemoryStateError(
                    f"corrupted: its tensors {actual['tensors']} differ from its metadata {recorded}"
                )
            wrong = {key: (numbers.get(key), actual[key]) for key in _COUNTERS if numbers.get(key) != actual[key]}
            if wrong:
                raise MemoryStateError(f"corrupted: metadata and tensors disagree on {wrong} (metadata, tensors)")
            if metadata.get("dtype") != actual["dtype"]:
                raise MemoryStateError(f"corrupted: dtype {metadata.get('dtype')!r} in its metadata")
        expected = metadata.get("content_hash")
        if described and expected is None:
            raise MemoryStateError("corrupted: its metadata has no content_hash")
        if expected is not None and expected != state.content_hash():
            raise MemoryStateError("corrupted: its content differs from the hash recorded when it was saved")
        return state


def stored_content_hash(path: str | os.PathLike) -> str | None:
    """Content hash of the memory file at `path` (from its metadata when recorded), None when there is none."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as handle:
            recorded = (handle.metadata() or {}).get("content_hash")
    except (SafetensorError, OSError):
        recorded = None
    return recorded or MemoryState.load(path).content_hash()


def save_memory_to_folder(folder: str | os.PathLike, state: MemoryState, expected_hash: str | None = None) -> None:
    """Replace the memory files of a model folder (weights untouched), crash-safely and under the folder lock.

    With `expected_hash`, refuses (MemoryChangedOnDiskError, nothing written) when the folder's memory is no longer
    the one with that hash: another process saved it since this memory was loaded.
    """
    state.validate()

    def write(staging: str, old: str | None) -> set[str]:
        if old is None:
            raise FileNotFoundError(f"{folder} does not exist; save the whole model with save_pretrained")
        check_unchanged(old, expected_hash)
        return stage_memory_files(staging, old, state.file_groups(), MEMORY_GROUP_FILES)

    update_folder(folder, write)


def save_model_folder(folder: str | os.PathLike, save_weights, state: MemoryState, expected_hash=None) -> None:
    """A whole model folder: `save_weights(staging)` writes weights, config and code, then the memory files; the old
    folder is swapped for the new one at the end (see `update_folder`)."""
    state.validate()

    def write(staging: str, old: str | None) -> set[str]:
        if old is not None:
            check_unchanged(old, expected_hash)
        save_weights(staging)
        return model_owned_files(old) | stage_memory_files(staging, staging, state.file_groups(), MEMORY_GROUP_FILES)

    update_folder(folder, write)


def check_unchanged(folder: str, expected_hash: str | None) -> None:
    """Raise MemoryChangedOnDiskError when `folder`'s memory is not the one with `expected_hash` (None: no check)."""
    if expected_hash is None:
        return
    found = stored_content_hash(os.path.join(folder, MEMORY_FILE))
    if found != expected_hash:
        raise MemoryChangedOnDiskError(
            f"the memory in {folder} changed since it was loaded (another process saved it): not overwritten. "
            "Load the folder again to continue from the saved memory, or save this memory to another folder"
        )


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
    dtype = getattr(torch, config.long_term_memory_dtype) if config.long_term_memory_dtype else pool_dtype
    slots = new.detach().to(device=config.long_term_memory_device or "cpu", dtype=dtype, copy=True)
    ids = None if token_ids is None else token_ids.detach().reshape(-1).to("cpu", torch.int32, copy=True)
    return store_append(long_term, MemoryBlock(number, call or number, slots, ids), bound)


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
        # Rounded to bfloat16: the same model loaded in float32, bfloat16 (or float16) keeps its fingerprint.
        for norm in [layer.input_layernorm for layer in self.model.layers] + [self.model.norm]:
            digest.update(norm.weight.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def state_dict(self, *args, **kwargs):
        """`nn.Module.state_dict`, taken under the memory lock: the memory buffers come from one memory state."""
        with self._memory_lock:
            return super().state_dict(*args, **kwargs)

    def memory_state(self) -> MemoryState:
        """A copy of the current memory (pool, fill level, injections, drop RNG, this model's fingerprint);
        `load_memory_state` restores it exactly, including which slots the next injection drops."""
        with self._memory_lock:
            state = self._current_state().clone()
        return dataclasses.replace(
            state, fingerprint=self.memory_fingerprint(), num_update_tokens=self.config.num_update_tokens
        )

    def load_memory_state(self, state: MemoryState, allow_other_model: bool = False) -> None:
        """Replace the memory by a copy of `state`. Refuses (changing nothing) a state that is broken or belongs to
        another model: wrong pool shape, other K, other fingerprint, NaN/inf. `allow_other_model=True` accepts
        another model's memory of the same shape and K (its slots then mean something else to this model)."""
        self._check_compatible(state, allow_other_model)
        with self._memory_lock:
            self._set_state(state.clone())

    def set_memory_state(self, state: MemoryState, validate: bool = True) -> None:
        """Make `state` the memory, as it is (no copy: the caller hands it over and must not edit its tensors). For
        tooling that swaps many states of this model in and out (the evaluation replay); `validate=False` skips the
        full check (shapes, finiteness) on a hot path whose states come from this model. Use `load_memory_state`
        for states from elsewhere."""
        if validate:
            self._check_compatible(state)
        elif tuple(state.memory.shape) != tuple(self.memory.shape):
            raise MemoryStateError(f"memory state has shape {tuple(state.memory.shape)}, this model's pool is "
                                   f"{tuple(self.memory.shape)}")
        self._set_state(state)

    def _check_compatible(self, state: MemoryState, allow_other_model: bool = False) -> None:
        state.validate()
        try:
            check_token_vocab(state.long_term, self.config.vocab_size)
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None
        if tuple(state.memory.shape) != tuple(self.memory.shape):
            raise MemoryStateError(
                f"memory state has shape {tuple(state.memory.shape)}, this model's pool is {tuple(self.memory.shape)}"
            )
        K = self.config.num_update_tokens
        if state.num_update_tokens is not None and state.num_update_tokens != K:
            raise MemoryStateError(f"memory state was written with K={state.num_update_tokens}, this model has K={K}")
        if not allow_other_model and state.fingerprint not in (None, self.memory_fingerprint()):
            raise MemoryStateError(
                f"memory state belongs to another model (fingerprint {state.fingerprint}, this model's is "
                f"{self.memory_fingerprint()}); load it into the model it was saved from (or pass "
                "allow_other_model=True if you really mean to)"
            )

    # ------------------------------------------------------------------ checkpoint folders
    def _memory_for_save(self, state_dict: dict, long_term: tuple = ()) -> MemoryState:
        """Pop the memory buffers out of a state dict (taken under the memory lock) as this model's memory state."""
        buffers = {name: state_dict.pop(name) for name in MEMORY_BUFFERS if name in state_dict}
        return MemoryState.from_buffers(
            buffers,
            fingerprint=self.memory_fingerprint(),
            num_update_tokens=self.config.num_update_tokens,
            long_term=long_term,
        )

    def _save_folder(self, folder, save_weights, state: MemoryState, overwrite_memory: bool) -> None:
        """`save_pretrained`'s folder update: crash-safe, locked, and refusing to overwrite a memory that another
        process saved since this model loaded it from that folder (unless `overwrite_memory`)."""
        origin = self.__dict__.get("_memory_origin")
        same = origin is not None and origin[0] == os.path.realpath(folder) and not overwrite_memory
        save_model_folder(folder, save_weights, state, expected_hash=origin[1] if same else None)
        self.__dict__["_memory_origin"] = (os.path.realpath(folder), state.content_hash())

    def _adopt_checkpoint_memory(self, memory_file: str | None, keys: set[str] | None, folder, allow_other_model):
        """After `from_pretrained`: a checkpoint without memory (`keys` empty) starts empty; a memory file is
        installed only after the full check of `MemoryState.load` (complete, finite, counters, hash) and this
        model's fingerprint check; a memory stored inside the weights (older layouts) must be complete and valid."""
        if keys is not None and not keys:  # a base model: no memory yet
            self.reset_memory()
            return
        missing = [name for name in MEMORY_BUFFERS[:4] if keys is not None and name not in keys]
        if missing:
            raise MemoryStateError(f"the checkpoint's memory is incomplete: {missing} are missing")
        if memory_file is None or os.path.basename(memory_file) != MEMORY_FILE:
            try:
                self._current_state().validate()
            except MemoryStateError as err:
                raise MemoryStateError(f"the checkpoint's memory is broken: {err}") from None
            return
        state = MemoryState.load(memory_file)
        try:
            self._check_compatible(state, allow_other_model)
        except MemoryStateError as err:
            raise MemoryStateError(f"{memory_file}: {err}") from None
        self._set_state(state)
        if folder is not None:
            self.__dict__["_memory_origin"] = (os.path.realpath(folder), state.content_hash())

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
                state.long_term = final.long_term
                state.fingerprint, state.num_update_tokens = self.memory_fingerprint(), self.config.num_update_tokens
                self._set_state(previous)
                self.__dict__["_undo_history"] = previous_history if previous_history is not None else deque()
