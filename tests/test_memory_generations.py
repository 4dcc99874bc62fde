"""A memory on disk costs what it holds and leaves a way back: a pool file keeps only the filled slots (restored bit
for bit on every load path; older whole-pool files still load), and a full save keeps the memory it replaces in
`previous_memory/`, which `restore-previous` brings back (checked first, crash-safe at every file-system step)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from test_memory_journal import FS_STEPS, _fail_at, same_memory

from memoryllm_hf import cli, restore_previous_memory
from memoryllm_hf.folder import folder_memory
from memoryllm_hf.modeling import MemoryLlamaForCausalLM, MemoryState, MemoryStateError, atomic_io, memory_journal
from memoryllm_hf.modeling.atomic_io import write_tensor_file
from memoryllm_hf.modeling.memory_fields import MEMORY_BUFFERS
from memoryllm_hf.modeling.memory_files import (
    INDEX_FILE,
    JOURNAL_DIR,
    LONG_TERM_FILE,
    MEMORY_FILE,
    PREVIOUS_DIR,
    state_metadata,
)
from memoryllm_hf.tiny import tiny_model

STORE = {"memory_update": "input", "fresh_pool": "grow", "long_term_memory_tokens": 60}


def filling_model(injections: int = 2, **overrides):
    """A model whose pool is filling up from empty (zeros, as from_base and reset_memory leave it)."""
    model = tiny_model(**{**STORE, **overrides})
    model.reset_memory()
    for seed in range(injections):
        model.inject(torch.randint(4, 100, (9,), generator=torch.Generator().manual_seed(seed)))
    return model


def file_shapes(path) -> dict:
    with safe_open(path, "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def make_old_layout(folder) -> None:
    """Rewrite a saved folder's pool file as older versions wrote it: the whole pool, listed in the shard index."""
    state = folder_memory(folder)
    write_tensor_file(os.path.join(folder, MEMORY_FILE), state.as_buffers(), state_metadata(state))
    index = json.loads((folder / INDEX_FILE).read_text())
    index["metadata"].pop("memory_file")
    index["weight_map"].update(dict.fromkeys(MEMORY_BUFFERS, MEMORY_FILE))
    (folder / INDEX_FILE).write_text(json.dumps(index))


# ------------------------------------------------------------------ pool files hold the filled slots
def test_a_filling_pool_file_holds_only_its_filled_slots_and_every_load_path_restores_it(tmp_path):
    model = filling_model()
    state = model.memory_state()
    L, N, d = state.memory.shape
    filled = state.num_filled_slots
    assert 0 < filled < N
    model.save_pretrained(tmp_path / "model")
    shapes = file_shapes(tmp_path / "model" / MEMORY_FILE)
    assert shapes["memory"] == (L, filled, d) and shapes["memory_written_at"] == (L, filled)
    # folder (transformers' from_pretrained), the folder reader, a state file
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model").memory_state(), state)
    assert same_memory(folder_memory(tmp_path / "model"), state)
    state.save(tmp_path / "state.safetensors")
    assert file_shapes(tmp_path / "state.safetensors")["memory"] == (L, filled, d)
    assert same_memory(MemoryState.load(tmp_path / "state.safetensors"), state)
    # the journal replays onto it; its compaction writes the filled slots again
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model")
    loaded.inject(torch.randint(4, 100, (9,)))
    loaded.save_memory(tmp_path / "model")
    assert os.listdir(tmp_path / "model" / JOURNAL_DIR)
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model").memory_state(),
                       loaded.memory_state())
    loaded.undo()  # (not an injection: a full save)
    loaded.save_memory(tmp_path / "model")
    assert not (tmp_path / "model" / JOURNAL_DIR).exists()
    assert file_shapes(tmp_path / "model" / MEMORY_FILE)["memory"] == (L, filled, d)
    assert same_memory(folder_memory(tmp_path / "model"), state)


@pytest.mark.parametrize("value", [1e-3, -0.0])
def test_a_pool_whose_empty_slots_are_not_zeros_is_kept_whole_bit_for_bit(tmp_path, value):
    model = filling_model()
    with torch.no_grad():
        model.memory[:, 0, 0] = value  # an empty slot (filled slots sit at the end of the pool)
    state = model.memory_state()
    model.save_pretrained(tmp_path / "model")
    assert file_shapes(tmp_path / "model" / MEMORY_FILE)["memory"] == tuple(state.memory.shape)
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model").memory
    assert torch.equal(loaded.view(torch.int32), state.memory.view(torch.int32))  # (-0.0 keeps its sign bit)


def test_a_pool_file_whose_slots_disagree_with_its_metadata_is_refused(tmp_path):
    filling_model().save_pretrained(tmp_path / "model")
    path = tmp_path / "model" / MEMORY_FILE
    with safe_open(path, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    write_tensor_file(str(path), tensors, {**metadata, "filled_slots": "1"})
    with pytest.raises(MemoryStateError, match=f"{MEMORY_FILE}.*filled slots"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model")


def test_older_whole_pool_files_still_load_and_the_next_save_keeps_only_the_filled_slots(tmp_path):
    model = filling_model()
    state = model.memory_state()
    model.save_pretrained(tmp_path / "model")
    make_old_layout(tmp_path / "model")
    assert file_shapes(tmp_path / "model" / MEMORY_FILE)["memory"] == tuple(state.memory.shape)
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model")
    assert same_memory(loaded.memory_state(), state) and same_memory(folder_memory(tmp_path / "model"), state)
    loaded.inject(torch.randint(4, 100, (9,)))  # a journal record onto the older pool file
    loaded.save_memory(tmp_path / "model")
    again = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model")
    assert same_memory(again.memory_state(), loaded.memory_state())
    again.save_pretrained(tmp_path / "model")
    assert file_shapes(tmp_path / "model" / MEMORY_FILE)["memory"][1] == again.num_filled_slots
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(tmp_path / "model").memory_state(),
                       loaded.memory_state())


# ------------------------------------------------------------------ the previous generation
def saved_twice(tmp_path, **overrides):
    """A folder saved twice (memories A, then B); returns (folder, A, B, the model)."""
    model = filling_model(**overrides)
    model.save_pretrained(tmp_path / "model")
    first = model.memory_state()
    model.inject(torch.randint(4, 100, (9,)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", first, model.memory_state(), model


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_full_save_keeps_the_previous_memory_and_restore_brings_it_back_exactly(tmp_path, storage):
    folder, first, second, model = saved_twice(tmp_path, long_term_memory_storage=storage)
    assert same_memory(folder_memory(folder / PREVIOUS_DIR), first)
    assert same_memory(restore_previous_memory(folder), first)
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(folder).memory_state(), first)
    restore_previous_memory(folder)  # the replaced memory was kept in its place: restoring again undoes it
    assert same_memory(folder_memory(folder), second)
    # one generation only: a third save replaces the first memory
    model.inject(torch.randint(4, 100, (9,)))
    model.save_pretrained(folder, overwrite_memory=True)
    assert same_memory(folder_memory(folder / PREVIOUS_DIR), second)


def test_a_journal_compaction_keeps_the_memory_it_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_journal, "MAX_JOURNAL_RECORDS", 2)
    monkeypatch.setattr(memory_journal, "MAX_JOURNAL_POOL_FRACTION", 1e6)
    model = filling_model()
    model.save_pretrained(tmp_path / "model")
    states = []
    for seed in range(3):  # two records, then a compaction
        model.inject(torch.randint(4, 100, (9,), generator=torch.Generator().manual_seed(10 + seed)))
        model.save_memory(tmp_path / "model")
        states.append(model.memory_state())
    assert not (tmp_path / "model" / JOURNAL_DIR).exists()
    assert os.listdir(tmp_path / "model" / PREVIOUS_DIR / JOURNAL_DIR)  # the replaced pool file and its journal
    assert same_memory(restore_previous_memory(tmp_path / "model"), states[1])


@pytest.mark.parametrize("broken", [MEMORY_FILE, LONG_TERM_FILE])
def test_a_truncated_memory_file_names_the_file_and_the_way_back(tmp_path, capsys, broken):
    folder, first, _, _ = saved_twice(tmp_path)
    path = folder / broken
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as caught:  # (a MemoryStateError for the pool file)
        MemoryLlamaForCausalLM.from_pretrained(folder)
    assert str(path) in str(caught.value) and f"memoryllm-hf restore-previous {folder}" in str(caught.value)
    assert cli.main(["restore-previous", str(folder)]) == 0
    assert "restored the previous memory" in capsys.readouterr().out
    assert same_memory(MemoryLlamaForCausalLM.from_pretrained(folder).memory_state(), first)


def test_restore_refuses_a_broken_or_missing_previous_memory_and_changes_nothing(tmp_path, capsys):
    model = filling_model()
    model.save_pretrained(tmp_path / "model")
    assert cli.main(["restore-previous", str(tmp_path / "model")]) == 1
    assert "keeps no previous memory" in capsys.readouterr().err
    folder, _, second, _ = saved_twice(tmp_path / "again")
    previous = folder / PREVIOUS_DIR / MEMORY_FILE
    previous.write_bytes(previous.read_bytes()[:100])
    with pytest.raises(MemoryStateError, match=str(previous)):
        restore_previous_memory(folder)
    assert same_memory(folder_memory(folder), second)


@pytest.mark.parametrize("step", [*FS_STEPS, "link", "exchange"])
def test_a_crash_at_any_step_of_a_restore_leaves_one_memory_or_the_other(tmp_path, monkeypatch, step):
    folder, first, second, _ = saved_twice(tmp_path)
    with monkeypatch.context() as patch:
        if step == "link":
            patch.setattr(atomic_io.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError("crash at link")))
        elif step == "exchange":
            patch.setattr(atomic_io, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError("crash at exchange")))
        else:
            _fail_at(patch, step, 1)
        try:
            restore_previous_memory(folder)
        except OSError:
            pass
    on_disk = MemoryLlamaForCausalLM.from_pretrained(folder).memory_state()
    assert same_memory(on_disk, first) or same_memory(on_disk, second)
    other = first if same_memory(on_disk, second) else second
    assert same_memory(folder_memory(folder / PREVIOUS_DIR), other)  # nothing lost either way
    assert not list(atomic_io.iter_orphans(str(folder))) or step in ("exchange",)


def test_stats_shows_the_journal_and_the_previous_memory(tmp_path, capsys, monkeypatch):
    from tiny_folder import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "model", **STORE)
    for text in ("Alice lives in Paris and works as a baker.", "The meeting moved to Thursday at 10 am."):
        assert cli.main(["inject", str(folder), "--text", text]) == 0
    capsys.readouterr()
    assert cli.main(["stats", str(folder)]) == 0
    out = capsys.readouterr().out
    records = sorted(os.listdir(folder / JOURNAL_DIR))
    held = sum((folder / JOURNAL_DIR / name).stat().st_size for name in records) / 2**20
    last = int(records[-1].split("-")[1].split(".")[0])
    assert f"journal       2 records (injections 1-{last}), {held:.4g} MiB" in out
    assert "previous" not in out
    model = MemoryLlamaForCausalLM.from_pretrained(folder)
    model.save_pretrained(folder)  # a full save
    assert cli.main(["stats", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "journal       empty" in out and "previous      the memory before the last full save" in out



def test_the_finiteness_check_is_exact():
    from memoryllm_hf.modeling.memory_fields import all_finite

    big = torch.full((10,), 3e38)  # finite values whose sum overflows: the element-wise check decides
    assert all_finite(big) and all_finite(torch.zeros(3, dtype=torch.bfloat16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            assert not all_finite(torch.tensor([1.0, bad, 2.0], dtype=dtype))
    assert not all_finite(torch.tensor([3e38, 3e38, float("nan")]))
