"""Saves that cost what changed: the memory journal of a checkpoint folder.

A memory save into the folder the memory was loaded from (or last saved to) appends one journal record holding the
injections made since (their new slots as committed, call numbers, external generator states: a few MB for a
sentence) instead of rewriting the pool and store files (hundreds of MB). Loading replays the records onto the pool
and store files with the one state transition (`memory_transition.replay`), bit-exactly. Every `MAX_JOURNAL_RECORDS`
records, and whenever the memory did not change by injections alone (undo, reset, a state loaded from elsewhere),
the save is a full one instead (a compaction: the pool and store files are rewritten and the journal dropped, by a
folder swap).

Crash safety: a record is one file written atomically (fsynced temp file, rename, fsynced directory) under the
folder lock, chained by hash to the head it extends (`memory_files.folder_head`); a compaction is a folder swap. A
kill at any point leaves the old memory or the new one, never a mix; a record that is corrupted, missing from the
chain or another model's is refused at load with the file named.

Where the bytes are: `memory_files` (record format, `JOURNAL_DIR`, the journal part of `MEMORY_PARTS`).
"""

import dataclasses
import os

from .atomic_io import link_tree, update_folder
from .configuration_memory_llama import MemoryLlamaConfig
from .memory_fields import MemoryStateError
from .memory_files import (
    INDEX_FILE,
    JOURNAL_DIR,
    MEMORY_FILE,
    MEMORY_GROUP_FILES,
    PREVIOUS_DIR,
    decode_journal_record,
    journal_chain,
    journal_record_paths,
    pool_index,
    read_folder_base,
    read_index,
    recorded_content_hash,
    whole_pool_bytes,
    write_index,
)
from .memory_transition import replay

# A save past this many records, or one that would make the journal larger than the pool file, compacts (rewrites
# the pool and store files, drops the journal): bounds the journal on disk (at most about one pool file's bytes)
# and the replay at load (cheap per record: the drop rule runs on slot indices and the pool is gathered once).
# SmolLM2 default folder: a sentence's record is ~1.5 MB against a 297 MB compaction; the bytes bound then
# compacts after ~190 records (benchmarks/save_cost.py).
MAX_JOURNAL_RECORDS = 256
MAX_JOURNAL_POOL_FRACTION = 1.0  # the journal's bytes, as a fraction of the pool file's


def journal_has_room(folder, record_bytes: int) -> bool:
    """Whether one more record of about `record_bytes` keeps the folder's journal within its bounds."""
    paths = [path for _, _, path in journal_record_paths(folder)]
    if len(paths) >= MAX_JOURNAL_RECORDS:
        return False
    held = sum(os.path.getsize(path) for path in paths)
    pool = os.path.join(os.fspath(folder), MEMORY_FILE)
    return held + record_bytes <= MAX_JOURNAL_POOL_FRACTION * whole_pool_bytes(pool)


def journal_status(folder) -> dict:
    """What a folder's journal holds: its record files (`records`: [(first, last, path)]), their `bytes`, and the
    bounds past which the next save compacts (`max_records`; `max_bytes`: the journal's share of the whole pool)."""
    records = journal_record_paths(folder)
    pool = os.path.join(os.fspath(folder), MEMORY_FILE)
    return {
        "records": records,
        "bytes": sum(os.path.getsize(path) for _, _, path in records),
        "max_records": MAX_JOURNAL_RECORDS,
        "max_bytes": int(MAX_JOURNAL_POOL_FRACTION * whole_pool_bytes(pool)) if os.path.isfile(pool) else None,
    }


class PendingUpdates:
    """The injections made since the memory was loaded from or saved to its folder (`memory_files.JournalEntry`s),
    and the pool they led to: valid while that pool is still the model's (any other change of the memory, like an
    undo or a restore, installs another pool and makes the next save a full one)."""

    def __init__(self):
        self.entries: list = []
        self.pool = None
        self.version: int | None = None
        self.slots = 0

    def reset(self, pool) -> None:
        """The memory with pool `pool` is what its folder holds: nothing pending."""
        self.entries, self.pool, self.version, self.slots = [], pool, pool._version, 0

    def record(self, entries: list, pool, limit: int) -> None:
        """Injections `entries` led from the recorded pool to `pool`. Past `limit` pending slots per layer the
        entries are let go (a full save then costs less than their record)."""
        self.slots += sum(entry.slots.shape[1] for entry in entries)
        self.entries = self.entries + list(entries) if self.slots <= limit else []
        self.pool, self.version = pool, pool._version
        if self.slots > limit:
            self.pool = None

    def let_go(self) -> None:
        """The memory changed in a way the journal does not record (an M+ memory's writes): the next save is full."""
        self.entries, self.pool, self.version, self.slots = [], None, None, 0

    def since(self, pool) -> list | None:
        """The pending entries when `pool` (the model's current pool) is the one they led to, else None."""
        if self.pool is None or pool is not self.pool or pool._version != self.version:
            return None
        return list(self.entries)


def replay_folder_journal(folder, state, config, fingerprint=None):
    """(`state` with the folder's journal replayed, the folder's head): `state` is the memory of the folder's pool
    and store files; `fingerprint`: the reading model's (or a function computing it). Refuses (MemoryStateError
    naming the file) a corrupted, foreign or missing record."""
    head = recorded_content_hash(os.path.join(os.fspath(folder), MEMORY_FILE), type(state))
    chain = journal_chain(folder, state.num_injections)
    if not chain:
        return state, head
    fingerprint = fingerprint() if callable(fingerprint) else fingerprint  # (computed only when there are records)
    entries = []
    for path in chain:
        record, metadata = decode_journal_record(path, fingerprint or state.fingerprint)
        if metadata["parent"] != head:
            raise MemoryStateError(
                f"{path} continues another memory than the one saved before it (its parent differs from the folder's "
                "head): move it and the records after it out of the folder, or restore the folder from a backup"
            )
        entries += record
        head = metadata["record_hash"]
    try:  # all records in one replay: the pool is gathered once
        state = replay(state, entries, config)
    except (MemoryStateError, ValueError) as err:
        raise MemoryStateError(f"{os.path.join(os.fspath(folder), JOURNAL_DIR)}: {err}") from None
    # (the pool and store files were fully checked, the records' slots are finite: the replayed state is valid)
    return state, head


def read_folder_memory(folder, state_class, with_store: bool = True, config=None):
    """The whole memory saved in a model folder, fully checked: the pool and store files with the journal replayed
    (`config`: the folder's MemoryLlamaConfig, read from its config.json when not given). `with_store=False`: the
    pool alone (the long-term store is being dropped on purpose; the journal still replays onto the pool)."""
    state = read_folder_base(folder, state_class, with_store)
    if journal_chain(folder, state.num_injections):
        if config is None:
            config = MemoryLlamaConfig.from_pretrained(os.fspath(folder))
        state = replay_folder_journal(folder, state, config)[0]
    return state if with_store else dataclasses.replace(state, long_term=())


def restore_previous(folder, state_class):
    """Make the memory a folder kept in `PREVIOUS_DIR` (the one its last full memory save replaced) its memory again,
    after checking it fully, and keep the replaced memory there instead (restoring twice gives the memory back). A
    folder swap under the folder lock: a crash leaves the one memory or the other. Returns the restored memory."""
    folder = os.fspath(folder)
    config = MemoryLlamaConfig.from_pretrained(folder)
    restored = []

    def write(staging: str, old: str | None) -> set[str]:
        previous = None if old is None else os.path.join(old, PREVIOUS_DIR)
        if previous is None or not os.path.isfile(os.path.join(previous, MEMORY_FILE)):
            raise FileNotFoundError(
                f"{folder} keeps no previous memory ({PREVIOUS_DIR}/ is made by a full save: save_pretrained, a "
                "journal compaction); restore the folder from a backup"
            )
        restored.append(read_folder_memory(previous, state_class, config=config))  # refused if broken: no change
        for name in os.listdir(previous):
            link_tree(os.path.join(previous, name), os.path.join(staging, name))
        os.mkdir(os.path.join(staging, PREVIOUS_DIR))
        for name in MEMORY_GROUP_FILES:
            if os.path.lexists(os.path.join(old, name)):
                link_tree(os.path.join(old, name), os.path.join(staging, PREVIOUS_DIR, name))
        index = read_index(old)
        if index is not None:  # (the restored pool file is named in the index, whatever its layout)
            write_index(os.path.join(staging, INDEX_FILE), pool_index(index))
        return {*MEMORY_GROUP_FILES, PREVIOUS_DIR, INDEX_FILE}

    update_folder(folder, write)
    return restored[0]
