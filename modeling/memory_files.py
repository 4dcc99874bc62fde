"""Memory on disk: the three layouts (a single-file memory state, a checkpoint folder, a Hub file set), their readers
and writers, and every format constant.

* Single file (`MemoryState.save` / `.load`, snapshots, training checkpoints): the pool's tensors, and the long-term
  store's if any, in one safetensors file whose metadata (`describe_state`) records geometry, counters and hashes.
* Checkpoint folder (`save_pretrained`, `memoryllm-hf inject`): weights as transformers writes them, plus one file per
  memory part (`MEMORY_PARTS`: the pool in `memory.safetensors`, named in the shard index's metadata and read by the
  model's checked loader, holding only the filled slots of a pool filling up (`compact_pool`); the store in
  `long_term_memory.safetensors`). Updates are folder swaps (`atomic_io.update_folder`); a full save keeps the memory
  it replaces in `previous_memory/` (`stage_previous`, brought back by `memory_journal.restore_previous`).
* Hub file set (`push_memory_to_hub`): the same part files plus `memory_state.json` (the pool file's metadata, the
  files' sha256 and versions), committed together.
* Journal (`memory_journal/` in a checkpoint folder): saves that cost what changed. A memory save after injections
  appends one record file (the new slots of each injection, its numbers, the state of an external generator) that
  replays bit-exactly onto the pool and store files; records chain by hash from the pool file's content hash (the
  folder's *head* is the newest record's hash, else the pool's). A full save (compaction) writes the pool and store
  files and drops the journal. See `memory_journal`.

A new part of a memory on disk (a store head record, a segment store, a write-ahead log) is one `MemoryPart` plus
its entry in `MEMORY_PARTS`: folders, Hub pushes and loads, and `memoryllm-hf stats` go through that table.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_io import (
    atomic_write,
    link_tree,
    map_tensor_file,
    read_tensor_file,
    remove_folder_orphans,
    remove_orphans,
    tensors_digest,
    update_folder,
    write_tensor_file,
)
from .memory_fields import (
    MEMORY_BUFFERS,
    REQUIRED_BUFFERS,
    RNG_STATE_BYTES,
    SLOT_BUFFERS,
    MemoryChangedOnDiskError,
    MemoryStateError,
    all_finite,
    dtype_name,
    torch_dtype,
)
from .memory_store import (
    CHAIN_FORMAT,
    STORE_TENSORS,
    TOKEN_TENSORS,
    LongTermStore,
    LongTermStoreError,
    check_block_finite,
    store_chain_hash,
    store_content_hash,
    store_file_digest,
    store_from_tensors,
    store_in_ram,
    store_num_slots,
    store_to_tensors,
)
from .mplus_memory import MPLUS_FORMAT, MPLUS_TENSORS, MPlusMemory, decode_mplus_file

# ---------------------------------------------------------------------------------------------- format constants
MEMORY_FILE = "memory.safetensors"
LONG_TERM_FILE = "long_term_memory.safetensors"
MEMORY_STATE_FILE = "memory_state.json"  # Hub: describes the pushed memory
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model-00001-of-00001.safetensors"
JOURNAL_DIR = "memory_journal"
# The memory a folder held before its last full memory save (`stage_previous`; `memory_journal.restore_previous`).
PREVIOUS_DIR = "previous_memory"
SEGMENTS_DIR = "long_term"  # a disk-backed store's segment files (memory-mapped)
RETRIEVAL_INDEX_FILE = "retrieval_index.safetensors"  # the store's persisted retrieval index (memory_scoring)
RETRIEVAL_INDEX_PREFIX = "retrieval_index/"  # its tensors inside a single-file memory state
STATE_FORMAT = "memoryllm-hf/memory-state/1"
JOURNAL_FORMAT = "memoryllm-hf/memory-journal/1"
STORE_FORMAT = "memoryllm-hf/long-term-store/1"
# One memory: the pool file records the head of the store saved with it (`store_head`; a disk-backed store's is a
# chain over its blocks' digests, `folder_store_head`), the store file the pool's injection count, so a lost,
# replaced, older or newer store is refused on every load path (`read_store_beside`).
STORE_HEAD = "long_term_head"
POOL_INJECTIONS = "pool_injections"
DROP_STORE_HOW = (
    "restore the matching file from a backup, or drop the long-term store on purpose and keep the pool: "
    "`memoryllm-hf drop-store FOLDER`, or from_pretrained(folder, drop_long_term_memory=True) and save"
)
# Metadata fields of a memory file (and of the Hub's memory_state.json) that must agree with its tensors.
COUNTERS = ("num_hidden_layers", "num_memory_tokens", "hidden_size", "filled_slots", "injections")
# A pool file whose metadata has `stored_slots: filled` holds only the filled slots of its per-slot tensors (the
# empty ones, at the start of the pool, are zeros: `compact_pool`); older files hold the whole pool.
POOL_STORED = "stored_slots"
# A checkpoint's shard index does not list the pool file's tensors (their shapes are not the model's buffers'); its
# metadata names the pool file instead (older indexes list the buffers in `memory.safetensors`).
INDEX_POOL_KEY = "memory_file"

TensorFile = tuple[dict[str, torch.Tensor], dict[str, str]]  # (tensors, metadata) of one safetensors file


# ---------------------------------------------------------------------------------------------- single-file state
def describe_state(state, head: dict | None = None) -> dict:
    """The metadata schema of a memory file (also the core of the Hub's `memory_state.json`): format, geometry,
    counters, K, the model fingerprint, the content hash, the long-term store's head (`head`, when already known:
    `store_head(state.long_term)`) and every tensor's dtype and shape."""
    L, N, d = state.memory.shape
    info = {
        "memory_state": STATE_FORMAT,
        "num_hidden_layers": L,
        "num_memory_tokens": N,
        "hidden_size": d,
        "dtype": dtype_name(state.memory.dtype),
        "filled_slots": state.num_filled_slots,
        "injections": state.num_injections,
        "num_update_tokens": state.num_update_tokens,
        "fingerprint": state.fingerprint,
        "content_hash": state.content_hash(),
        STORE_HEAD: store_head(state.long_term) if head is None else head,
        "tensors": {
            name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for name, t in state.as_buffers().items()
        },
    }
    return {key: value for key, value in info.items() if value is not None}


def state_metadata(state, head: dict | None = None) -> dict[str, str]:
    """`describe_state` as safetensors metadata (str -> str)."""
    return {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in describe_state(state, head).items()}


def is_zero(tensor: torch.Tensor) -> bool:
    """Whether every value is +0 (bit for bit: -0.0 and NaN are not)."""
    if tensor.is_floating_point():
        return not bool((tensor != 0).any() or torch.signbit(tensor).any())
    return not bool(tensor.any())


def compact_pool(state, head: dict | None = None) -> TensorFile:
    """(tensors, metadata) of a pool file: a pool filling up (its empty slots all zeros, as `MemoryState.empty` and
    the drop rule leave them) keeps only its filled slots (`POOL_STORED`); any other pool is kept whole, so that
    `expand_pool` gives back the same tensors bit for bit."""
    buffers, metadata = state.as_buffers(), state_metadata(state, head)
    empty = state.num_slots - state.num_filled_slots
    if empty and all(is_zero(buffers[name][:, :empty]) for name in SLOT_BUFFERS if name in buffers):
        buffers = {name: t[:, empty:] if name in SLOT_BUFFERS else t for name, t in buffers.items()}
        metadata[POOL_STORED] = "filled"
    return buffers, metadata


def whole_pool_bytes(path: str) -> int:
    """The bytes of the whole pool a pool file holds (empty slots included, as its metadata records the tensors),
    else (an older file) its size."""
    with safe_open(path, "pt") as handle:
        described = (handle.metadata() or {}).get("tensors")
    try:
        tensors = json.loads(described)
        return sum(torch.Size(t["shape"]).numel() * torch_dtype(t["dtype"]).itemsize for t in tensors.values())
    except (TypeError, ValueError, KeyError, AttributeError):
        return os.path.getsize(path)


def recorded_geometry(path: str) -> tuple[int, ...] | None:
    """(L, N, d) that a pool file's metadata records (None: not recorded, or not readable: the full read says why)."""
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    values = [metadata.get(key, "") for key in COUNTERS[:3]]
    return tuple(int(value) for value in values) if all(value.isdigit() for value in values) else None


def expand_pool(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The whole pool of a pool file's tensors: a `compact_pool` file's filled slots get their zero empty slots
    back in front (the content hash, checked next, then proves them bit-exact); others are returned as they are."""
    stored = metadata.get(POOL_STORED)
    if stored is None:
        return tensors
    slots, filled = metadata.get("num_memory_tokens", ""), metadata.get("filled_slots", "")
    if stored != "filled" or not slots.isdigit() or not filled.isdigit() or int(filled) > int(slots):
        raise MemoryStateError(f"corrupted: {POOL_STORED}={stored!r}, num_memory_tokens={slots!r}, filled_slots="
                               f"{filled!r} in its metadata")
    expanded = dict(tensors)
    for name in SLOT_BUFFERS:
        tensor = tensors.get(name)
        if tensor is None or tensor.dim() < 2 or tensor.shape[1] != int(filled):
            raise MemoryStateError(f"corrupted: {name} does not hold the {filled} filled slots its metadata records")
        empty = tensor.new_zeros((tensor.shape[0], int(slots) - int(filled), *tensor.shape[2:]))
        expanded[name] = torch.cat([empty, tensor], dim=1)
    return expanded


def write_state_file(path: str | os.PathLike, state) -> None:
    """One file holding the whole memory (pool and long-term store, each with its hash), written atomically."""
    state.validate()
    head = store_head(state.long_term)
    pool, metadata = compact_pool(state, head)
    if isinstance(state.long_term, MPlusMemory):
        metadata.update(long_term_hash=head["content_hash"], long_term_store=MPLUS_FORMAT)
        long_term = state.long_term.to_tensors()
    else:
        if state.long_term:
            metadata["long_term_hash"] = head["content_hash"]
        long_term = store_to_tensors(state.long_term)
    index = {}
    if state.retrieval_index is not None and not isinstance(state.long_term, MPlusMemory):
        index = {RETRIEVAL_INDEX_PREFIX + name: tensor for name, tensor in state.retrieval_index[0].items()}
        metadata["retrieval_index"] = json.dumps(state.retrieval_index[1])
    write_tensor_file(os.fspath(path), {**pool, **long_term, **index}, metadata)


def read_state_file(path: str | os.PathLike, state_class):
    """Read a memory file (`write_state_file`, a checkpoint's memory.safetensors, a snapshot) as a `state_class`
    and check it completely: exactly the memory tensors, valid and finite, counters and shapes as its metadata says,
    its content hash."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no memory state file at {path}")
    try:
        tensors, metadata = read_tensor_file(path)
    except (SafetensorError, OSError) as err:
        raise MemoryStateError(f"{path} is truncated or corrupted ({err}); {way_back(path)}") from err
    try:
        return decode_state_file(tensors, metadata, state_class)
    except MemoryStateError as err:
        raise MemoryStateError(f"{path}: {err}; {way_back(path)}") from None


def way_back(path: str | None) -> str:
    """What to do about the broken memory file `path` (or a broken memory of folder `path`): bring back the memory
    kept in its folder's `PREVIOUS_DIR` when there is one, else restore from a backup."""
    folder = None if path is None else path if os.path.isdir(path) else os.path.dirname(path)
    if folder is not None and os.path.basename(folder) == SEGMENTS_DIR:  # a segment of a disk-backed store
        folder = os.path.dirname(folder)
    if folder is not None and os.path.isdir(os.path.join(folder, PREVIOUS_DIR)):
        return (f"the memory saved before it is kept in {os.path.join(folder, PREVIOUS_DIR)}: bring it back with "
                f"`memoryllm-hf restore-previous {folder}` (or memoryllm_hf.restore_previous_memory(folder)), or "
                "restore the folder from a backup")
    return "restore it from a backup"


def decode_state_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], state_class):
    """The checked `state_class` of a memory file's (tensors, metadata)."""
    tensors = expand_pool(tensors, metadata)
    described = "memory_state" in metadata  # older files carry only {"format": "pt"}
    required = MEMORY_BUFFERS if described else REQUIRED_BUFFERS
    missing = [name for name in required if name not in tensors]
    if missing:
        raise MemoryStateError(f"not a memory state: tensors {missing} are missing")
    try:
        if metadata.get("long_term_store") == MPLUS_FORMAT:
            long_term = MPlusMemory.from_tensors({name: tensors.pop(name) for name in MPLUS_TENSORS if name in tensors})
        else:
            stored = STORE_TENSORS + TOKEN_TENSORS
            long_term = store_from_tensors({name: tensors.pop(name) for name in stored if name in tensors})
    except LongTermStoreError as err:
        raise MemoryStateError(str(err)) from None
    head = store_head(long_term)
    if isinstance(long_term, MPlusMemory) and metadata.get("long_term_hash") != head["content_hash"]:
        raise MemoryStateError("corrupted: its M+ long-term memory differs from the hash recorded at saving")
    if long_term and metadata.get("long_term_hash") != head["content_hash"]:
        raise MemoryStateError("corrupted: its long-term store differs from the hash recorded when it was saved")
    if "long_term_hash" in metadata:  # a single-file memory: its store is inside (a folder's pool file has it beside)
        if not long_term:
            raise MemoryStateError("corrupted: its metadata records a long-term store but the store's tensors are gone")
        check_store_head(recorded_head(metadata), long_term, "the memory file", actual=head)
    index = {name[len(RETRIEVAL_INDEX_PREFIX):]: tensors.pop(name) for name in list(tensors)
             if name.startswith(RETRIEVAL_INDEX_PREFIX)}
    extra = sorted(set(tensors) - set(MEMORY_BUFFERS))
    if extra:
        raise MemoryStateError(f"holds tensors that are not part of a memory ({extra[:5]}); not a memory file")
    numbers = {}
    for key in ("num_update_tokens", *COUNTERS):
        if key in metadata:
            if not metadata[key].isdigit():
                raise MemoryStateError(f"corrupted: {key}={metadata[key]!r} in its metadata")
            numbers[key] = int(metadata[key])
    state = state_class.from_buffers(
        tensors,
        fingerprint=metadata.get("fingerprint"),
        num_update_tokens=numbers.get("num_update_tokens"),
        long_term=long_term,
    )
    state.validate()
    if index:  # (checked when used, `memory_scoring`: a broken one is indexed again, never read wrong)
        try:
            state.retrieval_index = (index, json.loads(metadata.get("retrieval_index", "")))
        except ValueError:
            state.retrieval_index = (index, {})
    content_hash = None
    if described:
        try:
            recorded = json.loads(metadata.get("tensors", "null"))
        except ValueError:
            recorded = None
        actual = describe_state(state, head)
        content_hash = actual["content_hash"]
        if recorded != actual["tensors"]:
            raise MemoryStateError(f"corrupted: its tensors {actual['tensors']} differ from its metadata {recorded}")
        wrong = {key: (numbers.get(key), actual[key]) for key in COUNTERS if numbers.get(key) != actual[key]}
        if wrong:
            raise MemoryStateError(f"corrupted: metadata and tensors disagree on {wrong} (metadata, tensors)")
        if metadata.get("dtype") != actual["dtype"]:
            raise MemoryStateError(f"corrupted: dtype {metadata.get('dtype')!r} in its metadata")
    expected = metadata.get("content_hash")
    if described and expected is None:
        raise MemoryStateError("corrupted: its metadata has no content_hash")
    if expected is not None and expected != (content_hash or state.content_hash()):
        raise MemoryStateError("corrupted: its content differs from the hash recorded when it was saved")
    return state


def recorded_content_hash(path: str | os.PathLike, state_class) -> str | None:
    """Content hash of the memory file at `path` (from its metadata when recorded), None when there is none."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as handle:
            recorded = (handle.metadata() or {}).get("content_hash")
    except (SafetensorError, OSError):
        recorded = None
    return recorded or read_state_file(path, state_class).content_hash()


# ---------------------------------------------------------------------------------------------- long-term store file
def store_file_metadata(
    store: LongTermStore, fingerprint: str | None = None, pool_injections: int | None = None,
    content_hash: str | None = None,
) -> dict[str, str]:
    """Metadata of a store file: format, geometry, counts, content hash (`content_hash`, when already known; and the
    model's fingerprint, and the injection count of the pool it is saved with)."""
    L, _, d = store[0].slots.shape
    metadata = {
        "long_term_store": STORE_FORMAT,
        "num_layers": str(L),
        "hidden_size": str(d),
        "slots": str(store_num_slots(store)),
        "injections": str(len(store)),
        "content_hash": store_content_hash(store) if content_hash is None else content_hash,
    }
    if fingerprint is not None:
        metadata["fingerprint"] = fingerprint
    if pool_injections is not None:
        metadata[POOL_INJECTIONS] = str(pool_injections)
    return metadata


def check_store_file_metadata(path: str, metadata: dict[str, str], store: LongTermStore) -> None:
    """Raise LongTermStoreError unless the counts and geometry a store file's metadata records are its tensors'."""
    if not store:
        return
    L, _, d = store[0].slots.shape
    actual = {"num_layers": L, "hidden_size": d, "slots": store_num_slots(store), "injections": len(store)}
    wrong = {key: (metadata.get(key), value) for key, value in actual.items() if metadata.get(key) != str(value)}
    if wrong:
        raise LongTermStoreError(f"{path} is corrupted: its metadata and tensors disagree on {wrong} (metadata, "
                                 f"tensors); {way_back(path)}")


def save_store(path: str | os.PathLike, store: LongTermStore, fingerprint: str | None = None) -> None:
    """Write the store to one safetensors file, atomically, with its hash (and the model's fingerprint)."""
    if not store:
        raise LongTermStoreError("the long-term store is empty: there is nothing to save")
    write_tensor_file(os.fspath(path), store_to_tensors(store), store_file_metadata(store, fingerprint))


def load_store(
    path: str | os.PathLike, fingerprint: str | None = None, pool_injections: int | None = None, mapped: bool = False,
    written_from: LongTermStore | None = None,
) -> LongTermStore:
    """Read a file written by `save_store` (or a segment of a disk-backed store); refuses a truncated or corrupted
    file, a hash mismatch, (when `fingerprint` is given) another model's store or one that records no model, and
    (when `pool_injections` is given and the file records its pool's) a store saved beside another pool than the one
    of `pool_injections`. `mapped=True`: the blocks' slots stay memory-mapped from the file (`MemoryBlock.source`),
    each block digested (`block_digest`) while the file is hashed, except where `written_from` (the blocks the file
    was just written from) knows the digest."""
    path = os.fspath(path)
    try:
        tensors, metadata = map_tensor_file(path) if mapped else read_tensor_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise LongTermStoreError(f"{path} is truncated or corrupted ({err}); {way_back(path)}") from err
    if metadata.get("long_term_store") == MPLUS_FORMAT:  # an M+ model's long-term memory
        return decode_mplus_file(path, tensors, metadata, fingerprint)
    extra = sorted(set(tensors) - set(STORE_TENSORS) - set(TOKEN_TENSORS))
    if extra or metadata.get("long_term_store") != STORE_FORMAT:
        raise LongTermStoreError(f"{path} is not a long-term store file (format {metadata.get('long_term_store')!r}, "
                                 f"unexpected tensors {extra})")
    recorded = metadata.get("fingerprint")
    if fingerprint is not None and recorded != fingerprint:  # (a store without one is nobody's)
        raise LongTermStoreError(
            f"{path} belongs to another model (fingerprint {recorded}, this model's is {fingerprint})"
        )
    saved_with = metadata.get(POOL_INJECTIONS)
    if pool_injections is not None and saved_with is not None and saved_with != str(pool_injections):
        raise LongTermStoreError(
            f"{path} was saved beside a pool of {saved_with} injections, but {MEMORY_FILE} has {pool_injections}: "
            f"the two files come from different saves; {DROP_STORE_HOW}"
        )
    store = store_from_tensors(tensors, source=path if mapped else None)
    check_store_file_metadata(path, metadata, store)
    if mapped:  # the file's tensors hashed as they are (no copy of mapped slots), each block digested in the same
        if written_from is not None and len(written_from) == len(store):  # pass (a folder's chained head then
            for block, source in zip(store, written_from, strict=True):  # reads nothing); a digest known from the
                block.digest = source.digest  # blocks written holds once the file's hash does
        digest = store_file_digest(tensors, store)
    else:
        digest = store_content_hash(store)
    if metadata.get("content_hash") != digest:
        raise LongTermStoreError(f"{path} is corrupted: its content differs from the hash recorded when it was saved; "
                                 f"{way_back(path)}")
    if mapped:  # while the file's pages are fresh from hashing (a store larger than RAM is then read once, not twice)
        try:
            for block in store:
                check_block_finite(block)
        except LongTermStoreError as err:
            raise LongTermStoreError(f"{path}: {err}; {way_back(path)}") from None
    return store


# ---------------------------------------------------------------------------------------------- store segments
def segment_name(store: LongTermStore) -> str:
    """File name of the segment holding `store`'s blocks (named by their first and last injection)."""
    return f"{store[0].injection:010d}-{store[-1].injection:010d}.safetensors"


def write_segment(directory: str, store: LongTermStore, fingerprint: str | None, durable: bool = True) -> str:
    """Write `store`'s blocks as one segment file in `directory` (atomically and fsynced when `durable`) and point
    the blocks at it: their slots become views of its memory map. Returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, segment_name(store))
    tensors, metadata = store_to_tensors(store), store_file_metadata(store, fingerprint)
    if durable:
        write_tensor_file(path, tensors, metadata)
    else:  # a new file (never rewritten in place: a map of the old one would see it change)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        os.replace(tmp, path)
    mapped = load_store(path, mapped=True, written_from=store)
    for block, view in zip(store, mapped, strict=True):
        block.slots, block.source, block.digest = view.slots, path, view.digest
    return path


def read_segments(folder: str | os.PathLike, fingerprint: str | None) -> LongTermStore:
    """A folder's disk-backed store: its segment files memory-mapped, in order, each fully checked (format, hash,
    the model's fingerprint), injection numbers increasing across them."""
    directory = os.path.join(os.fspath(folder), SEGMENTS_DIR)
    store: list = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.startswith(".") and ".tmp-" in name:
            continue
        path = os.path.join(directory, name)
        parts = name.removesuffix(".safetensors").split("-")
        if not name.endswith(".safetensors") or len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise LongTermStoreError(f"{path} is not a store segment (segments are FIRST-LAST.safetensors): move it "
                                     f"out of {directory}")
        blocks = load_store(path, fingerprint, mapped=True)
        if not blocks or segment_name(blocks) != name or (store and blocks[0].injection <= store[-1].injection):
            raise LongTermStoreError(f"{path} does not hold the injections its name says, or overlaps the segment "
                                     "before it: the store is corrupted; restore the folder from a backup")
        if store and blocks[0].injection != store[-1].injection + 1:
            raise LongTermStoreError(
                f"{path}: the segment of injections {store[-1].injection + 1}-{blocks[0].injection - 1} before it is "
                "missing; restore it (or the folder) from a backup"
            )
        store.extend(blocks)
    return tuple(store)


def segment_store(store) -> bool:
    """Whether `store` is a disk-backed store (some blocks memory-mapped from segment files; not an M+ memory)."""
    return bool(store) and not isinstance(store, MPlusMemory) and any(block.source for block in store)


def segment_runs(store: LongTermStore) -> list[tuple[str | None, list]]:
    """The blocks of `store` in runs: (the segment file a run is mapped from when the run is that whole file, else
    None; the run's blocks). Runs that are not whole files are written anew by a save."""
    runs: list[list] = []
    for block in store:
        if runs and block.source is not None and runs[-1][0].source == block.source:
            runs[-1].append(block)
        else:
            runs.append([block])
    whole = []
    for run in runs:
        source = run[0].source
        if source is None or os.path.basename(source) != segment_name(tuple(run)) or not os.path.isfile(source):
            source = None
        whole.append((source, run))
    return whole


def stage_segments(staging: str, old: str | None, target: str, state) -> None:
    """The segments of a disk-backed store in a new version of folder `target` (being written in `staging`;
    `old`: the current folder or None). A segment file of the old folder whose blocks are all still stored is
    carried over (a hard link); every other run of blocks (held in RAM, in a temporary directory, or the surviving
    part of a segment whose oldest blocks left the store) is written as one new segment."""
    store = state.long_term
    if not segment_store(store):
        return
    directory = os.path.join(staging, SEGMENTS_DIR)
    os.makedirs(directory, exist_ok=True)
    old_directory = os.path.realpath(os.path.join(old, SEGMENTS_DIR)) if old is not None else None
    fresh: list = []

    def flush() -> None:
        if fresh:
            write_segment(directory, tuple(fresh), state.fingerprint)
            final = os.path.join(os.path.realpath(os.fspath(target)), SEGMENTS_DIR, segment_name(tuple(fresh)))
            for block in fresh:  # where the segment will be once the new folder is swapped in
                block.source = final
            fresh.clear()

    for source, run in segment_runs(store):
        same_folder = source is not None and os.path.dirname(os.path.realpath(source)) == old_directory
        if same_folder and segment_fingerprint(source) == state.fingerprint:
            flush()
            link_tree(source, os.path.join(directory, os.path.basename(source)))
        else:
            fresh.extend(run)
    flush()


def segment_fingerprint(path: str) -> str | None:
    """The model fingerprint a segment file records (a spilled block's records none: it is rewritten, with the
    model's, when saved or pushed, since a store that names no model is refused at load)."""
    with safe_open(path, "pt") as handle:
        return (handle.metadata() or {}).get("fingerprint")


class SpillDirectory:
    """Where the blocks of a disk-backed store live until they are saved in a folder: one segment file per block in
    a temporary directory (`memoryllm-store-*` under the system's temp folder, created on first use), removed when
    its owner (the model) is garbage-collected or the process exits. A copy of the model gets its own."""

    def __init__(self):
        self.path: str | None = None
        self._cleanup = None

    def spill(self, store: LongTermStore, fingerprint: str | None = None) -> None:
        """Move every block of `store` held in RAM into a segment file here (its slots become a memory map)."""
        for block in store:
            if block.source is None:
                if self.path is None:
                    self.path = tempfile.mkdtemp(prefix="memoryllm-store-")
                    self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
                write_segment(self.path, (block,), fingerprint, durable=False)

    def remove(self) -> None:
        """Remove the directory now (blocks already mapped stay readable: a map outlives its file)."""
        if self._cleanup is not None:
            self._cleanup()
        self.path = self._cleanup = None

    def __deepcopy__(self, memo) -> "SpillDirectory":
        return SpillDirectory()

    def __reduce__(self):
        return (SpillDirectory, ())


def place_store(store: LongTermStore, storage: str, spill: SpillDirectory) -> LongTermStore:
    """`store` as `long_term_memory_storage` keeps it: "disk": blocks held in RAM move to segment files in `spill`
    (their slots become memory maps); "memory": memory-mapped blocks come into RAM. (An M+ long-term memory is kept
    as it is.)"""
    if isinstance(store, MPlusMemory):
        return store
    if storage == "disk":
        spill.spill(store)
        return store
    return store_in_ram(store)


# ---------------------------------------------------------------------------------------------- journal records
@dataclasses.dataclass(frozen=True)
class JournalEntry:
    """One injection as the journal keeps it, enough to replay it bit-exactly (`memory_transition.replay`): its
    number, the number of the `inject()` call it belongs to, its new slots [L, k, d] exactly as committed, and the
    state of the external generator that drew its dropped slots (None: the pool's own generator), and the token ids
    [n] the slots were written from (None: not known), which the long-term store keeps (`MemoryBlock.token_ids`)."""

    injection: int
    call: int
    slots: torch.Tensor
    generator: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None


JOURNAL_TENSORS = (
    "journal_slots", "journal_injection", "journal_call", "journal_generator", "journal_external",
    "journal_token_ids", "journal_token_counts",  # each entry's token ids, concatenated; their counts (-1: None)
)
_RECORD_DIGITS = 10


def journal_record_name(first: int, last: int) -> str:
    """File name of the record of injections `first`..`last` (sorting by name sorts by injection)."""
    return f"{first:0{_RECORD_DIGITS}d}-{last:0{_RECORD_DIGITS}d}.safetensors"


def record_hash(parent: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """The hash that names a record: its parent's (the head it was appended to) and its own tensors."""
    return hashlib.sha256(f"{parent}:{tensors_digest(tensors)}".encode()).hexdigest()


def encode_journal_record(entries, parent: str, fingerprint: str | None) -> TensorFile:
    """(tensors, metadata) of the record of `entries` (consecutive injections) appended to head `parent`."""
    if not entries:
        raise ValueError("a journal record needs at least one injection")
    dtypes = {entry.slots.dtype for entry in entries}
    if len(dtypes) != 1:
        raise ValueError(f"one journal record holds slots of one dtype, got {sorted(map(str, dtypes))}")
    sizes = [entry.slots.shape[1] for entry in entries]
    external = [entry.generator is not None for entry in entries]
    generators = [entry.generator.cpu() for entry in entries if entry.generator is not None]
    tensors = {
        "journal_slots": torch.cat([entry.slots.detach().cpu() for entry in entries], dim=1).contiguous(),
        "journal_injection": torch.tensor([e.injection for e, k in zip(entries, sizes, strict=True) for _ in range(k)]),
        "journal_call": torch.tensor([e.call for e, k in zip(entries, sizes, strict=True) for _ in range(k)]),
        "journal_generator": torch.stack(generators) if generators else torch.zeros(0, RNG_STATE_BYTES).byte(),
        "journal_external": torch.tensor(external, dtype=torch.uint8),
        "journal_token_ids": torch.cat(
            [torch.zeros(0, dtype=torch.int32)]
            + [e.token_ids.reshape(-1).to("cpu", torch.int32) for e in entries if e.token_ids is not None]
        ).contiguous(),
        "journal_token_counts": torch.tensor(
            [-1 if e.token_ids is None else e.token_ids.numel() for e in entries], dtype=torch.long
        ),
    }
    metadata = {
        "memory_journal": JOURNAL_FORMAT,
        "first": str(entries[0].injection),
        "last": str(entries[-1].injection),
        "parent": parent,
        "record_hash": record_hash(parent, tensors),
    }
    if fingerprint is not None:
        metadata["fingerprint"] = fingerprint
    return tensors, metadata


def _journal_error(path: str, problem: str) -> MemoryStateError:
    return MemoryStateError(
        f"{path}: {problem}. The memory saved before this journal record is intact: move this file and the records "
        "after it out of the folder to load that memory, or restore the folder from a backup"
    )


def decode_journal_record(path: str, fingerprint: str | None = None) -> tuple[list[JournalEntry], dict[str, str]]:
    """The entries and metadata of one journal record, fully checked (format, its hash, the model's fingerprint,
    consecutive injection numbers, generator states)."""
    try:
        tensors, metadata = read_tensor_file(path)
    except (SafetensorError, OSError) as err:
        raise _journal_error(path, f"truncated or corrupted ({err})") from None
    if metadata.get("memory_journal") != JOURNAL_FORMAT or set(tensors) != set(JOURNAL_TENSORS):
        raise _journal_error(path, f"not a journal record (format {metadata.get('memory_journal')!r})")
    recorded = metadata.get("fingerprint")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise _journal_error(path, f"belongs to another model (fingerprint {recorded}, this model's is {fingerprint})")
    tensors = {name: tensors[name] for name in JOURNAL_TENSORS}
    if metadata.get("record_hash") != record_hash(metadata.get("parent", ""), tensors):
        raise _journal_error(path, "corrupted: its content differs from the hash recorded when it was written")
    slots, injection, call, generator, external, token_ids, token_counts = tensors.values()
    count = external.shape[0]
    try:
        first, last = int(metadata["first"]), int(metadata["last"])
        change = torch.nonzero(injection[1:] != injection[:-1]).squeeze(1) + 1
        bounds = [0, *change.tolist(), injection.shape[0]]
        numbers = [int(injection[start]) for start in bounds[:-1]]
        consistent = (
            slots.dim() == 3 and slots.is_floating_point() and injection.shape == call.shape == (slots.shape[1],)
            and numbers == list(range(first, last + 1)) == list(range(first, first + count))
            and tuple(generator.shape) == (int(external.sum()), RNG_STATE_BYTES) and external.dim() == 1
            and os.path.basename(path) == journal_record_name(first, last)
            and token_ids.dtype == torch.int32 and token_ids.dim() == 1 and token_counts.shape == (count,)
            and token_counts.dtype == torch.long and bool((token_counts >= -1).all())
            and int(token_counts.clamp(min=0).sum()) == token_ids.shape[0]
        )
    except (KeyError, ValueError):
        consistent = False
    if not consistent:
        raise _journal_error(path, "inconsistent injection numbers or shapes")
    if not all_finite(slots):
        raise _journal_error(path, "holds NaN/inf slots")
    entries, drawn, ids = [], iter(generator), iter(token_ids.split(token_counts.clamp(min=0).tolist()))
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if bool((call[start:end] != call[start]).any()):
            raise _journal_error(path, f"injection {numbers[index]} has slots of different calls")
        tokens = next(ids)
        entries.append(
            JournalEntry(
                numbers[index], int(call[start]), slots[:, start:end].clone(),
                next(drawn).clone() if bool(external[index]) else None,
                tokens.clone() if int(token_counts[index]) >= 0 else None,
            )
        )
    return entries, metadata


def journal_record_paths(folder: str | os.PathLike) -> list[tuple[int, int, str]]:
    """(first, last, path) of every journal record of a folder, oldest first (temp files of killed writers are
    ignored; any other file there is refused)."""
    directory = os.path.join(os.fspath(folder), JOURNAL_DIR)
    if not os.path.isdir(directory):
        return []
    records = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") and ".tmp-" in name:
            continue
        stem = name.removesuffix(".safetensors")
        parts = stem.split("-")
        if name == stem or len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise MemoryStateError(
                f"{os.path.join(directory, name)} is not a journal record (records are FIRST-LAST.safetensors): "
                f"move it out of {directory}"
            )
        records.append((int(parts[0]), int(parts[1]), os.path.join(directory, name)))
    return records


def journal_chain(folder: str | os.PathLike, base_injections: int) -> list[str]:
    """Paths of the records that continue a pool file of `base_injections` injections, in order. Records the pool
    already holds (left by an interrupted compaction) are skipped; a gap or an overlap is refused."""
    chain, expected = [], base_injections + 1
    for first, last, path in journal_record_paths(folder):
        if last < expected and not chain:
            continue
        if first != expected or last < first:
            raise _journal_error(path, f"expected a record starting at injection {expected} (a record is missing)")
        chain.append(path)
        expected = last + 1
    return chain


def record_metadata(path: str) -> dict[str, str]:
    """The metadata of a journal record (its header only)."""
    try:
        with safe_open(path, "pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _journal_error(path, f"truncated or corrupted ({err})") from None


def folder_head(folder: str | os.PathLike, state_class) -> str | None:
    """The head of a folder's memory: the newest journal record's hash, else the pool file's content hash (None:
    no memory file). Reads headers only (and an older pool file without a recorded hash)."""
    pool = os.path.join(os.fspath(folder), MEMORY_FILE)
    head = recorded_content_hash(pool, state_class)
    if head is None:
        return None
    with safe_open(pool, "pt") as handle:
        injections = (handle.metadata() or {}).get("injections", "0")
    chain = journal_chain(folder, int(injections) if injections.isdigit() else 0)
    return record_metadata(chain[-1])["record_hash"] if chain else head


def append_journal_record(folder: str | os.PathLike, record: TensorFile) -> None:
    """Write a record (`encode_journal_record`) into the folder's journal, atomically (fsynced temp file, rename,
    fsynced directory). The caller holds the folder lock and checked that the record's parent is the head. What killed
    writers left beside and inside the folder is removed first (an append must not leave a full save's orphans)."""
    directory = os.path.join(os.fspath(folder), JOURNAL_DIR)
    remove_folder_orphans(folder)
    remove_orphans(directory)
    os.makedirs(directory, exist_ok=True)
    tensors, metadata = record
    name = journal_record_name(int(metadata["first"]), int(metadata["last"]))
    write_tensor_file(os.path.join(directory, name), tensors, metadata)


# ---------------------------------------------------------------------------------------------- one memory
# The key of a store head that records a chain hash (`store_chain_hash`) instead of the content hash.
CHAIN_HEAD = "chain_format"


def store_head(store: LongTermStore, content_hash: str | None = None, chained: bool = False) -> dict:
    """What a pool file records of the long-term store saved with it: its newest injection, size and content hash
    (`content_hash`: when already known; `chained`: its chain hash instead, `store_chain_hash`, with `CHAIN_HEAD`;
    `{"injections": 0}` for no store; an M+ long-term memory: its kind, slots per layer and content hash)."""
    if isinstance(store, MPlusMemory):
        return {
            "kind": MPLUS_FORMAT,
            "slots": list(store.slot_counts),
            "content_hash": store.content_hash() if content_hash is None else content_hash,
        }
    if not store:
        return {"injections": 0}
    head = {"newest_injection": store[-1].injection, "injections": len(store), "slots": store_num_slots(store)}
    if chained:
        return {**head, CHAIN_HEAD: CHAIN_FORMAT, "chain_hash": store_chain_hash(store)}
    return {**head, "content_hash": store_content_hash(store) if content_hash is None else content_hash}


def folder_store_head(store: LongTermStore) -> dict:
    """The head a folder's (or a Hub file set's) pool file records of the store saved beside it: a disk-backed
    store's (segment files) is chained, so a save hashes only the blocks that are new and a load only reads each
    segment once (`load_store`); a store saved as one file keeps its content hash."""
    return store_head(store, chained=segment_store(store))


def recorded_head(metadata: Mapping) -> dict | None:
    """The store head a pool file's metadata (or memory_state.json) records; None for files saved before heads were
    recorded (their store is taken as it is)."""
    head = metadata.get(STORE_HEAD)
    if head is None or isinstance(head, dict):
        return head
    try:
        head = json.loads(head)
    except ValueError:
        head = None
    if not isinstance(head, dict):
        raise MemoryStateError(f"corrupted: {STORE_HEAD}={metadata.get(STORE_HEAD)!r} in its metadata")
    return head


def check_store_head(
    head: dict | None, store: LongTermStore, where: str, missing: str = "missing", actual: dict | None = None
) -> None:
    """Raise MemoryStateError unless `store` is the long-term store the pool file recorded (`head`; `actual`: the
    store's own head, when already known); `where` names the place of the files, `missing` says what happened to a
    store file that is not there. The store's head is computed the way `head` records it (chained or not)."""
    if head is None:
        return
    chained = CHAIN_HEAD in head
    if chained and head[CHAIN_HEAD] != CHAIN_FORMAT:
        raise MemoryStateError(
            f"{where}: {MEMORY_FILE} records its long-term store's head as {head[CHAIN_HEAD]!r}, which this version "
            f"does not know ({CHAIN_FORMAT!r}): load it with the memoryllm-hf version that saved it, or a newer one"
        )
    if actual is None or (CHAIN_HEAD in actual) != chained:
        actual = store_head(store, chained=chained)
    if head == actual:
        return
    recorded = head.get("injections", 0)
    if not store:
        raise MemoryStateError(
            f"{where}: {MEMORY_FILE} records a long-term store of {recorded} injections (newest "
            f"{head.get('newest_injection')}), but {LONG_TERM_FILE} is {missing}: loading would lose them for good; "
            f"{DROP_STORE_HOW}"
        )
    if isinstance(store, MPlusMemory) or head.get("kind") == MPLUS_FORMAT:
        raise MemoryStateError(
            f"{where}: {LONG_TERM_FILE} is not the M+ long-term memory {MEMORY_FILE} was saved with (recorded "
            f"{head}); {DROP_STORE_HOW}"
        )
    found = f"{LONG_TERM_FILE} holds {len(store)} injections (newest {store[-1].injection})"
    if not recorded:
        raise MemoryStateError(
            f"{where}: {found}, but {MEMORY_FILE} was saved without a long-term store: the two files come from "
            f"different saves; {DROP_STORE_HOW}"
        )
    newest = head.get("newest_injection", 0)
    age = "an older" if store[-1].injection < newest else "a newer" if store[-1].injection > newest else "another"
    raise MemoryStateError(
        f"{where}: {found}, {age} store than the one {MEMORY_FILE} was saved with ({recorded} injections, newest "
        f"{newest}); {DROP_STORE_HOW}"
    )


def read_store_beside(pool_file: str, store_file: str | None, fingerprint, pool_injections: int, where: str,
                      replaced: bool = False, mapped: bool = False) -> LongTermStore:
    """The long-term store saved beside the pool file `pool_file` (`store_file`: its local path, None when there is
    none; `replaced`: something that is not a file stands in its place), checked to be the store the pool file
    records and of the model with `fingerprint` (a value, or a function computing it only when there is a store)."""
    with safe_open(pool_file, "pt") as handle:
        head = recorded_head(handle.metadata() or {})
    if replaced:
        check_store_head(head, (), where, "not a file (a directory, a device or a link to one)")
        raise MemoryStateError(f"{where}: {LONG_TERM_FILE} is not a file (a directory, a device or a link to one); "
                               f"{DROP_STORE_HOW}")
    try:
        fingerprint = fingerprint() if callable(fingerprint) and store_file is not None else fingerprint
        store = () if store_file is None else load_store(store_file, fingerprint, pool_injections, mapped)
    except LongTermStoreError as err:
        raise MemoryStateError(str(err)) from None
    verified = None  # load_store checked the file's recorded hash against its content: no need to hash again
    if store:
        with safe_open(store_file, "pt") as handle:
            verified = handle.metadata()["content_hash"]
    check_store_head(head, store, where, actual=store_head(store, verified))
    return store


def check_segments_beside(pool_file: str, store: LongTermStore, where: str) -> LongTermStore:
    """Raise MemoryStateError unless the segment files of a disk-backed store (`store`, read from them) hold the
    store the pool file `pool_file` records (a lost, older, newer or replaced segment set is refused)."""
    with safe_open(pool_file, "pt") as handle:
        head = recorded_head(handle.metadata() or {})
    check_store_head(head, store, where, f"missing (no segment files in {SEGMENTS_DIR}/)")
    return store


def read_index_file(path: str | None) -> TensorFile | None:
    """A persisted retrieval index file as (tensors, metadata) (None: there is none); an unreadable one comes back
    as ({}, {"error": why}), refused where it is checked (`memory_scoring.check_index_file`) and indexed again."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        return read_tensor_file(path)
    except (SafetensorError, OSError) as err:
        return {}, {"error": f"{path} is truncated or corrupted ({err})"}


def local_entry_replaced(folder: str | None, name: str) -> bool:
    """Whether something that is not a regular file (a directory, a device, a dangling link) stands at `name`."""
    path = None if folder is None else os.path.join(folder, name)
    return path is not None and os.path.lexists(path) and not os.path.isfile(path)


# ---------------------------------------------------------------------------------------------- memory parts
@dataclasses.dataclass(frozen=True)
class MemoryPart:
    """One file of a memory beside the weights (in a checkpoint folder and a Hub file set).

    `encode(state, head)`: the file's (tensors, metadata), None when the state has nothing for it (`head`: the
    store's `folder_store_head`, computed once for all parts); `in_index`: its tensors
    are model buffers listed in the shard index (transformers loads them with the weights); `hub_key`: the field of
    `memory_state.json` recording the file's sha256 (None: not part of the Hub file set).
    """

    name: str
    file: str
    encode: Callable[..., TensorFile | None]
    in_index: bool
    hub_key: str | None
    # A folder part written by `stage(staging, old folder or None, target folder, state)` instead of `encode`.
    stage: Callable[..., None] | None = None


def _pool_file(state, head: dict) -> TensorFile:
    return compact_pool(state, head)


def _store_file(state, head: dict) -> TensorFile | None:
    if isinstance(state.long_term, MPlusMemory):
        return state.long_term.to_tensors(), state.long_term.file_metadata(state.fingerprint)
    if not state.long_term or any(block.source for block in state.long_term):  # (disk-backed: segments)
        return None
    metadata = store_file_metadata(state.long_term, state.fingerprint, state.num_injections, head["content_hash"])
    return store_to_tensors(state.long_term), metadata


def _index_file(state, head: dict) -> TensorFile | None:
    return state.retrieval_index if state.long_term and not isinstance(state.long_term, MPlusMemory) else None


POOL_PART = MemoryPart("pool", MEMORY_FILE, _pool_file, in_index=False, hub_key="sha256")  # (see INDEX_POOL_KEY)
STORE_PART = MemoryPart("long-term store", LONG_TERM_FILE, _store_file, in_index=False, hub_key="long_term_sha256")
# The journal (a folder of records, see `memory_journal`): a full save writes none (the pool and store files hold
# everything), so it is dropped from the folder; records are appended by `append_journal_record`.
JOURNAL_PART = MemoryPart("journal", JOURNAL_DIR, lambda state, head: None, in_index=False, hub_key=None)
# A disk-backed store (`long_term_memory_storage="disk"`): a folder of segment files, staged by `stage_segments`.
SEGMENTS_PART = MemoryPart(
    "long-term segments", SEGMENTS_DIR, lambda state, head: None, in_index=False, hub_key="segments", stage=stage_segments
)
# The store's retrieval index (`memory_scoring`): derived data, checked block by block against the store when used.
INDEX_PART = MemoryPart(
    "retrieval index", RETRIEVAL_INDEX_FILE, _index_file, in_index=False, hub_key="retrieval_index_sha256"
)
MEMORY_PARTS: tuple[MemoryPart, ...] = (POOL_PART, STORE_PART, JOURNAL_PART, SEGMENTS_PART, INDEX_PART)
# Every memory file a folder can hold.
MEMORY_GROUP_FILES = tuple(part.file for part in MEMORY_PARTS)
# The parts of a Hub file set (a push is a full snapshot: no journal).
HUB_PARTS = tuple(part for part in MEMORY_PARTS if part.hub_key is not None)


def state_file_groups(state, head: dict | None = None) -> dict[str, TensorFile]:
    """The files this memory is saved in beside the weights: `{file name: (tensors, metadata)}`."""
    head = folder_store_head(state.long_term) if head is None else head
    groups = {}
    for part in MEMORY_PARTS:
        encoded = part.encode(state, head)
        if encoded is not None:
            groups[part.file] = encoded
    return groups


# ---------------------------------------------------------------------------------------------- checkpoint folder
def read_index(folder: str | None) -> dict | None:
    """The folder's shard index, or None."""
    if folder is None or not os.path.isfile(os.path.join(folder, INDEX_FILE)):
        return None
    with open(os.path.join(folder, INDEX_FILE)) as handle:
        index = json.load(handle)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"{os.path.join(folder, INDEX_FILE)} is not a shard index (no weight_map)")
    return index


def model_owned_files(folder: str | None) -> set[str]:
    """Files a `save_pretrained` of the model owns in `folder`: its index, the files the index names, and a single
    weights file. A new save supersedes all of them (other files, like a tokenizer or adapters, are kept)."""
    index = read_index(folder) or {"weight_map": {}}
    return {INDEX_FILE, WEIGHTS_FILE, *index["weight_map"].values()}


def stage_memory_files(
    staging: str, weights: str, groups: Mapping[str, TensorFile], state=None, old: str | None = None, target=None
) -> set[str]:
    """Write each memory file (`{file name: (tensors, metadata)}`) into `staging`, and an index there that lists the
    weights of folder `weights` (`staging` itself after a save, else the current folder, whose weight files are
    carried over) and points every indexed memory tensor at its file. Entries of the old index pointing at any
    memory file are replaced. With `state`, folder parts with a `stage` writer (segments) are staged too (`old`:
    the current version of folder `target`). Returns the old entries this supersedes."""
    group_files = set(MEMORY_GROUP_FILES) | set(groups)
    for file_name, (tensors, metadata) in groups.items():
        write_tensor_file(os.path.join(staging, file_name), tensors, metadata)
    if state is not None:
        for part in MEMORY_PARTS:
            if part.stage is not None:
                part.stage(staging, old, os.fspath(target), state)
    dropped = {INDEX_FILE, *group_files}
    index = read_index(weights)
    if index is None:
        if not os.path.isfile(os.path.join(weights, WEIGHTS_FILE)):
            raise FileNotFoundError(f"{weights} has no {WEIGHTS_FILE} or {INDEX_FILE} to list the memory in")
        # A single weights file becomes shard 1 of 1, so the index (which lists the memory file) is what loads.
        if weights == staging:
            os.replace(os.path.join(staging, WEIGHTS_FILE), os.path.join(staging, SINGLE_SHARD))
        else:
            link_tree(os.path.join(weights, WEIGHTS_FILE), os.path.join(staging, SINGLE_SHARD))
            dropped.add(WEIGHTS_FILE)
        with safe_open(os.path.join(staging, SINGLE_SHARD), "pt") as handle:
            index = {"metadata": {}, "weight_map": dict.fromkeys(handle.keys(), SINGLE_SHARD)}
    # parts in the index are model buffers (the index loads them); the others are read by the model itself
    indexed = {part.file for part in MEMORY_PARTS if part.in_index}
    stored = {name: file_name for file_name, (tensors, _) in groups.items() if file_name in indexed for name in tensors}
    weight_map = {k: v for k, v in index["weight_map"].items() if k not in stored and v not in group_files}
    weight_map.update(stored)
    index["weight_map"] = dict(sorted(weight_map.items()))
    write_index(os.path.join(staging, INDEX_FILE), pool_index(index) if MEMORY_FILE in groups else index)
    return dropped


def pool_index(index: dict) -> dict:
    """A shard index that names the pool file in its metadata (`INDEX_POOL_KEY`) and lists no tensor in it (an
    older index's entries for the pool file are dropped)."""
    weight_map = {key: file for key, file in index.get("weight_map", {}).items() if file != MEMORY_FILE}
    metadata = {**(index.get("metadata") or {}), INDEX_POOL_KEY: MEMORY_FILE}
    return {**index, "metadata": metadata, "weight_map": weight_map}


def write_index(path: str, index: dict) -> None:
    """A shard index file, written atomically."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(index, handle, indent=2)

    atomic_write(path, dump)


def check_unchanged(folder: str, expected_hash: str | None, state_class) -> None:
    """Raise MemoryChangedOnDiskError when `folder`'s memory is not the one with `expected_hash` (None: no check)."""
    if expected_hash is None:
        return
    found = folder_head(folder, state_class)
    if found != expected_hash:
        raise MemoryChangedOnDiskError(
            f"the memory in {folder} changed since it was loaded (another process saved it): not overwritten. "
            "Load the folder again to continue from the saved memory, or save this memory to another folder"
        )


def save_memory_to_folder(folder: str | os.PathLike, state, expected_hash: str | None = None) -> None:
    """Replace the memory files of a model folder (weights untouched), crash-safely and under the folder lock.

    With `expected_hash`, refuses (MemoryChangedOnDiskError, nothing written) when the folder's memory is no longer
    the one with that hash: another process saved it since this memory was loaded.
    """
    state.validate()

    def write(staging: str, old: str | None) -> set[str]:
        if old is None:
            raise FileNotFoundError(f"{folder} does not exist; save the whole model with save_pretrained")
        check_unchanged(old, expected_hash, type(state))
        dropped = stage_memory_files(staging, old, state_file_groups(state), state, old, folder)
        return dropped | stage_previous(staging, old)

    update_folder(folder, write)


def save_model_folder(folder: str | os.PathLike, save_weights, state, expected_hash=None) -> None:
    """A whole model folder: `save_weights(staging)` writes weights, config and code, then the memory files; the old
    folder is swapped for the new one at the end (see `update_folder`)."""
    state.validate()

    def write(staging: str, old: str | None) -> set[str]:
        if old is not None:
            check_unchanged(old, expected_hash, type(state))
        save_weights(staging)
        groups = state_file_groups(state)
        dropped = model_owned_files(old) | stage_memory_files(staging, staging, groups, state, old, folder)
        return dropped | stage_previous(staging, old)

    update_folder(folder, write)


def stage_previous(staging: str, old: str | None) -> set[str]:
    """Keep the memory that a full save replaces (the old folder's memory files: pool, store, journal, segments) in
    `PREVIOUS_DIR` of the new folder being written in `staging` (hard links: the cost on disk is the old files that
    the new memory no longer shares, about one pool and store file). One generation: the older one is dropped.
    Returns the old entries this supersedes."""
    if old is None or not os.path.isfile(os.path.join(old, MEMORY_FILE)):
        return set()
    previous = os.path.join(staging, PREVIOUS_DIR)
    os.mkdir(previous)
    for name in MEMORY_GROUP_FILES:
        if os.path.lexists(os.path.join(old, name)):
            link_tree(os.path.join(old, name), os.path.join(previous, name))
    return {PREVIOUS_DIR}


def read_folder_base(folder: str | os.PathLike, state_class, with_store: bool = True):
    """The memory files of a model folder, fully checked, without its journal (`memory_journal.read_folder_memory`
    replays it): the pool file and the long-term store (its file, or the segment files of a disk-backed store),
    refused when it belongs to another model than the pool file says, or is not the store the pool file records:
    missing, replaced, older or newer. `with_store=False`: the pool alone (the store is being dropped on purpose)."""
    folder = os.fspath(folder)
    pool_path, store_path = os.path.join(folder, MEMORY_FILE), os.path.join(folder, LONG_TERM_FILE)
    state = read_state_file(pool_path, state_class)
    if not with_store:
        return state
    if not os.path.lexists(store_path) and os.path.isdir(os.path.join(folder, SEGMENTS_DIR)):
        try:
            store = read_segments(folder, state.fingerprint)
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None
        check_segments_beside(pool_path, store, folder)
    else:
        store = read_store_beside(
            pool_path, store_path if os.path.isfile(store_path) else None, state.fingerprint, state.num_injections,
            folder, replaced=local_entry_replaced(folder, LONG_TERM_FILE),
        )
    if store:
        state = dataclasses.replace(state, long_term=store)
        state.validate()
        state.retrieval_index = read_index_file(os.path.join(folder, RETRIEVAL_INDEX_FILE))
    return state


_HUB_LOAD_ARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "subfolder")


def checkpoint_fetcher(
    source, load_kwargs: dict, connection_errors: bool = True
) -> tuple[Callable[[str], str | None], str | None]:
    """(`fetch(file name) -> local path or None`, the local folder or None) for what `from_pretrained(source,
    **load_kwargs)` reads: a local folder, or the Hub cache (`connection_errors=False`: None when unreachable)."""
    source, subfolder = os.fspath(source), load_kwargs.get("subfolder") or ""
    folder = os.path.join(source, subfolder) if os.path.isdir(os.path.join(source, subfolder)) else None

    def fetch(name: str) -> str | None:
        if folder is not None:
            return os.path.join(folder, name) if os.path.isfile(os.path.join(folder, name)) else None
        from transformers.utils import cached_file

        hub = {key: load_kwargs[key] for key in _HUB_LOAD_ARGS if key in load_kwargs}
        return cached_file(
            source,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=connection_errors,
            **hub,
        )

    return fetch, folder


def checkpoint_memory_file(source, load_kwargs: dict) -> tuple[str | None, set[str] | None, str | None]:
    """What `from_pretrained(source, **load_kwargs)` just read about the memory: (the file holding the `memory`
    tensor, the memory buffers the checkpoint lists (None: unknown, e.g. a .bin checkpoint), the local folder)."""
    if source is None:
        return None, None, None
    fetch, folder = checkpoint_fetcher(source, load_kwargs)
    index = fetch(INDEX_FILE)
    if index is not None:
        content = read_json_object(index, INDEX_FILE)
        if (content.get("metadata") or {}).get(INDEX_POOL_KEY) == MEMORY_FILE:  # the pool file, not in the index
            path = fetch(MEMORY_FILE)
            if path is None:
                raise MemoryStateError(
                    f"{source}: {MEMORY_FILE} is missing (the index says the memory is there); restore it "
                    f"({way_back(folder)}), or start with an empty memory by deleting the \"{INDEX_POOL_KEY}\" "
                    f"entry of {INDEX_FILE}"
                )
            return path, set(MEMORY_BUFFERS), folder
        weight_map = content.get("weight_map", {})
        keys, name = {key for key in MEMORY_BUFFERS if key in weight_map}, weight_map.get("memory")
    else:
        name = WEIGHTS_FILE
        path = fetch(name)
        if path is None:
            return None, None, folder
        with safe_open(path, "pt") as handle:
            keys = set(handle.keys()) & set(MEMORY_BUFFERS)
    return (fetch(name) if name is not None and "memory" in keys else None), keys, folder


def checkpoint_file(source, load_kwargs: dict, name: str) -> str | None:
    """Local path of file `name` of what `from_pretrained(source, **load_kwargs)` read (None: it has none, or the
    Hub is unreachable)."""
    fetch, _ = checkpoint_fetcher(source, load_kwargs, connection_errors=False)
    return fetch(name)


# ---------------------------------------------------------------------------------------------- Hub file set
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold an object (a list, null or broken JSON is refused with a clear error)."""
    try:
        with open(path) as handle:
            content = json.load(handle)
    except ValueError as err:
        raise MemoryStateError(f"{what} is not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise MemoryStateError(f"{what} must hold a JSON object, got {type(content).__name__}")
    return content


def write_hub_files(folder: str, state, extra: Mapping) -> dict:
    """Write the memory's part files (refusing a broken memory) and `memory_state.json` (the pool file's metadata,
    `extra`, and each file's sha256) into `folder`; returns that metadata."""
    state.validate()
    head = folder_store_head(state.long_term)
    metadata = {**describe_state(state, head), **extra}
    for file_name, (tensors, file_metadata) in state_file_groups(state, head).items():
        write_tensor_file(os.path.join(folder, file_name), tensors, file_metadata)
    for part in HUB_PARTS:
        path = os.path.join(folder, part.file)
        if os.path.isfile(path):
            metadata[part.hub_key] = sha256_file(path)
    segments = hub_segments(os.path.join(folder, SEGMENTS_DIR), state.long_term, state.fingerprint)
    if segments:
        metadata[SEGMENTS_PART.hub_key] = segments
    with open(os.path.join(folder, MEMORY_STATE_FILE), "w") as handle:
        json.dump(metadata, handle, indent=2)
    return metadata


def hub_segments(directory: str, store: LongTermStore, fingerprint: str | None) -> dict[str, dict]:
    """Put a disk-backed store's segment files into `directory` (hard links of the segments its blocks are mapped
    from, new files for blocks held elsewhere; the blocks are not changed) and return `{name: {"sha256": the
    file's, "content_hash": its tensors'}}` (a memory-only push compares content hashes to skip segments the
    revision already holds)."""
    if not segment_store(store):
        return {}
    os.makedirs(directory, exist_ok=True)
    loose: list = []
    files = []

    def flush() -> None:
        if loose:
            tensors, metadata = store_to_tensors(tuple(loose)), store_file_metadata(tuple(loose), fingerprint)
            path = os.path.join(directory, segment_name(tuple(loose)))
            save_file(tensors, path, metadata={"format": "pt", **metadata})
            files.append(path)
            loose.clear()

    for source, run in segment_runs(store):
        if source is not None and segment_fingerprint(source) == fingerprint:
            flush()
            target = os.path.join(directory, os.path.basename(source))
            if not os.path.exists(target):
                link_tree(source, target)
            files.append(target)
        elif source is not None:  # a spilled segment (no fingerprint): rewritten with the model's, same bounds
            flush()
            loose.extend(run)
            flush()
        else:
            loose.extend(run)
    flush()
    listed = {}
    for path in files:  # (the bytes of a rewritten segment may differ: safetensors orders metadata at random)
        with safe_open(path, "pt") as handle:
            content = (handle.metadata() or {}).get("content_hash")
        listed[os.path.basename(path)] = {"sha256": sha256_file(path), "content_hash": content}
    return listed


def hub_file_names(metadata: Mapping) -> tuple[list[str], list[str]]:
    """(files a memory push adds, memory files it removes) for a `write_hub_files` metadata (segments are
    `long_term/NAME`; which of them a push must upload is decided against the remote's `memory_state.json`)."""
    present = [part.file for part in HUB_PARTS if isinstance(metadata.get(part.hub_key), str)]
    segments = [f"{SEGMENTS_DIR}/{name}" for name in metadata.get(SEGMENTS_PART.hub_key) or {}]
    absent = [part.file for part in HUB_PARTS if part.hub_key not in metadata and part.stage is None]
    return [*present, *segments, MEMORY_STATE_FILE], absent


def read_hub_segments(fetch: Callable[[str], str | None], metadata: Mapping, fingerprint: str | None):
    """The disk-backed store a `memory_state.json` lists (`segments`: {name: sha256}), each file fetched, matched
    against its sha256, memory-mapped and checked; () when it lists none."""
    segments = metadata.get(SEGMENTS_PART.hub_key) or {}
    if not isinstance(segments, dict) or not all(isinstance(entry, dict) for entry in segments.values()):
        raise MemoryStateError(f"{MEMORY_STATE_FILE}: segments must be an object {{name: {{sha256, content_hash}}}}")
    store: list = []
    for name in sorted(segments):
        path = fetch(f"{SEGMENTS_DIR}/{name}")
        if path is None or sha256_file(path) != segments[name].get("sha256"):
            raise MemoryStateError(
                f"{SEGMENTS_DIR}/{name} is missing or does not match {MEMORY_STATE_FILE}; load it again or pin a "
                "commit sha"
            )
        blocks = load_store(path, fingerprint, mapped=True)
        if store and blocks and blocks[0].injection <= store[-1].injection:
            raise MemoryStateError(f"{SEGMENTS_DIR}/{name} overlaps the segment before it: the store is corrupted")
        store.extend(blocks)
    return tuple(store)


def read_hub_files(fetch: Callable[[str], str | None], state_class, where: str):
    """(the memory, its `memory_state.json` content) of a Hub file set; `fetch(name)` downloads one file (None: the
    revision has none). Every file must match the sha256 that `memory_state.json` records for it."""
    state_path, memory_path = fetch(MEMORY_STATE_FILE), fetch(MEMORY_FILE)
    if memory_path is None:
        raise ValueError(f"{where} has no {MEMORY_FILE}; push one with model.push_memory_to_hub")
    metadata = {} if state_path is None else read_json_object(state_path, MEMORY_STATE_FILE)
    if metadata.get(POOL_PART.hub_key) not in (None, sha256_file(memory_path)):
        raise MemoryStateError(
            f"{MEMORY_FILE} does not match the sha256 in {MEMORY_STATE_FILE} (the branch moved during the "
            "download, or an upload was incomplete); load it again or pin a commit sha"
        )
    state = read_state_file(memory_path, state_class)
    if metadata.get("content_hash") not in (None, state.content_hash()):
        raise MemoryStateError(f"{MEMORY_FILE} does not match the content_hash in {MEMORY_STATE_FILE}")
    if state.fingerprint is None:
        state.fingerprint = metadata.get("fingerprint")
    if STORE_PART.hub_key not in metadata and SEGMENTS_PART.hub_key in metadata:
        try:
            store = read_hub_segments(fetch, metadata, state.fingerprint)
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None
        check_segments_beside(memory_path, store, where)
        index = read_index_file(fetch(RETRIEVAL_INDEX_FILE)) if INDEX_PART.hub_key in metadata else None
        return dataclasses.replace(state, long_term=store, retrieval_index=index), metadata
    store_path = fetch(LONG_TERM_FILE) if STORE_PART.hub_key in metadata else None  # (memory_state.json lists it)
    recorded_sha = metadata.get(STORE_PART.hub_key)
    if recorded_sha is not None and (store_path is None or sha256_file(store_path) != recorded_sha):
        raise MemoryStateError(
            f"{LONG_TERM_FILE} is missing or does not match {MEMORY_STATE_FILE}; load it again or pin a commit sha"
        )
    store = read_store_beside(memory_path, store_path, state.fingerprint, state.num_injections, where)
    index = read_index_file(fetch(RETRIEVAL_INDEX_FILE)) if INDEX_PART.hub_key in metadata and store else None
    return dataclasses.replace(state, long_term=store, retrieval_index=index), metadata

