"""The model API around memory states (`MemoryStateMixin`: states, snapshots, undo, per-user memories, checkpoint
memory, saves that cost what changed) and the small objects the model declares in `__init__` to keep them:
`UndoHistory`, `Snapshots`, `SparePool`, `MemoryOrigin`, `MemoryLock` (and `memory_journal.PendingUpdates`)."""

import dataclasses
import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import torch

from .atomic_io import folder_lock
from .memory_fields import FIELD_NAMES, MEMORY_BUFFERS, REQUIRED_BUFFERS, MemoryStateError
from .memory_files import (
    MEMORY_FILE,
    JournalEntry,
    append_journal_record,
    encode_journal_record,
    folder_head,
    save_memory_to_folder,
    save_model_folder,
)
from .memory_journal import PendingUpdates, journal_has_room, replay_folder_journal
from .memory_pool import is_sole_reference
from .memory_state import MemoryState, stored_content_hash
from .memory_store import LongTermStoreError, check_token_vocab
from .memory_transition import next_state
from .mplus_memory import MPlusMemory


class SparePool:
    """On the CPU, one pool that nothing references anymore (it left the undo history, or sat between two chunks of
    one inject), kept for the next update to be written into: one more resident pool, no page faults for a fresh
    one. (CUDA's caching allocator already reuses freed blocks.)"""

    def __init__(self):
        self.pool: torch.Tensor | None = None

    @staticmethod
    def accepts(pool: torch.Tensor, enabled: bool) -> bool:
        """Whether `pool`, once nobody references it, may be kept (check `is_sole_reference` inline after this)."""
        return enabled and pool.device.type == "cpu"

    def keep(self, pool: torch.Tensor) -> None:
        self.pool = pool

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """The kept pool if it fits a pool like `like` (it is handed over: kept no longer)."""
        spare, self.pool = self.pool, None
        layout = (like.shape, like.dtype, like.device)
        return spare if spare is not None and (spare.shape, spare.dtype, spare.device) == layout else None

    def clear(self) -> None:
        self.pool = None


class UndoHistory:
    """The memories before the last injections, newest last: (state before, the pool written after, its version)."""

    def __init__(self):
        self.entries: deque = deque()

    def record(self, before: MemoryState, after: torch.Tensor, depth: int, spare: SparePool, recycle: bool) -> None:
        """After a successful write (`after`: the new pool): keep `before`, at most `depth` entries; a pool leaving
        the history that nothing else references becomes the spare."""
        if depth <= 0:
            return
        self.entries.append((before, after, after._version))
        del before, after
        while len(self.entries) > depth:
            pool = self.entries.popleft()[0].memory
            if spare.accepts(pool, recycle) and is_sole_reference(pool):  # inline: see is_sole_reference
                spare.keep(pool)
            del pool

    def pop(self, current: torch.Tensor, depth: int) -> MemoryState:
        """The state before the last injection, if `current` is still the pool that injection wrote."""
        if not self.entries:
            raise ValueError(f"nothing to undo: no inject since loading or since the last undo (undo_depth={depth})")
        before, after, version = self.entries[-1]
        if after is not current or current._version != version:
            self.entries.clear()
            raise ValueError("the memory was replaced since the last inject; there is nothing to undo")
        self.entries.pop()
        return before

    def swap(self, entries: deque | None = None) -> deque:
        """Install `entries` (default: an empty history) and return the previous ones (see `use_memory`)."""
        previous, self.entries = self.entries, deque() if entries is None else entries
        return previous


class Snapshots:
    """Named memory states taken with `model.snapshot(name)`."""

    def __init__(self):
        self.states: dict[str, MemoryState] = {}

    def view(self) -> Mapping[str, MemoryState]:
        return MappingProxyType(self.states)

    def put(self, name: str, state: MemoryState) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"snapshot names must be non-empty strings, got {name!r}")
        self.states[name] = state

    def get(self, name: str) -> MemoryState:
        if name not in self.states:
            known = ", ".join(sorted(self.states)) or "none"
            raise KeyError(f"no snapshot named {name!r} (snapshots: {known})")
        return self.states[name]


class MemoryOrigin:
    """The folder the model's memory was last loaded from or saved to, and that folder's head then (the content
    hash of its pool file, or of its newest journal record: `memory_files.folder_head`): a save into that folder
    refuses to overwrite a memory another process saved there since."""

    def __init__(self):
        self.folder: str | None = None
        self.content_hash: str | None = None

    def record(self, folder, content_hash: str) -> None:
        self.folder, self.content_hash = os.path.realpath(folder), content_hash

    def expected_hash(self, folder, overwrite: bool) -> str | None:
        """The hash the memory in `folder` must still have before a save (None: no check)."""
        same = self.folder is not None and self.folder == os.path.realpath(folder) and not overwrite
        return self.content_hash if same else None


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


def landed_save(model, folder, head: str, write) -> None:
    """Run `write` (a save of `model`'s memory whose folder head will be `head`) and record the folder as the
    memory's origin. A save that raised after its last rename (the new memory is on disk) counts as done; any other
    failure says what to do."""
    pool = model.memory
    try:
        write()
    except OSError as err:
        if folder_head(folder, MemoryState) != head:
            raise type(err)(
                err.errno, f"{err.strerror or err}: the memory could not be saved into {folder}. The memory saved "
                "there is unchanged and this model keeps its memory: make the folder writable (or free space) and "
                "save again, or save to another folder"
            ) from err
    model.pending_updates.reset(pool)
    model.memory_origin.record(folder, head)


class MemoryStateMixin:
    """Memory-state API of MemoryLlama: states, snapshots, undo and per-user memories (relies on the model's
    `live_memory_state` / `swap_memory_state` and `memory_lock`, and on the objects it declares: `undo_history`,
    `memory_snapshots`, `spare_pool`, `memory_origin`, `pending_updates`)."""

    # How many injections `undo()` can take back; each step keeps one old pool alive (0 turns undo off).
    undo_depth: int = 1
    # Keep one unreferenced CPU pool and write the next update into it (see `SparePool`).
    recycle_pools: bool = True
    undo_history: UndoHistory
    memory_snapshots: Snapshots
    spare_pool: SparePool
    memory_origin: MemoryOrigin
    pending_updates: PendingUpdates

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
        with self.memory_lock:
            return super().state_dict(*args, **kwargs)

    def memory_state(self) -> MemoryState:
        """A copy of the current memory (pool, fill level, injections, drop RNG, this model's fingerprint);
        `load_memory_state` restores it exactly, including which slots the next injection drops."""
        with self.memory_lock:
            state = self.live_memory_state().clone()
            index = self.reads["retrieve"].scoring.index_file(state.long_term)  # (derived: saved beside the store)
        return dataclasses.replace(
            state, fingerprint=self.memory_fingerprint(), num_update_tokens=self.config.num_update_tokens,
            retrieval_index=index,
        )

    def load_memory_state(self, state: MemoryState, allow_other_model: bool = False) -> None:
        """Replace the memory by a copy of `state`. Refuses (changing nothing) a state that is broken or belongs to
        another model: wrong pool shape, other K, other fingerprint, NaN/inf. `allow_other_model=True` accepts
        another model's memory of the same shape and K (its slots then mean something else to this model)."""
        self.check_compatible(state, allow_other_model)
        with self.memory_lock:
            self.swap_memory_state(state.clone())
            self.reads["retrieve"].scoring.adopt(state.retrieval_index, "the memory state", self.long_term_memory)

    def set_memory_state(self, state: MemoryState, validate: bool = True) -> None:
        """Make `state` the memory, as it is (no copy: the caller hands it over and must not edit its tensors). For
        tooling that swaps many states of this model in and out (the evaluation replay); `validate=False` skips the
        full check (shapes, finiteness) on a hot path whose states come from this model. Use `load_memory_state`
        for states from elsewhere."""
        if validate:
            self.check_compatible(state)
        elif tuple(state.memory.shape) != tuple(self.memory.shape):
            raise MemoryStateError(f"memory state has shape {tuple(state.memory.shape)}, this model's pool is "
                                   f"{tuple(self.memory.shape)}")
        self.swap_memory_state(state)

    def check_compatible(self, state: MemoryState, allow_other_model: bool = False) -> None:
        """Raise MemoryStateError unless `state` is valid and fits this model (shape, K, fingerprint, vocabulary of
        the stored token ids)."""
        state.validate()
        try:
            if not isinstance(state.long_term, MPlusMemory):  # (an M+ memory keeps no token ids)
                check_token_vocab(state.long_term, self.config.vocab_size)
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None
        if tuple(state.memory.shape) != tuple(self.memory.shape):
            raise MemoryStateError(
                f"memory state has shape {tuple(state.memory.shape)}, this model's pool is {tuple(self.memory.shape)}"
            )
        mplus = isinstance(state.long_term, MPlusMemory)
        if mplus != self.is_mplus:
            raise MemoryStateError(
                "an M+ model's memory needs its M+ long-term memory (MPlusMemory), other models a block store: this "
                "state belongs to another kind of model"
            )
        if mplus and state.long_term.pending_keys.shape[2] != self.config.retriever_size:
            raise MemoryStateError(
                f"the state's M+ keys are {state.long_term.pending_keys.shape[2]} wide, this model's retriever "
                f"{self.config.retriever_size}: it belongs to another model"
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
    def save_memory_folder(
        self, folder, save_weights, state_dict: dict, long_term: tuple, overwrite: bool, retrieval_index=None
    ) -> None:
        """`save_pretrained`'s folder update: pops the memory buffers out of `state_dict` (taken under the memory
        lock) as this model's memory; crash-safe, locked, and refusing to overwrite a memory that another process
        saved since this model loaded it from that folder (unless `overwrite`). `save_weights(staging, state_dict)`
        writes the rest."""
        buffers = {name: state_dict.pop(name) for name in MEMORY_BUFFERS if name in state_dict}
        state = MemoryState.from_buffers(
            buffers,
            fingerprint=self.memory_fingerprint(),
            num_update_tokens=self.config.num_update_tokens,
            long_term=long_term,
            retrieval_index=retrieval_index,
        )
        expected = self.memory_origin.expected_hash(folder, overwrite)
        save_model_folder(folder, lambda staging: save_weights(staging, state_dict), state, expected_hash=expected)
        self.memory_origin.record(folder, state.content_hash())

    def state_after(
        self, new: torch.Tensor, generator: torch.Generator | None, out: torch.Tensor | None = None, call=None,
        token_ids: torch.Tensor | None = None,
    ) -> MemoryState:
        """The state after committing new slots [L, k, d] written from `token_ids` (next_state; M+: mplus_model)."""
        if self.is_mplus:
            return self.mplus_state_after(self.live_memory_state(), new, generator, out, call)
        return next_state(self.live_memory_state(), new, self.config, generator, out, call, token_ids=token_ids)

    def record_injections(self, entries: list[JournalEntry]) -> None:
        """After `inject` / `commit_memory_slots` (memory lock held): `entries` led to the current pool; the next
        `save_memory` into the folder the memory came from appends them to its journal. An M+ memory's writes also
        change its long-term memory (`mplus_memory`), which the journal does not record: its saves are full ones."""
        if self.is_mplus:
            return self.pending_updates.let_go()
        self.pending_updates.record(entries, self.memory, self.config.num_memory_tokens)

    def save_memory(self, folder, overwrite: bool = False, compact: bool = False) -> str:
        """Save the memory into the model folder `folder` (weights untouched; crash-safe and under the folder lock);
        returns the folder's new head. Costs what changed: when `folder` is where the memory was loaded from or last
        saved to and only injections changed it since, they are appended as one journal record (`memory_journal`);
        otherwise (undo, restore, reset, another folder, a journal at its bounds: `MAX_JOURNAL_RECORDS` records or
        the pool file's size) the pool and store files are rewritten (a compaction). Refuses
        (MemoryChangedOnDiskError, nothing written) a folder whose memory another process saved since, unless
        `overwrite=True`. `compact=True` always makes it a full save."""
        folder = os.fspath(folder)
        expected = self.memory_origin.expected_hash(folder, overwrite)
        with folder_lock(folder), self.memory_lock:
            entries = self.pending_updates.since(self.memory) if expected is not None and not compact else None
            if entries is not None and folder_head(folder, MemoryState) == expected:
                if not entries:
                    return expected
                record_bytes = sum(entry.slots.numel() * entry.slots.element_size() for entry in entries)
                if journal_has_room(folder, record_bytes):
                    record = encode_journal_record(entries, expected, self.memory_fingerprint())
                    head = record[1]["record_hash"]
                    landed_save(self, folder, head, lambda: append_journal_record(folder, record))
                    return head
            state = self.memory_state()
            head = state.content_hash()
            landed_save(self, folder, head, lambda: save_memory_to_folder(folder, state, expected))
            return head

    def replay_checkpoint_journal(self, folder) -> None:
        """After `from_pretrained` of a local folder: replay its journal onto the memory read from its pool and
        store files (refusing, with the file named, a corrupted, foreign or missing record)."""
        with self.memory_lock:
            live = self.live_memory_state()
            state, head = replay_folder_journal(folder, live, self.config, self.memory_fingerprint)
            if state.num_injections != self.num_injections:
                self.swap_memory_state(state)
            self.pending_updates.reset(self.memory)
            self.memory_origin.record(folder, head)

    def adopt_checkpoint_memory(self, memory_file: str | None, keys: set[str] | None, folder, allow_other_model):
        """After `from_pretrained`: a checkpoint without memory (`keys` empty) starts empty; a memory file is
        installed only after the full check of `MemoryState.load` (complete, finite, counters, hash) and this
        model's fingerprint check; a memory stored inside the weights (older layouts) must be complete and valid."""
        if keys is not None and not keys:  # a base model: no memory yet
            self.reset_memory()
            return
        missing = [name for name in REQUIRED_BUFFERS if keys is not None and name not in keys]
        if missing:
            raise MemoryStateError(f"the checkpoint's memory is incomplete: {missing} are missing")
        if memory_file is None or os.path.basename(memory_file) != MEMORY_FILE:
            try:
                self.live_memory_state().validate()
            except MemoryStateError as err:
                raise MemoryStateError(f"the checkpoint's memory is broken: {err}") from None
            return
        state = MemoryState.load(memory_file)
        if self.is_mplus and state.long_term == ():  # its long-term memory is in its own file (read next)
            state = dataclasses.replace(state, long_term=self.empty_long_term_memory())
        try:
            self.check_compatible(state, allow_other_model)
        except MemoryStateError as err:
            raise MemoryStateError(f"{memory_file}: {err}") from None
        self.swap_memory_state(state)
        if folder is not None:  # (the hash its metadata records, checked by the load: not computed again)
            self.memory_origin.record(folder, stored_content_hash(memory_file))

    # ------------------------------------------------------------------ snapshots
    @property
    def snapshots(self) -> Mapping[str, MemoryState]:
        """Named snapshots taken with `snapshot(name)` (read-only view)."""
        return self.memory_snapshots.view()

    def snapshot(self, name: str) -> MemoryState:
        """Keep a copy of the current memory under `name` (replacing an older snapshot of that name)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"snapshot names must be non-empty strings, got {name!r}")
        state = self.memory_state()
        self.memory_snapshots.put(name, state)
        return state

    def restore(self, name: str) -> None:
        """Bring back the memory saved by `snapshot(name)` (the snapshot stays available)."""
        self.load_memory_state(self.memory_snapshots.get(name))

    # ------------------------------------------------------------------ undo
    def undo(self) -> None:
        """Take back the last `inject` (up to `undo_depth` of them, newest first). Refuses when the memory was
        replaced since (`load_memory_state`, `restore`, `reset_memory`, an in-place edit)."""
        with self.memory_lock:
            self.swap_memory_state(self.undo_history.pop(self.memory, self.undo_depth))

    # ------------------------------------------------------------------ per-user memories
    @contextmanager
    def use_memory(self, state: MemoryState) -> Iterator[MemoryState]:
        """Serve `state` for the duration of the block (one loaded model, many users' memories).

        Injections made inside the block are written back into `state`; the previous memory and its undo history
        come back on exit, even on error. The block holds the memory lock: other threads' injections and reads
        wait until it ends, so they never see this memory.
        """
        self.check_compatible(state)
        entering = state.clone()
        with self.memory_lock:
            previous = self.live_memory_state()
            previous_history = self.undo_history.swap()
            self.swap_memory_state(entering)
            try:
                yield state
            finally:
                final = self.live_memory_state()
                for name in FIELD_NAMES:
                    setattr(state, name, getattr(final, name))
                state.long_term = final.long_term
                state.fingerprint, state.num_update_tokens = self.memory_fingerprint(), self.config.num_update_tokens
                self.swap_memory_state(previous)
                self.undo_history.swap(previous_history)
