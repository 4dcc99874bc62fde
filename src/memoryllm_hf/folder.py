"""A MemoryLlama folder as the command line uses it: load it, read input text, save its memory, describe it."""

import codecs
import contextlib
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import Timeout

from .modeling import (
    MemoryState,
    MPlusMemory,
    folder_head,
    folder_lock,
    is_blank_text,
    read_folder_memory,
    restore_previous,
    save_memory_to_folder,
)

HISTOGRAM_BINS = 10
HISTOGRAM_WIDTH = 40
MAX_TEXT_BYTES = 256 * 2**20  # --file larger than this is refused (split it): reading is not streamed


def folder_config(folder: str | Path) -> dict:
    """config.json of a MemoryLlama folder; a clear error for anything else."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); make one with memoryllm-hf convert")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}: the folder is broken")
    if config.get("model_type") != "memory_llama":
        raise ValueError(
            f"{folder} holds a {config.get('model_type')!r} model, not MemoryLlama; "
            "convert it first with `memoryllm-hf convert`"
        )
    return config


def folder_memory(folder: str | Path, with_store: bool = True) -> MemoryState:
    """The memory saved in a folder (the pool and the long-term store, with its journal replayed), fully checked
    (truncated, corrupted or non-finite files are refused, and a store or segment set that is not the one the pool
    file records: missing, replaced, older or newer). `with_store=False`: the pool alone (journal replayed)."""
    return read_folder_memory(folder, MemoryState, with_store)


def drop_store(folder: str | Path) -> int | None:
    """Drop a folder's long-term store on purpose, keeping its pool (after the store file was lost or damaged, or to
    forget what it holds): the folder then records an empty store (the pool file, its journal replayed, is rewritten;
    a store file or a disk-backed store's segment files are removed). Returns how many stored injections were dropped
    (None: the store was missing or unreadable)."""
    with locked(folder):
        pool = folder_memory(folder, with_store=False)
        try:
            dropped = len(folder_memory(folder).long_term)
        except (ValueError, OSError):
            dropped = None
        expected = folder_head(folder, MemoryState)  # (the journal's head, else the pool file's hash)
        save_memory_to_folder(folder, dataclasses.replace(pool, long_term=()), expected_hash=expected)
    return dropped


def restore_previous_memory(folder: str | Path) -> MemoryState:
    """Bring back the memory a folder held before its last full memory save (`save_pretrained`, a journal
    compaction, `drop-store`), kept in FOLDER/previous_memory/ (one generation; the replaced memory is kept there in
    its place, so restoring twice gives it back). Checked fully before anything changes; crash-safe (a folder swap).
    Returns the restored memory."""
    return restore_previous(folder, MemoryState)


def check_folder(folder: str | Path) -> list[str]:
    """Check what `memoryllm-hf stats` reports on (ValueError/OSError naming the broken file): config.json's memory
    settings, every weights file the index lists (present, readable), the pool and its long-term store (one memory).
    Returns the report line saying what was checked."""
    from safetensors import SafetensorError, safe_open
    from transformers.utils import SAFE_WEIGHTS_NAME

    from .modeling import INDEX_FILE, MemoryLlamaConfig

    MemoryLlamaConfig.from_pretrained(folder)  # every memory setting (NaN, bounds, dtypes, read modes)
    index_path = Path(folder) / INDEX_FILE
    files = [SAFE_WEIGHTS_NAME]
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{index_path} is not a shard index (no weight_map): the folder is broken")
        files = sorted(set(index["weight_map"].values()))
    for name in files:
        try:
            with safe_open(str(Path(folder) / name), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{Path(folder) / name} (weights) is missing or broken ({err}); restore it") from None
    return [f"checked       config.json, {len(files)} weight file{'s' * (len(files) != 1)}, the pool and the "
            "long-term store (one memory)"]


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold the folder's lock (other memoryllm-hf processes and savers wait); says so when it has to wait."""
    lock = folder_lock(folder)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"waiting for another process that is updating {folder} ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def save_memory(folder: str | Path, model, overwrite: bool = False) -> str:
    """Save the model's memory into the folder (crash-safe, locked; weights are not touched; injections since the
    memory was loaded are appended to the folder's journal, see `model.save_memory`); returns the folder's head.
    Refuses (MemoryChangedOnDiskError) when another process saved the folder's memory since this one was loaded
    from it, unless `overwrite`."""
    return model.save_memory(folder, overwrite=overwrite)


def read_text(file: str | None, text: str | None, encoding: str = "utf-8") -> str:
    """The text to inject, from `--file` or `--text`: undecodable or blank input gets an error saying what to do."""
    source = file if file is not None else "--text"
    if file is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (try utf-8, latin-1, cp1252, utf-16)") from None
        with open(file, "rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
        if len(raw) > MAX_TEXT_BYTES:
            raise ValueError(f"{file} is larger than {MAX_TEXT_BYTES >> 20} MiB: split it and inject the parts")
        try:
            text = raw.decode("utf-8-sig" if encoding.replace("_", "-").lower() == "utf-8" else encoding)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{file} is not {encoding} text (byte {raw[err.start]:#04x} at offset {err.start}); convert it "
                f"(e.g. `iconv -f latin1 -t utf-8 {file}`) or name its encoding with --encoding"
            ) from None
    if not text or is_blank_text(text):
        raise ValueError(f"{source} is empty or whitespace only: there is nothing to inject")
    return text


def replaced_slots(before: MemoryState, after: MemoryState) -> int:
    """How many stored memory slots (per layer) the update between two states dropped: slots of `before` no
    longer in `after` (slots are copied bit for bit, so a slot that survived is found unchanged)."""

    def stored(state: MemoryState) -> Counter:
        pool = state.memory[0, state.num_slots - state.num_filled_slots :].contiguous()
        return Counter(row.view(torch.uint8).numpy().tobytes() for row in pool)

    return sum((stored(before) - stored(after)).values())


def histogram_lines(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> list[str]:
    """A text histogram, one line per bin: `low - high | ###### count`."""
    values = values.float()
    low, high = float(values.min()), float(values.max())
    if high == low:  # one value: no bins to draw (they would be 1e-7 wide)
        return [f"{low:9.4g} (every value) | {'#' * HISTOGRAM_WIDTH} {values.numel()}"]
    counts = torch.histc(values, bins=bins, min=low, max=high).long().tolist()
    edges = torch.linspace(low, high, bins + 1).tolist()
    peak = max(max(counts), 1)
    bars = ["#" * round(HISTOGRAM_WIDTH * count / peak) for count in counts]
    return [
        f"{edges[i]:9.4g} - {edges[i + 1]:<9.4g} | {bar:<{HISTOGRAM_WIDTH}} {count}"
        for i, (bar, count) in enumerate(zip(bars, counts, strict=True))
    ]


def memory_report(state: MemoryState, config: dict, folder: str | Path | None = None) -> list[str]:
    """Human-readable description of a memory: geometry, update rule, fill level, injections, slot ages and norms,
    the long-term store, and (with `folder`) the folder's memory files: journal, previous memory."""
    L, N, d = state.memory.shape
    filled = state.num_filled_slots
    lines = [
        f"pool          {L} layers x {N} slots x {d} ({str(state.memory.dtype).removeprefix('torch.')})",
        f"update        K={config.get('num_update_tokens')} slots per injection, rule {config.get('memory_update')!r}, "
        f"pool {config.get('fresh_pool')!r}",
        f"injections    {state.num_injections}",
        f"filled        {filled}/{N} slots per layer",
        f"content hash  {state.content_hash()[:16]}",
    ]
    if filled:
        written = state.written_at[:, N - filled :]
        known = written[written > 0]
        if known.numel():
            ages = (state.num_injections - known).float()  # injections since the slot was written (0 = newest)
            lines.append(
                f"slot ages     in injections since written: mean {float(ages.mean()):.4g}, "
                f"max {int(ages.max())} ({known.numel()} of {written.numel()} slots known)"
            )
            lines += ["slot age histogram (all layers):"] + ["  " + line for line in histogram_lines(ages)]
        else:
            lines.append("slot ages     unknown (the slots were written before ages were recorded)")
        norms = state.memory[:, N - filled :].float().norm(dim=-1)
        lines.append(
            f"slot norms    mean {float(norms.mean()):.4g}, min {float(norms.min()):.4g}, max {float(norms.max()):.4g}"
        )
        lines += ["slot norm histogram (all layers):"] + ["  " + line for line in histogram_lines(norms.flatten())]
    return lines + store_report(state, config) + ([] if folder is None else disk_report(folder))


def _mib(size: int) -> str:
    return f"{size / 2**20:.4g} MiB"


def _tree_bytes(path: Path, only_unshared: bool = False) -> int:
    """Bytes of a file or folder tree (`only_unshared`: files with no other hard link, i.e. what it alone costs)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return sum(p.stat().st_size for p in files if not only_unshared or p.stat().st_nlink == 1)


def disk_report(folder: str | Path) -> list[str]:
    """Lines describing a folder's memory files: the pool and store files, the journal since the last full save
    (records, bytes, when it compacts), the previous memory kept for `restore-previous` (what it alone costs)."""
    from .modeling import LONG_TERM_FILE, MEMORY_FILE, PREVIOUS_DIR, SEGMENTS_DIR, journal_status, whole_pool_bytes

    folder = Path(folder)
    pool = folder / MEMORY_FILE
    if not pool.is_file():
        return []
    store = _tree_bytes(folder / LONG_TERM_FILE) + _tree_bytes(folder / SEGMENTS_DIR)
    lines = [f"files         pool {_mib(pool.stat().st_size)} (whole pool {_mib(whole_pool_bytes(str(pool)))}), "
             f"store {_mib(store)}"]
    journal = journal_status(folder)
    records = journal["records"]
    bound = f"compacts past {journal['max_records']} records or {_mib(journal['max_bytes'])}"
    if records:
        lines.append(f"journal       {len(records)} record{'s' * (len(records) != 1)} (injections {records[0][0]}-"
                     f"{records[-1][1]}), {_mib(journal['bytes'])} since the last full save ({bound})")
    else:
        lines.append(f"journal       empty: the last save was a full one ({bound})")
    previous = folder / PREVIOUS_DIR
    if previous.is_dir():
        lines.append(f"previous      the memory before the last full save, in {PREVIOUS_DIR}/ "
                     f"({_mib(_tree_bytes(previous, only_unshared=True))} of its own; `memoryllm-hf restore-previous`)")
    return lines


def store_report(state: MemoryState, config: dict) -> list[str]:
    """Lines describing the long-term store (every injection's slots, `long_term_memory.safetensors`)."""
    bound = config.get("long_term_memory_tokens") or 0
    store = state.long_term
    if isinstance(store, MPlusMemory):
        tensors = store.to_tensors()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        return [
            f"long-term     M+: {store.slot_counts} slots per layer, {store.num_pending} pending, "
            f"{store.commits} injections since the last merge (every {config.get('long_term_merge_every')})",
            f"store size    {size / 2**20:.4g} MiB ({str(store.pending_slots.dtype).removeprefix('torch.')})",
        ]
    if not store:
        return [f"long-term     {'empty' if bound else 'off'} (bound {bound} slots per layer)"]
    slots = sum(block.num_slots for block in store)
    first = store[0].slots
    size = sum(block.slots.numel() * block.slots.element_size() for block in store)
    texts = len({block.call for block in store})
    return [
        f"long-term     {len(store)} injections ({texts} texts, "
        f"injections {store[0].injection}-{store[-1].injection}), "
        f"{slots}/{bound} slots per layer",
        f"store size    {size / 2**20:.4g} MiB ({str(first.dtype).removeprefix('torch.')}, "
        f"{first.shape[0]} layers x {first.shape[2]})",
    ]


def png_path(path: str | Path) -> Path:
    """Where `--png PATH` writes: PATH itself when it ends in .png, else PATH.png (a folder is refused)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / 'slot_norms.png'}")
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


def plot_slot_norms(state: MemoryState, path: str | Path) -> None:
    """PNG histogram of the filled slots' norms, one curve per layer (written to `png_path(path)`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = state.num_filled_slots
    if not filled:
        raise ValueError("the memory is empty: there are no slot norms to plot")
    norms = state.memory[:, state.num_slots - filled :].float().norm(dim=-1)
    figure, axes = plt.subplots(figsize=(7, 4))
    for layer, layer_norms in enumerate(norms):
        axes.hist(layer_norms.numpy(), bins=30, histtype="step", label=f"layer {layer}")
    axes.set_xlabel("slot norm")
    axes.set_ylabel("slots")
    injections = f"{state.num_injections} injection{'s' * (state.num_injections != 1)}"
    axes.set_title(f"memory slot norms ({filled} filled slots per layer, {injections})")
    if len(norms) <= 12:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(png_path(path), dpi=100)
    plt.close(figure)
