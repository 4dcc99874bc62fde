"""The memory's one home on disk and its field table: `MemoryState.empty`, the field table driving buffers, state,
file format and conversion, the memory parts of folders and Hub pushes, `stats` showing the long-term store, the
chunking shared by `inject` and the evaluation replay, the model's declared state objects, the one dtype helper."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_folder import save_tiny_folder

from memoryllm_hf import cli
from memoryllm_hf.evaluation.replay import QuestionChain, chunk_writes
from memoryllm_hf.modeling import (
    MEMORY_FIELDS,
    MemoryLlamaForCausalLM,
    MemoryState,
    MemoryStateError,
    torch_dtype,
)
from memoryllm_hf.modeling.memory_fields import MEMORY_BUFFERS
from memoryllm_hf.modeling.memory_files import (
    INDEX_FILE,
    LONG_TERM_FILE,
    MEMORY_FILE,
    RETRIEVAL_INDEX_FILE,
    hub_file_names,
    write_hub_files,
)
from memoryllm_hf.modeling.memory_state_api import MemoryOrigin, Snapshots, SparePool, UndoHistory
from memoryllm_hf.modeling.memory_text import CallNumbers, split_ids
from memoryllm_hf.tiny import tiny_model

MODELING = Path(__file__).resolve().parents[1] / "modeling"
NOTES = "Alice lives in Paris and works as a baker. Bob keeps three cats; the oldest one is called Pepper!"


def ids(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ MemoryState.empty and the field table
@pytest.mark.parametrize("seed", [0, 7])
def test_empty_state_is_what_reset_memory_installs(seed):
    model = tiny_model()
    model.inject(ids(1))
    model.reset_memory(seed)
    empty = MemoryState.empty(model.config, seed)
    empty.validate()
    assert empty.content_hash() == model.memory_state().content_hash()
    assert empty.num_filled_slots == empty.num_injections == 0 and not empty.long_term
    assert empty.num_update_tokens == model.config.num_update_tokens
    other = MemoryState.empty(model.config, seed + 1)
    assert not torch.equal(other.rng_state, empty.rng_state)  # the seed picks the drop generator
    assert MemoryState.empty(model.config, seed, dtype=torch.bfloat16).memory.dtype == torch.bfloat16


def test_a_new_model_holds_the_empty_state_apart_from_its_random_pool():
    model = tiny_model()
    state, empty = model.memory_state(), MemoryState.empty(model.config)
    for field in MEMORY_FIELDS:
        if field.name != "memory":  # `_init_weights` draws the (unread) empty pool at random
            assert torch.equal(getattr(state, field.name), getattr(empty, field.name)), field.name


def test_field_table_drives_buffers_state_and_file():
    model = tiny_model()
    buffers = [name for name, _ in model.named_buffers() if name.startswith("memory")]
    assert buffers == list(MEMORY_BUFFERS) == [field.buffer for field in MEMORY_FIELDS]
    tensor_fields = [f.name for f in dataclasses.fields(MemoryState)][: len(MEMORY_FIELDS)]
    assert tensor_fields == [field.name for field in MEMORY_FIELDS]  # MemoryState's attributes follow the table
    state = model.memory_state()
    geometry = tuple(state.memory.shape)
    for field in MEMORY_FIELDS:
        tensor = getattr(state, field.name)
        assert tensor.dtype == field.dtype(state.memory.dtype) and tuple(tensor.shape) == field.shape(geometry)
    assert list(state.as_buffers()) == list(MEMORY_BUFFERS)
    assert state.clone().content_hash() == state.content_hash()


def test_saved_file_and_folder_index_list_exactly_the_table(tmp_path):
    model = tiny_model(memory_update="input", fresh_pool="grow", long_term_memory_tokens=60)
    model.inject(ids(0))
    model.memory_state().save(tmp_path / "state.safetensors")
    with safe_open(tmp_path / "state.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert set(MEMORY_BUFFERS) <= names and names - set(MEMORY_BUFFERS) == {
        "long_term_slots", "long_term_injection", "long_term_call", "long_term_token_ids", "long_term_token_counts"
    }
    model.save_pretrained(tmp_path / "folder")
    index = json.loads((tmp_path / "folder" / INDEX_FILE).read_text())
    # the pool file is named in the index's metadata, its tensors are not listed (they hold the filled slots only)
    assert MEMORY_FILE not in index["weight_map"].values() and index["metadata"]["memory_file"] == MEMORY_FILE
    with safe_open(tmp_path / "folder" / MEMORY_FILE, "pt") as handle:
        assert set(handle.keys()) == set(MEMORY_BUFFERS)
    assert (tmp_path / "folder" / LONG_TERM_FILE).is_file()  # the store part: a file, not in the index


def test_an_older_file_without_an_optional_field_gets_its_fresh_value(tmp_path):
    model = tiny_model()
    model.inject(ids(0))
    state = model.memory_state()
    optional = [field for field in MEMORY_FIELDS if not field.required]
    assert optional  # written_at: files from before slot ages were recorded
    legacy = MemoryState.from_buffers({f.buffer: getattr(state, f.name) for f in MEMORY_FIELDS if f.required})
    for field in optional:
        fresh = field.fresh(tuple(state.memory.shape), state.memory.dtype, 0)
        assert torch.equal(getattr(legacy, field.name), fresh)


# ------------------------------------------------------------------ memory parts: folder and Hub file set
def test_memory_parts_table_drives_the_hub_file_set(tmp_path):
    model = tiny_model(memory_update="input", fresh_pool="grow", long_term_memory_tokens=60)
    (tmp_path / "pool").mkdir()
    metadata = write_hub_files(str(tmp_path / "pool"), model.memory_state(), {})
    # (no retrieval index either: a push without one removes the remote's, see memory_scoring)
    assert hub_file_names(metadata) == ([MEMORY_FILE, "memory_state.json"], [LONG_TERM_FILE, RETRIEVAL_INDEX_FILE])
    model.inject(ids(0))
    (tmp_path / "both").mkdir()
    metadata = write_hub_files(str(tmp_path / "both"), model.memory_state(), {})
    added, removed = hub_file_names(metadata)
    assert added == [MEMORY_FILE, LONG_TERM_FILE, "memory_state.json"] and removed == [RETRIEVAL_INDEX_FILE]
    assert all((tmp_path / "both" / name).is_file() for name in added)


# ------------------------------------------------------------------ stats shows the long-term store
def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_stats_shows_the_long_term_store(tmp_path, capsys):
    folder = save_tiny_folder(
        tmp_path / "model", memory_update="input", fresh_pool="grow", long_term_memory_tokens=600
    )
    code, out, _ = run_cli(capsys, "stats", folder)
    assert code == 0 and "long-term     empty (bound 600 slots per layer)" in out
    for text in (NOTES, "The meeting moved to Thursday at 10 am."):
        assert run_cli(capsys, "inject", folder, "--text", text)[0] == 0
    code, out, _ = run_cli(capsys, "stats", folder)
    assert code == 0
    # the injections are in the folder's journal (the store file is written by the next compaction)
    assert not (folder / LONG_TERM_FILE).exists()
    model = MemoryLlamaForCausalLM.from_pretrained(folder)
    model.save_memory(folder, compact=True)  # a full save writes the store file
    with safe_open(folder / LONG_TERM_FILE, "pt") as handle:
        injection = handle.get_tensor("long_term_injection")
        slots = handle.get_tensor("long_term_slots")
    blocks = len(torch.unique(injection))
    assert f"long-term     {blocks} injections (2 texts, injections 1-{blocks}), {slots.shape[1]}/600 slots" in out
    assert f"{slots.shape[0]} layers x {slots.shape[2]}" in out
    # the store is validated: a corrupted store file is refused, saying so
    raw = bytearray((folder / LONG_TERM_FILE).read_bytes())
    raw[-8:] = b"\x7f" * 8
    (folder / LONG_TERM_FILE).write_bytes(bytes(raw))
    code, out, err = run_cli(capsys, "stats", folder)
    assert code == 1 and "corrupted" in out + err


def test_stats_of_a_folder_without_a_store(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path / "model")
    code, out, _ = run_cli(capsys, "stats", folder)
    assert code == 0 and "long-term     off (bound 0 slots per layer)" in out


# ------------------------------------------------------------------ chunking: inject and the replay share it
def test_replay_chunks_and_call_numbers_are_injects():
    model = tiny_model(memory_update="input", fresh_pool="grow", long_term_memory_tokens=600)
    texts = [ids(1, 37), ids(2, 9), ids(3, 25)]
    writes = [w for i, t in enumerate(texts) for w in chunk_writes(f"t{i}", t.tolist(), 13, 2)]
    assert [w.ids.shape[1] for w in writes] == [t.shape[1] for x in texts for t in split_ids(x, 13)]
    start = model.memory_state()
    chain = QuestionChain(model, start, None)
    chain.write(writes)
    replayed = chain.pool.materialize()
    model.load_memory_state(start)
    for text in texts:
        model.inject(text, chunk_size=13)
    assert [b.call for b in replayed.long_term] == [b.call for b in model.long_term_memory] == [1, 1, 1, 4, 5, 5]


def test_call_numbers_follow_texts():
    calls = CallNumbers()
    assert [calls(text, n) for n, text in enumerate("aabbba", start=3)] == [3, 3, 5, 5, 5, 8]


def test_split_ids_is_near_equal_and_bounded():
    chunks = split_ids(torch.arange(37), 13)
    assert [c.shape for c in chunks] == [torch.Size([1, 13]), torch.Size([1, 12]), torch.Size([1, 12])]
    assert torch.equal(torch.cat(chunks, dim=1)[0], torch.arange(37))


# ------------------------------------------------------------------ declared state objects
def test_model_declares_its_memory_keeping_objects():
    model = tiny_model()
    kinds = {"undo_history": UndoHistory, "memory_snapshots": Snapshots, "spare_pool": SparePool,
             "memory_origin": MemoryOrigin}
    for name, kind in kinds.items():
        assert isinstance(vars(model)[name], kind), name  # created in __init__, not on first use
    for path in ("memory_state_api.py", "memory_hub.py", "memory_state.py", "memory_files.py"):
        assert "__dict__" not in (MODELING / path).read_text(), path


def test_undo_history_keeps_depth_and_hands_pools_to_the_spare():
    history, spare = UndoHistory(), SparePool()
    states = [MemoryState.empty(tiny_model().config) for _ in range(3)]
    for before in states:
        history.record(before, torch.zeros(1), 2, spare, recycle=True)
    assert [entry[0] for entry in history.entries] == states[1:]
    with pytest.raises(ValueError, match="replaced since the last inject"):
        history.pop(torch.zeros(1), 2)
    assert not history.entries


def test_snapshots_refuse_bad_names_and_say_which_exist():
    snapshots = Snapshots()
    with pytest.raises(ValueError, match="non-empty"):
        snapshots.put(" ", MemoryState.empty(tiny_model().config))
    snapshots.put("a", MemoryState.empty(tiny_model().config))
    with pytest.raises(KeyError, match=r"snapshots: a\)"):
        snapshots.get("b")


# ------------------------------------------------------------------ the one dtype helper
def test_one_dtype_helper_in_the_remote_code():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(torch.float16) is torch.float16
    assert torch_dtype(None) is None
    with pytest.raises(ValueError, match="not a torch dtype"):
        torch_dtype("bf16")
    with pytest.raises(ValueError, match="not a torch dtype"):
        torch_dtype("Tensor")
    for path in MODELING.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args:
                owner = node.args[0]
                if path.name != "memory_fields.py" and isinstance(owner, ast.Name) and owner.id == "torch":
                    pytest.fail(f"{path.name}:{node.lineno} turns a name into a dtype: use memory_fields.torch_dtype")


def test_memory_state_error_is_the_one_from_the_field_table():
    from memoryllm_hf.modeling import memory_fields

    assert MemoryStateError is memory_fields.MemoryStateError
