"""Memory on disk: the three layouts (a single-file memory state, a checkpoint folder, a Hub file set), their readers
and writers, and every format constant.

* Single file (`MemoryState.save` / `.load`, snapshots, training checkpoints): the pool's tensors, and the long-term
  store's if any, in one safetensors file whose metadata (`describe_state`) records geometry, counters and hashes.
* Checkpoint folder (`save_pretrained`, `memoryllm-hf inject`): weights as transformers writes them, plus one file per
  memory part (`MEMORY_PARTS`: the pool in `memory.safetensors`, listed in the shard index so the pool buffers load
  with the weights; the store in `long_term_memory.safetensors`, read by the model). Updates are folder swaps
  (`atomic_io.update_folder`).
* Hub file set (`push_memory_to_hub`): the same part files plus `memory_state.json` (the pool file's metadata, the
  files' sha256 and versions), committed together.

A new part of a memory on disk (a store head record, a segment store, a write-ahead log) is one `MemoryPart` plus
its entry in `MEMORY_PARTS`: folders, Hub pushes and loads, and `memoryllm-hf stats` go through that table.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .atomic_io import atomic_write, link_tree, read_tensor_file, update_folder, write_tensor_file
from .memory_fields import MEMORY_BUFFERS, REQUIRED_BUFFERS, MemoryChangedOnDiskError, MemoryStateError, dtype_name
from .memory_store import (
    STORE_TENSORS,
    LongTermStore,
    LongTermStoreError,
    store_content_hash,
    store_from_tensors,
    store_num_slots,
    store_to_tensors,
)

# ---------------------------------------------------------------------------------------------- format constants
MEMORY_FILE = "memory.safetensors"
LONG_TERM_FILE = "long_term_memory.safetensors"
MEMORY_STATE_FILE = "memory_state.json"  # Hub: describes the pushed memory
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model-00001-of-00001.safetensors"
STATE_FORMAT = "memoryllm-hf/memory-state/1"
STORE_FORMAT = "memoryllm-hf/long-term-store/1"
# Metadata fields of a memory file (and of the Hub's memory_state.json) that must agree with its tensors.
COUNTERS = ("num_hidden_layers", "num_memory_tokens", "hidden_size", "filled_slots", "injections")

TensorFile = tuple[dict[str, torch.Tensor], dict[str, str]]  # (tensors, metadata) of one safetensors file


# ---------------------------------------------------------------------------------------------- single-file state
def describe_state(state) -> dict:
    """The metadata schema of a memory file (also the core of the Hub's `memory_state.json`): format, geometry,
    counters, K, the model fingerprint, the content hash and every tensor's dtype and shape."""
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
        "tensors": {
            name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for name, t in state.as_buffers().items()
        },
    }
    return {key: value for key, value in info.items() if value is not None}


def state_metadata(state) -> dict[str, str]:
    """`describe_state` as safetensors metadata (str -> str)."""
    return {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in describe_state(state).items()}


def write_state_file(path: str | os.PathLike, state) -> None:
    """One file holding the whole memory (pool and long-term store, each with its hash), written atomically."""
    state.validate()
    metadata = state_metadata(state)
    if state.long_term:
        metadata["long_term_hash"] = store_content_hash(state.long_term)
    write_tensor_file(os.fspath(path), {**state.as_buffers(), **store_to_tensors(state.long_term)}, metadata)


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
        raise MemoryStateError(f"{path} is truncated or corrupted ({err}); restore it from a backup") from err
    try:
        return decode_state_file(tensors, metadata, state_class)
    except MemoryStateError as err:
        raise MemoryStateError(f"{path}: {err}") from None


def decode_state_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], state_class):
    """The checked `state_class` of a memory file's (tensors, metadata)."""
    described = "memory_state" in metadata  # older files carry only {"format": "pt"}
    required = MEMORY_BUFFERS if described else REQUIRED_BUFFERS
    missing = [name for name in required if name not in tensors]
    if missing:
        raise MemoryStateError(f"not a memory state: tensors {missing} are missing")
    try:
        long_term = store_from_tensors({name: tensors.pop(name) for name in STORE_TENSORS if name in tensors})
    except LongTermStoreError as err:
        raise MemoryStateError(str(err)) from None
    if long_term and metadata.get("long_term_hash") != store_content_hash(long_term):
        raise MemoryStateError("corrupted: its long-term store differs from the hash recorded when it was saved")
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
    if described:
        try:
            recorded = json.loads(metadata.get("tensors", "null"))
        except ValueError:
            recorded = None
        actual = describe_state(state)
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
    if expected is not None and expected != state.content_hash():
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
def store_file_metadata(store: LongTermStore, fingerprint: str | None = None) -> dict[str, str]:
    """Metadata of a store file: format, geometry, counts, content hash (and the model's fingerprint)."""
    L, _, d = store[0].slots.shape
    metadata = {
        "long_term_store": STORE_FORMAT,
        "num_layers": str(L),
        "hidden_size": str(d),
        "slots": str(store_num_slots(store)),
        "injections": str(len(store)),
        "content_hash": store_content_hash(store),
    }
    if fingerprint is not None:
        metadata["fingerprint"] = fingerprint
    return metadata


def save_store(path: str | os.PathLike, store: LongTermStore, fingerprint: str | None = None) -> None:
    """Write the store to one safetensors file, atomically, with its hash (and the model's fingerprint)."""
    if not store:
        raise LongTermStoreError("the long-term store is empty: there is nothing to save")
    write_tensor_file(os.fspath(path), store_to_tensors(store), store_file_metadata(store, fingerprint))


def load_store(path: str | os.PathLike, fingerprint: str | None = None) -> LongTermStore:
    """Read a file written by `save_store`; refuses a truncated or corrupted file, a hash mismatch and (when
    `fingerprint` is given and the file records one) another model's store."""
    path = os.fspath(path)
    try:
        tensors, metadata = read_tensor_file(path)
    except (SafetensorError, OSError) as err:
        raise LongTermStoreError(f"{path} is truncated or corrupted ({err}); restore it from a backup") from err
    extra = sorted(set(tensors) - set(STORE_TENSORS))
    if extra or metadata.get("long_term_store") != STORE_FORMAT:
        raise LongTermStoreError(f"{path} is not a long-term store file (format {metadata.get('long_term_store')!r}, "
                                 f"unexpected tensors {extra})")
    recorded = metadata.get("fingerprint")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise LongTermStoreError(
            f"{path} belongs to another model (fingerprint {recorded}, this model's is {fingerprint})"
        )
    store = store_from_tensors(tensors)
    if metadata.get("content_hash") != store_content_hash(store):
        raise LongTermStoreError(f"{path} is corrupted: its content differs from the hash recorded when it was saved")
    return store


# ---------------------------------------------------------------------------------------------- memory parts
@dataclasses.dataclass(frozen=True)
class MemoryPart:
    """One file of a memory beside the weights (in a checkpoint folder and a Hub file set).

    `encode(state)`: the file's (tensors, metadata), None when the state has nothing for it; `in_index`: its tensors
    are model buffers listed in the shard index (transformers loads them with the weights); `hub_key`: the field of
    `memory_state.json` recording the file's sha256.
    """

    name: str
    file: str
    encode: Callable[..., TensorFile | None]
    in_index: bool
    hub_key: str


def _pool_file(state) -> TensorFile:
    return state.as_buffers(), state_metadata(state)


def _store_file(state) -> TensorFile | None:
    if not state.long_term:
        return None
    return store_to_tensors(state.long_term), store_file_metadata(state.long_term, state.fingerprint)


POOL_PART = MemoryPart("pool", MEMORY_FILE, _pool_file, in_index=True, hub_key="sha256")
STORE_PART = MemoryPart("long-term store", LONG_TERM_FILE, _store_file, in_index=False, hub_key="long_term_sha256")
MEMORY_PARTS: tuple[MemoryPart, ...] = (POOL_PART, STORE_PART)
# Every memory file a folder can hold.
MEMORY_GROUP_FILES = tuple(part.file for part in MEMORY_PARTS)


def state_file_groups(state) -> dict[str, TensorFile]:
    """The files this memory is saved in beside the weights: `{file name: (tensors, metadata)}`."""
    groups = {}
    for part in MEMORY_PARTS:
        encoded = part.encode(state)
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


def stage_memory_files(staging: str, weights: str, groups: Mapping[str, TensorFile]) -> set[str]:
    """Write each memory file (`{file name: (tensors, metadata)}`) into `staging`, and an index there that lists the
    weights of folder `weights` (`staging` itself after a save, else the current folder, whose weight files are
    carried over) and points every indexed memory tensor at its file. Entries of the old index pointing at any
    memory file are replaced. Returns the old entries this supersedes."""
    group_files = set(MEMORY_GROUP_FILES) | set(groups)
    for file_name, (tensors, metadata) in groups.items():
        write_tensor_file(os.path.join(staging, file_name), tensors, metadata)
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
    write_index(os.path.join(staging, INDEX_FILE), index)
    return dropped


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
    found = recorded_content_hash(os.path.join(folder, MEMORY_FILE), state_class)
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
        return stage_memory_files(staging, old, state_file_groups(state))

    update_folder(folder, write)


def save_model_folder(folder: str | os.PathLike, save_weights, state, expected_hash=None) -> None:
    """A whole model folder: `save_weights(staging)` writes weights, config and code, then the memory files; the old
    folder is swapped for the new one at the end (see `update_folder`)."""
    state.validate()

    def write(staging: str, old: str | None) -> set[str]:
        if old is not None:
            check_unchanged(old, expected_hash, type(state))
        save_weights(staging)
        return model_owned_files(old) | stage_memory_files(staging, staging, state_file_groups(state))

    update_folder(folder, write)


def read_folder_memory(folder: str | os.PathLike, state_class):
    """The whole memory saved in a model folder, fully checked: the pool file and, when present, the long-term
    store file (refused when it belongs to another model than the pool file says)."""
    state = read_state_file(os.path.join(os.fspath(folder), MEMORY_FILE), state_class)
    store_path = os.path.join(os.fspath(folder), LONG_TERM_FILE)
    if os.path.isfile(store_path):
        try:
            store = load_store(store_path, state.fingerprint)
        except LongTermStoreError as err:
            raise MemoryStateError(str(err)) from None
        state = dataclasses.replace(state, long_term=store)
        state.validate()
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
        weight_map = read_json_object(index, INDEX_FILE).get("weight_map", {})
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
    metadata = {**describe_state(state), **extra}
    for file_name, (tensors, file_metadata) in state_file_groups(state).items():
        write_tensor_file(os.path.join(folder, file_name), tensors, file_metadata)
    for part in MEMORY_PARTS:
        path = os.path.join(folder, part.file)
        if os.path.exists(path):
            metadata[part.hub_key] = sha256_file(path)
    with open(os.path.join(folder, MEMORY_STATE_FILE), "w") as handle:
        json.dump(metadata, handle, indent=2)
    return metadata


def hub_file_names(metadata: Mapping) -> tuple[list[str], list[str]]:
    """(files a memory push adds, memory files it removes) for a `write_hub_files` metadata."""
    present = [part.file for part in MEMORY_PARTS if part.hub_key in metadata]
    return [*present, MEMORY_STATE_FILE], [part.file for part in MEMORY_PARTS if part.hub_key not in metadata]


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
    if STORE_PART.hub_key in metadata:
        store_path = fetch(LONG_TERM_FILE)
        if store_path is None or sha256_file(store_path) != metadata[STORE_PART.hub_key]:
            raise MemoryStateError(
                f"{LONG_TERM_FILE} is missing or does not match {MEMORY_STATE_FILE}; load it again or pin a commit sha"
            )
        state = dataclasses.replace(state, long_term=load_store(store_path, state.fingerprint))
    return state, metadata

