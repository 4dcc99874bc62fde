"""Saves that cost what changed: the memory journal of a checkpoint folder (records appended by `save_memory`,
replayed bit-exactly on every load path, compacted by a full save; crash-safe at every file-system step; corrupted,
missing and foreign records refused with the file named)."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_folder import save_tiny_folder

from memoryllm_hf import cli
from memoryllm_hf.commands import load_folder
from memoryllm_hf.modeling import (
    MemoryLlamaForCausalLM,
    MemoryState,
    MemoryStateError,
    atomic_io,
    memory_journal,
    read_folder_memory,
)
from memoryllm_hf.modeling.memory_files import JOURNAL_DIR, LONG_TERM_FILE, MEMORY_FILE, journal_record_paths
from memoryllm_hf.modeling.memory_state import MemoryChangedOnDiskError
from memoryllm_hf.tiny import tiny_model

STORE = {"memory_update": "input", "fresh_pool": "grow", "long_term_memory_tokens": 60}
DISK = {**STORE, "long_term_memory_storage": "disk"}
MAX_JOURNAL_RECORDS = 4


@pytest.fixture(autouse=True)
def journal_bounds(monkeypatch):
    """A journal of at most 4 records, whatever their bytes (tiny pools are smaller than their records)."""
    monkeypatch.setattr(memory_journal, "MAX_JOURNAL_RECORDS", MAX_JOURNAL_RECORDS)
    monkeypatch.setattr(memory_journal, "MAX_JOURNAL_POOL_FRACTION", 1e6)


def same_ids(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and torch.equal(x, y)))


def same_memory(a: MemoryState, b: MemoryState) -> bool:
    """Pool, counters, generator and written_at bit for bit, and the same long-term blocks (slots, numbers and the
    token ids they were written from)."""
    blocks = len(a.long_term) == len(b.long_term) and all(
        x.injection == y.injection and x.call == y.call and torch.equal(x.slots, y.slots)
        and same_ids(x.token_ids, y.token_ids)
        for x, y in zip(a.long_term, b.long_term, strict=False)
    )
    return a.content_hash() == b.content_hash() and blocks


def records(folder: Path) -> list[str]:
    return [os.path.basename(path) for _, _, path in journal_record_paths(folder)]


@pytest.fixture(params=["output-tile", "input-grow-store", "input-grow-disk"])
def saved(request, tmp_path):
    """A saved folder and the model loaded from it (the official rule with a tiled pool; the training-free rule
    with a growing pool and a long-term store in RAM, or on disk)."""
    overrides = {"output-tile": {}, "input-grow-store": STORE}.get(request.param, DISK)
    tiny_model(**overrides).save_pretrained(tmp_path / "model")
    return tmp_path / "model", MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model")


def test_a_save_after_injections_appends_one_record_that_replays_bit_exactly(saved):
    folder, model = saved
    pool_file = (folder / MEMORY_FILE).stat()
    model.inject(torch.randint(4, 100, (1, 40)))  # several chunks: one record holds them all
    model.inject(torch.randint(4, 100, (1, 9)), generator=torch.Generator().manual_seed(7))  # an external generator
    model.save_memory(folder)
    assert records(folder) == [f"{1:010d}-{model.num_injections:010d}.safetensors"]
    assert (folder / MEMORY_FILE).stat().st_ino == pool_file.st_ino  # the pool file was not rewritten
    # the store keeps the token ids of every block (lexical retrieval reads them): the record carries them
    assert all(block.token_ids is not None for block in model.memory_state().long_term)
    record = next((folder / JOURNAL_DIR).iterdir()).stat().st_size
    new_slots = sum(block.num_slots for block in model.memory_state().long_term) or 5 * 6  # (4 + 1 updates of K)
    slot_bytes = new_slots * model.config.num_hidden_layers * model.config.hidden_size * 4
    assert record < slot_bytes + 5056 + 4096  # the new slots, one generator state, numbers and a header
    for loaded in (MemoryLlamaForCausalLM.from_pretrained(folder), load_folder(folder)[0]):
        assert same_memory(loaded.memory_state(), model.memory_state())
        # the generator came back too: the next injection drops the same slots
        ids = torch.randint(4, 100, (1, 12))
        loaded.inject(ids)
        model.inject(ids)
        assert same_memory(loaded.memory_state(), model.memory_state())
        model.undo()
    assert same_memory(read_folder_memory(folder, MemoryState), model.memory_state())


def test_records_chain_and_compact_every_max_records(saved):
    folder, model = saved
    for round_ in range(MAX_JOURNAL_RECORDS):
        model.inject(torch.randint(4, 100, (1, 5)))
        model.save_memory(folder)
        assert len(records(folder)) == round_ + 1
    assert same_memory(read_folder_memory(folder, MemoryState), model.memory_state())
    model.inject(torch.randint(4, 100, (1, 5)))
    model.save_memory(folder)  # the journal is full: a compaction rewrites the files and drops it
    assert not (folder / JOURNAL_DIR).exists()
    assert MemoryState.load(folder / MEMORY_FILE).num_injections == model.num_injections
    assert same_memory(read_folder_memory(folder, MemoryState), model.memory_state())
    model.inject(torch.randint(4, 100, (1, 5)))
    model.save_memory(folder)
    assert len(records(folder)) == 1
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(folder).memory_state(), model.memory_state())


def test_a_journal_past_the_pool_files_bytes_is_compacted(saved, monkeypatch):
    folder, model = saved
    monkeypatch.setattr(memory_journal, "MAX_JOURNAL_POOL_FRACTION", 1.0)
    monkeypatch.setattr(memory_journal, "MAX_JOURNAL_RECORDS", 1000)
    held = []
    for _ in range(100):
        pool_bytes = (folder / MEMORY_FILE).stat().st_size
        model.inject(torch.randint(4, 100, (1, 7)))
        model.save_memory(folder)
        if not records(folder):
            break
        held.append(sum(path.stat().st_size for path in (folder / JOURNAL_DIR).glob("*")))
        # (a record's header and numbers are not counted in advance)
        assert held[-1] <= pool_bytes + 2048 * len(held)
    assert len(held) >= 2 and not records(folder)  # records were appended, then compacted at the bytes bound
    assert same_memory(read_folder_memory(folder, MemoryState), model.memory_state())


@pytest.mark.parametrize("change", ["undo", "reset", "restore", "load_state", "nothing"])
def test_other_changes_make_a_full_save(saved, change):
    folder, model = saved
    model.inject(torch.randint(4, 100, (1, 8)))
    model.save_memory(folder)
    model.snapshot("one")
    model.inject(torch.randint(4, 100, (1, 8)))
    if change == "undo":
        model.undo()
    elif change == "reset":
        model.reset_memory()
    elif change == "restore":
        model.restore("one")
    elif change == "load_state":
        model.load_memory_state(model.memory_state())
    else:
        model.save_memory(folder)
    before = records(folder)
    model.save_memory(folder)
    if change == "nothing":
        assert records(folder) == before  # nothing changed since the last save: nothing written
    else:
        assert records(folder) == []  # a full save
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(folder).memory_state(), model.memory_state())


def test_save_pretrained_elsewhere_then_save_memory_there(saved, tmp_path):
    folder, model = saved
    model.inject(torch.randint(4, 100, (1, 8)))
    model.save_pretrained(tmp_path / "other")
    model.inject(torch.randint(4, 100, (1, 8)))
    model.save_memory(tmp_path / "other")
    assert len(records(tmp_path / "other")) == 1
    assert same_memory(read_folder_memory(tmp_path / "other", MemoryState), model.memory_state())


def test_a_memory_saved_by_another_process_is_not_overwritten(saved):
    folder, model = saved
    stale = MemoryLlamaForCausalLM.from_pretrained(folder)
    model.inject(torch.randint(4, 100, (1, 8)))
    model.save_memory(folder)
    stale.inject(torch.randint(4, 100, (1, 8)))
    with pytest.raises(MemoryChangedOnDiskError, match="changed since it was loaded"):
        stale.save_memory(folder)
    assert same_memory(read_folder_memory(folder, MemoryState), model.memory_state())
    stale.save_memory(folder, overwrite=True)  # a full save of the stale memory, on purpose
    assert records(folder) == []
    assert same_memory(read_folder_memory(folder, MemoryState), stale.memory_state())


def _journal_folder(folder: Path, model, count: int = 3) -> None:
    for _ in range(count):
        model.inject(torch.randint(4, 100, (1, 7)))
        model.save_memory(folder)


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("truncate", "truncated or corrupted"),
        ("flip", "corrupted"),
        ("missing", "a record is missing"),
        ("foreign", "another memory|another model"),
        ("stray", "not a journal record"),
    ],
)
def test_broken_records_are_refused_naming_the_file(saved, tmp_path, breakage, match):
    folder, model = saved
    _journal_folder(folder, model)
    paths = sorted((folder / JOURNAL_DIR).iterdir())
    if breakage == "truncate":
        paths[1].write_bytes(paths[1].read_bytes()[:-50])
    elif breakage == "flip":
        raw = bytearray(paths[1].read_bytes())
        raw[-4] ^= 0xFF
        paths[1].write_bytes(bytes(raw))
    elif breakage == "missing":
        paths[1].unlink()
    elif breakage == "foreign":  # the same numbers, from another memory of this model
        other = tiny_model(**({} if model.config.memory_update == "output" else STORE))
        other.save_pretrained(tmp_path / "other")
        other = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "other", **model.config.to_diff_dict())
        torch.manual_seed(123)  # (tiny_model reseeded the global generator: other texts)
        _journal_folder(tmp_path / "other", other)
        shutil.copy(sorted((tmp_path / "other" / JOURNAL_DIR).iterdir())[1], paths[1])
    else:
        (folder / JOURNAL_DIR / "notes.txt").write_text("hello")
    name = {"stray": "notes.txt", "missing": paths[2].name}.get(breakage, paths[1].name)  # (the record after a gap)
    for load in (
        lambda: MemoryLlamaForCausalLM.from_pretrained(folder),
        lambda: read_folder_memory(folder, MemoryState),
        lambda: load_folder(folder),
    ):
        with pytest.raises(MemoryStateError, match=match) as err:
            load()
        assert name in str(err.value)


def test_a_record_of_another_model_is_refused(saved, tmp_path):
    folder, model = saved
    _journal_folder(folder, model, 1)
    other = tiny_model(seed=3, **({} if model.config.memory_update == "output" else STORE))
    other.save_pretrained(tmp_path / "other")
    other = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "other")
    _journal_folder(tmp_path / "other", other, 1)
    record = next((tmp_path / "other" / JOURNAL_DIR).iterdir())
    shutil.copy(record, folder / JOURNAL_DIR / record.name)
    with pytest.raises(MemoryStateError, match="another model") as err:
        MemoryLlamaForCausalLM.from_pretrained(folder)
    assert record.name in str(err.value)


# ------------------------------------------------------------------ crash safety at every file-system step
FS_STEPS = ["mkstemp", "save_file", "chmod", "fsync", "replace", "fsync_directory"]


def _fail_at(monkeypatch, step: str, nth: int) -> None:
    """Make the `nth` call of one file-system step of atomic writes raise (a crash at that point)."""
    calls = {"n": 0}

    def failing(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                raise OSError(f"simulated crash at {step}")
            return original(*args, **kwargs)

        return wrapper

    if step == "mkstemp":
        monkeypatch.setattr(atomic_io.tempfile, "mkstemp", failing(atomic_io.tempfile.mkstemp))
    elif step == "save_file":
        monkeypatch.setattr("memoryllm_hf.modeling.atomic_io.save_file", failing(atomic_io.save_file))
    elif step == "chmod":
        monkeypatch.setattr(atomic_io.os, "chmod", failing(os.chmod))
    elif step == "fsync":
        monkeypatch.setattr(atomic_io.os, "fsync", failing(os.fsync))
    elif step == "replace":
        monkeypatch.setattr(atomic_io.os, "replace", failing(os.replace))
    else:
        monkeypatch.setattr(atomic_io, "_fsync_directory", failing(atomic_io._fsync_directory))


@pytest.mark.parametrize("step", FS_STEPS)
@pytest.mark.parametrize("kind", ["append", "compaction"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_memory(saved, monkeypatch, step, kind):
    folder, model = saved
    _journal_folder(folder, model, MAX_JOURNAL_RECORDS - 1 if kind == "append" else MAX_JOURNAL_RECORDS)
    old = read_folder_memory(folder, MemoryState)
    model.inject(torch.randint(4, 100, (1, 7)))
    new = model.memory_state()
    with monkeypatch.context() as patch:
        _fail_at(patch, step, 1)
        try:
            model.save_memory(folder)
            crashed = False
        except OSError:
            crashed = True
    on_disk = read_folder_memory(folder, MemoryState)
    # crashed before the rename: the old memory; after it: the new one; never a mix
    assert same_memory(on_disk, old) or same_memory(on_disk, new)
    if step in ("mkstemp", "save_file", "chmod", "fsync", "replace"):
        assert crashed and same_memory(on_disk, old)
    loaded = MemoryLlamaForCausalLM.from_pretrained(folder)
    assert same_memory(loaded.memory_state(), on_disk)
    # the model still holds the new memory and can save it once the disk works again
    assert same_memory(model.memory_state(), new)
    model.save_memory(folder)
    assert same_memory(read_folder_memory(folder, MemoryState), new)


def test_a_killed_writer_leaves_only_a_temp_file_that_is_ignored_and_removed(saved):
    folder, model = saved
    _journal_folder(folder, model, 1)
    old = read_folder_memory(folder, MemoryState)
    # what a writer killed before its rename leaves: a temp file of a process that is gone
    orphan = folder / JOURNAL_DIR / f".tmp-999999999-{2:010d}-{2:010d}.safetensors-x"
    orphan.write_bytes(b"half a record")
    assert same_memory(read_folder_memory(folder, MemoryState), old)
    model.inject(torch.randint(4, 100, (1, 7)))
    model.save_memory(folder)
    assert not orphan.exists()
    assert same_memory(read_folder_memory(folder, MemoryState), model.memory_state())


def test_a_read_only_folder_gets_a_clear_error_and_keeps_both_memories(saved):
    folder, model = saved
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    _journal_folder(folder, model, 1)
    old = read_folder_memory(folder, MemoryState)
    model.inject(torch.randint(4, 100, (1, 7)))
    new = model.memory_state()
    os.chmod(folder / JOURNAL_DIR, 0o555)
    try:
        with pytest.raises(PermissionError):
            model.save_memory(folder)
    finally:
        os.chmod(folder / JOURNAL_DIR, 0o755)
    assert same_memory(read_folder_memory(folder, MemoryState), old) and same_memory(model.memory_state(), new)


# ------------------------------------------------------------------ the CLI
def test_cli_injects_append_records_and_every_load_path_replays_them(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path / "model", **STORE)
    for text in ("Alice lives in Paris and works as a baker.", "Bob keeps three cats."):
        assert cli.main(["inject", str(folder), "--text", text]) == 0
    assert len(records(folder)) == 2 and not (folder / LONG_TERM_FILE).exists()
    state = read_folder_memory(folder, MemoryState)
    assert state.num_injections == 3 and len(state.long_term) == 3  # (the first text is two updates)
    capsys.readouterr()
    assert cli.main(["stats", str(folder)]) == 0
    assert "injections    3" in capsys.readouterr().out
    model, _ = load_folder(folder)
    assert same_memory(model.memory_state(), state)
