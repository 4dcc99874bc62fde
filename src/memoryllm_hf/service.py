"""What the command line and `memoryllm-hf serve` do with one loaded MemoryLlama folder: answer, inject (saved into
the folder, crash-safely), describe, snapshot, restore and undo. The in-process commands and the server call the same
methods, so a command gives the same result with or without a server. Not thread-safe: one call at a time (the
server runs them all on one worker thread)."""

import os
from contextlib import contextmanager
from pathlib import Path

from .folder import check_folder, folder_config, memory_report, plot_slot_norms, png_path, replaced_slots, save_memory
from .greedy import reply
from .modeling import MemoryState

SNAPSHOT_FOLDER = "snapshots"


def snapshot_file(folder: str | os.PathLike, name: str) -> Path:
    """Where snapshot `name` of a folder's memory is kept: FOLDER/snapshots/NAME.safetensors."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[\w-][\w.-]*", name):
        raise ValueError(f"snapshot names are letters, digits, '_', '-' and '.', got {name!r}")
    return Path(folder) / SNAPSHOT_FOLDER / f"{name}.safetensors"


def take_snapshot(model, folder: str | os.PathLike, name: str) -> Path:
    """Keep the model's current memory as `name`: in the model and as FOLDER/snapshots/NAME.safetensors."""
    path = snapshot_file(folder, name)
    path.parent.mkdir(exist_ok=True)
    model.memory_state().save(path)  # registered only once saved
    model.snapshot(name)
    return path


def bring_back_snapshot(model, folder: str | os.PathLike, name: str) -> None:
    """Make snapshot `name` the model's memory: taken in this process, or else kept in the folder."""
    path = snapshot_file(folder, name)
    if name not in model.snapshots and path.is_file():
        model.load_memory_state(MemoryState.load(path))
    else:
        model.restore(name)


class FolderService:
    """A loaded folder (`model`, `tokenizer`) whose every memory change is saved into `folder` at once."""

    def __init__(self, folder: str | os.PathLike, model, tokenizer):
        self.folder, self.model, self.tokenizer = Path(folder), model, tokenizer
        self.config = folder_config(folder)
        self.saved_hash = model.memory_state().content_hash()  # the memory as loaded or last saved into the folder

    @contextmanager
    def read_mode(self, read_mode: str | None):
        """Read with `read_mode` ("pool" or "retrieve") for the block; None keeps the folder's. The read mode is a
        config field read at every forward, so it switches at run time (`model.config.read_mode = "pool"`)."""
        config = self.model.config
        previous = config.read_mode
        if read_mode is not None:
            config.read_mode = read_mode
        try:
            config.check_memory_settings()  # e.g. "retrieve" without a store: refused before any compute
            yield
        finally:
            config.read_mode = previous

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 128, read_mode: str | None = None) -> str:
        """Greedy answer to a conversation (`[{"role": ..., "content": ...}]`), read with the memory."""
        with self.read_mode(read_mode):
            return reply(self.model, self.tokenizer, messages, max_new_tokens)

    def ask(self, question: str, max_new_tokens: int = 128, read_mode: str | None = None) -> str:
        return self.chat([{"role": "user", "content": question}], max_new_tokens, read_mode)

    def warm_up(self) -> None:
        """Read the memory once for a one-token answer that is thrown away, so that what the first read of a process
        computes once per store (every stored block's retrieval features and their packing, a text scorer's index)
        is done before the first question (a server calls it before it answers)."""
        if self.model.memory_is_initialized or self.model.long_term_memory:
            reply(self.model, self.tokenizer, [{"role": "user", "content": "Hello"}], max_new_tokens=1)

    def save(self) -> None:
        """Save the memory into the folder: the injections since the last save are appended to its journal (a full
        save after an undo or a restore; `model.save_memory`); refused when another process changed the folder's
        memory meanwhile (the model knows the folder head it loaded or last saved)."""
        save_memory(self.folder, self.model)
        self.saved_hash = self.model.memory_state().content_hash()

    def inject(self, text: str, chunk_size: int | None = None, progress: bool = False) -> dict:
        """Write `text` into the memory and save it; the memory is unchanged (in the model and the folder) when the
        inject or the save fails."""
        before = self.model.memory_state()
        updates = self.model.inject(text, tokenizer=self.tokenizer, chunk_size=chunk_size, progress=progress)
        try:
            self.save()
        except BaseException:
            self.model.load_memory_state(before)
            raise
        after = self.model.memory_state()
        return {
            "updates": updates,
            "num_injections": after.num_injections,
            "replaced": replaced_slots(before, after),
            "filled_before": before.num_filled_slots,
            "filled": after.num_filled_slots,
            "num_slots": after.num_slots,
            "content_hash": self.saved_hash,
        }

    def stats(self, png: str | None = None) -> tuple[list[str], str | None]:
        """The lines of `memoryllm-hf stats` (after its header); with `png`, also the slot norm histogram (and the
        file it was written to)."""
        state = self.model.memory_state()
        if png:
            plot_slot_norms(state, png)
        return memory_report(state, self.config, self.folder) + check_folder(self.folder), png and str(png_path(png))

    def snapshot(self, name: str) -> Path:
        return take_snapshot(self.model, self.folder, name)

    def restore(self, name: str) -> None:
        """Bring back snapshot `name` and save it as the folder's memory."""
        before = self.model.memory_state()
        bring_back_snapshot(self.model, self.folder, name)
        try:
            self.save()
        except BaseException:
            self.model.load_memory_state(before)
            raise

    def undo(self) -> None:
        """Take back the last inject (see `undo` of the model) and save the memory."""
        self.model.undo()
        self.save()
