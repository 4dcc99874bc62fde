"""Trust: what a hostile user tried against the long-term store, the memory settings and odd inputs. Each test is one
failure that was found; every bad value gets a clear error that says what to pass, and the memory stays as it was.

(Issue "Trust", items 1-6 and 8; evaluation logs are tested in tests/test_evaluation.py.)
"""

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_folder import SENTENCES, tiny_tokenizer

from memoryllm_hf import cli, load
from memoryllm_hf.modeling import MemoryLlamaForCausalLM, MemoryState, MemoryStateError
from memoryllm_hf.tiny import tiny_config, tiny_model

TOKENIZER = tiny_tokenizer()
STORE = {"memory_update": "input", "fresh_pool": "grow", "long_term_memory_tokens": 60, "read_mode": "retrieve"}
STORE_FILE = "long_term_memory.safetensors"
POOL_FILE = "memory.safetensors"


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def within(seconds: int):
    """Fail (instead of hanging the run) when the block takes longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def store_model(**overrides):
    model = tiny_model(**{**STORE, **overrides})
    for sentence in SENTENCES[:3]:
        model.inject(sentence, tokenizer=TOKENIZER)
    return model


def assert_refused(model, action, error=ValueError, match: str | None = None) -> None:
    """`action()` raises `error` (message matching `match`) and the memory (pool and store) is unchanged."""
    before = model.memory_state()
    with pytest.raises(error, match=match):
        action()
    after = model.memory_state()
    assert after.content_hash() == before.content_hash()
    assert [b.injection for b in after.long_term] == [b.injection for b in before.long_term]


def edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config, indent=2))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """A tiny retrieval folder whose store holds three injections."""
    folder = tmp_path_factory.mktemp("store") / "model"
    store_model().save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return folder


@pytest.fixture
def store_folder(store_template, tmp_path) -> Path:
    return Path(shutil.copytree(store_template, tmp_path / "model"))


def tensors_digest(tensors: dict) -> str:
    """The content hash a memory file records (names, dtypes, shapes, bytes): forged files stay self-consistent."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def rewrite_store(folder: Path, tensors: dict | None = None, **metadata_changes) -> None:
    """Rewrite the folder's store file with other tensors (re-hashed) and/or metadata fields (None removes one)."""
    path = folder / STORE_FILE
    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata())
    if tensors is None:
        tensors = load_file(path)
    else:
        order = ("long_term_slots", "long_term_injection", "long_term_call",  # the order the hash is taken in
                 "long_term_token_ids", "long_term_token_counts")
        metadata["content_hash"] = tensors_digest({name: tensors[name] for name in order if name in tensors})
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = str(value)
    path.unlink()
    save_file(tensors, path, metadata=metadata)


def forge_pool_head(folder: Path, head: dict | None = None) -> None:
    """Make the pool file record the folder's store file as its store (or record `head`; {} removes the record, as
    in files saved before it existed)."""
    with safe_open(folder / STORE_FILE, "pt") as handle:
        store_metadata = handle.metadata()
    injections = load_file(folder / STORE_FILE)["long_term_injection"]
    if head is None:
        head = {"newest_injection": int(injections.max()), "injections": int(injections.unique().numel()),
                "slots": int(injections.numel()), "content_hash": store_metadata["content_hash"]}
    with safe_open(folder / POOL_FILE, "pt") as handle:
        metadata = dict(handle.metadata())
    metadata.pop("long_term_head")
    if head:
        metadata["long_term_head"] = json.dumps(head)
    tensors = load_file(folder / POOL_FILE)
    (folder / POOL_FILE).unlink()
    save_file(tensors, folder / POOL_FILE, metadata=metadata)


# ---------------------------------------------------------------------------------------------- 1. the hang
def test_huge_retrieval_neighbors_is_refused_by_the_config():
    with pytest.raises(ValueError, match="retrieval_neighbors"):
        tiny_config(**STORE, retrieval_neighbors=10**9)


def test_huge_retrieval_neighbors_set_later_is_refused_before_a_read():
    model = store_model()
    model.config.retrieval_neighbors = 10**9
    with within(10), pytest.raises(ValueError, match="retrieval_neighbors"):
        model(TOKENIZER("Where does Bob live?", return_tensors="pt")["input_ids"])


def test_selecting_injections_costs_no_more_than_the_store_whatever_the_neighbours():
    from memoryllm_hf.modeling.memory_reader import select_injections

    scores = torch.tensor([0.1, 0.9, 0.5])
    with within(10):
        chosen = select_injections(scores, [6, 6, 6], [1, 1, 1], budget=18, neighbors=10**9)
    assert chosen == [0, 1, 2]


def test_ask_with_huge_retrieval_neighbors_in_config_json_answers_with_an_error(store_folder, capsys):
    edit_config(store_folder, retrieval_neighbors=10**9)
    with within(30):
        code, _, err = run_cli(capsys, "ask", store_folder, "Where does Bob live?", "--max-new-tokens", 2)
    assert code == 1 and "retrieval_neighbors" in err


# ---------------------------------------------------------------------------------------------- 2/3. one memory
def _drop_store(folder: Path) -> None:
    (folder / STORE_FILE).unlink()


def _store_as_directory(folder: Path) -> None:
    (folder / STORE_FILE).unlink()
    (folder / STORE_FILE).mkdir()


def _store_as_dev_null(folder: Path) -> None:
    (folder / STORE_FILE).unlink()
    os.symlink(os.devnull, folder / STORE_FILE)


STORE_DAMAGE = pytest.mark.parametrize(
    "damage", [_drop_store, _store_as_directory, _store_as_dev_null], ids=["deleted", "directory", "dev-null"]
)


@STORE_DAMAGE
def test_a_missing_store_is_refused_by_from_pretrained(store_folder, damage):
    damage(store_folder)
    with pytest.raises(ValueError, match=STORE_FILE):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)


@STORE_DAMAGE
def test_a_missing_store_is_refused_by_ask_and_stats(store_folder, damage, capsys):
    damage(store_folder)
    code, _, err = run_cli(capsys, "ask", store_folder, "Where does Bob live?", "--max-new-tokens", 2)
    assert code == 1 and STORE_FILE in err
    code, _, err = run_cli(capsys, "stats", store_folder)
    assert code == 1 and STORE_FILE in err


def test_inject_never_saves_over_a_missing_store(store_folder, capsys):
    injections = MemoryState.load(store_folder / POOL_FILE).num_injections
    _drop_store(store_folder)
    code, _, err = run_cli(capsys, "inject", store_folder, "--text", SENTENCES[3])
    assert code == 1 and STORE_FILE in err
    assert not (store_folder / STORE_FILE).exists()
    assert MemoryState.load(store_folder / POOL_FILE).num_injections == injections


def inject_and_compact(capsys, folder, text: str) -> None:
    """Inject through the CLI (a journal record: the pool and store files stay as they were), then compact the
    folder, so that its pool and store files are rewritten and hold the new memory."""
    assert run_cli(capsys, "inject", folder, "--text", text)[0] == 0
    assert (folder / "memory_journal").is_dir()
    model = MemoryLlamaForCausalLM.from_pretrained(folder)
    model.save_memory(folder, compact=True)
    assert not (folder / "memory_journal").exists()


def test_an_older_store_beside_a_newer_pool_is_refused(store_folder, tmp_path, capsys):
    older = tmp_path / "older"
    shutil.copytree(store_folder, older)
    inject_and_compact(capsys, store_folder, SENTENCES[3])
    shutil.copy(older / STORE_FILE, store_folder / STORE_FILE)
    with pytest.raises(ValueError, match=STORE_FILE):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)
    code, _, err = run_cli(capsys, "inject", store_folder, "--text", SENTENCES[0])
    assert code == 1 and STORE_FILE in err


def test_a_newer_store_beside_an_older_pool_is_refused(store_folder, tmp_path, capsys):
    older = tmp_path / "older"
    shutil.copytree(store_folder, older)
    inject_and_compact(capsys, store_folder, SENTENCES[3])
    shutil.copy(store_folder / STORE_FILE, older / STORE_FILE)
    with pytest.raises(ValueError, match=STORE_FILE):
        MemoryLlamaForCausalLM.from_pretrained(older)


def test_a_state_file_whose_store_was_cut_out_is_refused(tmp_path):
    path = tmp_path / "state.safetensors"
    store_model().memory_state().save(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("long_term")}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(MemoryStateError, match="store"):
        MemoryState.load(path)


def test_the_store_can_be_dropped_on_purpose_from_the_command_line(store_folder, capsys):
    injections = MemoryState.load(store_folder / POOL_FILE).num_injections
    _store_as_directory(store_folder)
    code, out, err = run_cli(capsys, "drop-store", store_folder)
    assert code == 0, err
    assert "dropped the long-term store" in out and not (store_folder / STORE_FILE).exists()
    assert run_cli(capsys, "stats", store_folder)[0] == 0
    assert run_cli(capsys, "inject", store_folder, "--text", SENTENCES[3])[0] == 0
    model = MemoryLlamaForCausalLM.from_pretrained(store_folder)
    assert model.num_injections > injections
    assert [b.injection for b in model.long_term_memory] == list(range(injections + 1, model.num_injections + 1))


def test_the_store_can_be_dropped_on_purpose_by_from_pretrained(store_folder):
    pool = MemoryState.load(store_folder / POOL_FILE)
    _drop_store(store_folder)
    model = MemoryLlamaForCausalLM.from_pretrained(store_folder, drop_long_term_memory=True)
    assert model.long_term_memory == () and model.memory_state().content_hash() == pool.content_hash()
    model.save_pretrained(store_folder)
    assert MemoryLlamaForCausalLM.from_pretrained(store_folder).long_term_memory == ()
    model, _ = load(store_folder, drop_long_term_memory=True)  # the loader passes it on
    assert model.long_term_memory == ()


def test_a_folder_saved_before_the_store_head_loads_as_it_did(store_folder):
    """The limit of the guarantee: a pool file that records no store head (saved by an older version) takes the store
    file as it is, and a missing store is not noticed until the folder is saved again."""
    forge_pool_head(store_folder, head={})
    _drop_store(store_folder)
    assert MemoryLlamaForCausalLM.from_pretrained(store_folder).long_term_memory == ()


def test_a_store_saved_beside_another_pool_is_refused_even_without_the_pools_record(store_folder, tmp_path, capsys):
    older = tmp_path / "older"
    shutil.copytree(store_folder, older)
    inject_and_compact(capsys, store_folder, SENTENCES[3])
    shutil.copy(older / STORE_FILE, store_folder / STORE_FILE)
    forge_pool_head(store_folder, head={})
    with pytest.raises(ValueError, match="pool of .* injections"):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)


def test_the_hub_refuses_a_pushed_memory_whose_store_was_removed(store_folder, tmp_path, monkeypatch):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    from memoryllm_hf.hub import hub_endpoint
    from memoryllm_hf.testing import LocalHub

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path / "hf-cache", token="local-test-token"):
        model = MemoryLlamaForCausalLM.from_pretrained(store_folder)
        model.push_to_hub("tester/store")
        described = json.loads(Path(HfApi().hf_hub_download("tester/store", "memory_state.json")).read_text())
        del described["long_term_sha256"]  # the store's file and its line in memory_state.json both gone
        (tmp_path / "memory_state.json").write_text(json.dumps(described))
        HfApi().create_commit("tester/store", commit_message="lose the store", operations=[
            CommitOperationDelete(STORE_FILE),
            CommitOperationAdd("memory_state.json", str(tmp_path / "memory_state.json")),
        ])
        with pytest.raises(ValueError, match=STORE_FILE):
            MemoryLlamaForCausalLM.from_pretrained("tester/store")
        with pytest.raises(ValueError, match=STORE_FILE):
            model.load_memory_from_hub("tester/store")


def _nan_threshold(folder):
    edit_config(folder, retrieval_threshold=math.nan)


def _huge_neighbors(folder):
    edit_config(folder, retrieval_neighbors=10**9)


def _weights_cut(folder):
    shard = next(folder.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])


def _store_metadata(folder):
    rewrite_store(folder, slots=1)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_drop_store, STORE_FILE),
        (_store_as_dev_null, STORE_FILE),
        (_nan_threshold, "retrieval_threshold"),
        (_huge_neighbors, "retrieval_neighbors"),
        (_weights_cut, "weights"),
        (_store_metadata, "disagree"),
    ],
    ids=["store-deleted", "store-dev-null", "nan-threshold", "huge-neighbors", "weights-cut", "store-metadata"],
)
def test_stats_refuses_a_damaged_folder(store_folder, damage, match, capsys):
    damage(store_folder)
    code, _, err = run_cli(capsys, "stats", store_folder)
    assert code == 1 and re.search(match, err), err


def test_stats_shows_the_store_and_what_it_checked(store_folder, capsys):
    code, out, _ = run_cli(capsys, "stats", store_folder)
    assert code == 0
    assert re.search(r"long-term +\d+ injections", out) and "checked" in out and "long-term store" in out


# ---------------------------------------------------------------------------------------------- 4. set later
LATE_SETTINGS = pytest.mark.parametrize(
    ("name", "value"),
    [
        ("long_term_memory_dtype", "int8"),
        ("long_term_memory_device", "meta"),
        ("long_term_memory_tokens", None),
        ("long_term_memory_tokens", 6.0),
        ("read_mode", "retreive"),
    ],
)


@LATE_SETTINGS
def test_a_bad_setting_set_later_is_refused_by_inject(name, value):
    model = store_model()
    setattr(model.config, name, value)
    assert_refused(model, lambda: model.inject(SENTENCES[3], tokenizer=TOKENIZER), match=name)


@LATE_SETTINGS
def test_a_bad_setting_set_later_is_refused_by_save_pretrained(name, value, tmp_path):
    model = store_model()
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=name):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


# ---------------------------------------------------------------------------------------------- 5. devices
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@NO_CUDA
def test_a_cuda_store_device_on_a_cpu_machine_says_what_to_pass(store_folder, capsys):
    edit_config(store_folder, long_term_memory_device="cuda")
    code, _, err = run_cli(capsys, "ask", store_folder, "Where does Bob live?", "--max-new-tokens", 2)
    assert code == 1 and "long_term_memory_device" in err and "--device" in err
    with pytest.raises(ValueError, match="long_term_memory_device"):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)


@NO_CUDA
def test_load_with_a_device_overrides_the_store_device_of_config_json(store_folder):
    edit_config(store_folder, long_term_memory_device="cuda")
    model, _ = load(store_folder, device="cpu")
    assert model.config.long_term_memory_device == "cpu"
    assert {block.slots.device.type for block in model.long_term_memory} == {"cpu"}
    assert [block.injection for block in model.long_term_memory] == list(range(1, model.num_injections + 1))


@NO_CUDA
def test_ask_with_device_overrides_the_store_device_of_config_json(store_folder, capsys):
    edit_config(store_folder, long_term_memory_device="cuda")
    code, out, err = run_cli(capsys, "ask", store_folder, "Where does Bob live?", "--max-new-tokens", 2,
                             "--device", "cpu")
    assert code == 0, err


@pytest.mark.parametrize("device", ["banana", "meta", "cuda:x"])
def test_a_store_device_that_is_not_one_is_refused_by_the_config(device):
    with pytest.raises(ValueError, match="long_term_memory_device"):
        tiny_config(**STORE, long_term_memory_device=device)


@pytest.mark.parametrize("device", ["banana", "meta"])
def test_a_store_device_that_is_not_one_in_config_json_is_refused_clearly(store_folder, device, capsys):
    edit_config(store_folder, long_term_memory_device=device)
    with pytest.raises(ValueError, match="long_term_memory_device"):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)
    code, _, err = run_cli(capsys, "ask", store_folder, "Where does Bob live?", "--max-new-tokens", 2)
    assert code == 1 and "long_term_memory_device" in err


# ---------------------------------------------------------------------------------------------- 6. values
def test_an_unknown_store_dtype_override_is_refused_before_it_is_converted(store_folder):
    with pytest.raises(ValueError, match="long_term_memory_dtype"):
        MemoryLlamaForCausalLM.from_pretrained(store_folder, long_term_memory_dtype="nonsense")


def test_a_torch_dtype_as_store_dtype_is_taken_by_its_name(store_folder, tmp_path):
    model = MemoryLlamaForCausalLM.from_pretrained(store_folder, long_term_memory_dtype=torch.float16)
    assert {block.slots.dtype for block in model.long_term_memory} == {torch.float16}
    model.inject(SENTENCES[3], tokenizer=TOKENIZER)
    assert model.long_term_memory[-1].slots.dtype == torch.float16
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["long_term_memory_dtype"] == "float16"
    config = tiny_config(**STORE, long_term_memory_dtype=torch.bfloat16)
    assert config.long_term_memory_dtype == "bfloat16" and json.loads(config.to_json_string())


@pytest.mark.parametrize("name", ["retrieval_threshold", "retrieval_margin"])
def test_a_nan_threshold_is_refused_everywhere(name, store_folder):
    with pytest.raises(ValueError, match=name):
        tiny_config(**STORE, **{name: float("nan")})
    model = store_model()
    setattr(model.config, name, math.nan)
    with pytest.raises(ValueError, match=name):
        model(TOKENIZER("Where does Bob live?", return_tensors="pt")["input_ids"])
    edit_config(store_folder, **{name: math.nan})  # json writes the literal NaN
    assert f'"{name}": NaN' in (store_folder / "config.json").read_text()
    with pytest.raises(ValueError, match=name):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)


@pytest.mark.parametrize(
    ("field", "value"), [("slots", 17), ("injections", 2), ("num_layers", 3), ("hidden_size", 31)]
)
def test_store_file_metadata_must_agree_with_its_tensors(store_folder, field, value):
    rewrite_store(store_folder, **{field: value})
    with pytest.raises(ValueError, match=field):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)


def test_a_store_without_its_fingerprint_is_refused_by_another_model(tmp_path):
    mine, other = store_model(), store_model(seed=1)
    other.inject(SENTENCES[3], tokenizer=TOKENIZER)  # more injections than the store: only the fingerprint differs
    mine.save_pretrained(tmp_path / "mine")
    other.save_pretrained(tmp_path / "other")
    rewrite_store(tmp_path / "mine", fingerprint=None)
    shutil.copy(tmp_path / "mine" / STORE_FILE, tmp_path / "other" / STORE_FILE)
    with pytest.raises(ValueError, match="another model"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path / "other")


def test_a_float64_store_is_refused(store_folder):
    tensors = load_file(store_folder / STORE_FILE)
    tensors["long_term_slots"] = tensors["long_term_slots"].double()
    rewrite_store(store_folder, tensors)
    with pytest.raises(ValueError, match=STORE_FILE):  # not the store the pool file records
        MemoryLlamaForCausalLM.from_pretrained(store_folder)
    forge_pool_head(store_folder)  # a forger who rewrites the pool file's record too
    with pytest.raises(ValueError, match="float64.*(float32|bfloat16)"):
        MemoryLlamaForCausalLM.from_pretrained(store_folder)


# ---------------------------------------------------------------------------------------------- 8. odd inputs
@pytest.mark.parametrize(
    "odd",
    [
        [SENTENCES[0], 5],
        [SENTENCES[0], None],
        [None, SENTENCES[0]],
        [5, 6, None, 7, 8],
        SENTENCES[0].encode(),
        bytearray(SENTENCES[0].encode()),
        [SENTENCES[0].encode()],
    ],
    ids=["str-and-int", "str-and-None", "None-and-str", "ids-and-None", "bytes", "bytearray", "list-of-bytes"],
)
def test_odd_inputs_get_an_error_that_says_what_to_pass(odd):
    model = store_model()
    assert_refused(model, lambda: model.inject(odd, tokenizer=TOKENIZER), (TypeError, ValueError), "inject takes")


@pytest.mark.parametrize("token", ["pad", "eos", "bos"])
def test_special_tokens_only_are_refused_like_blank_text(token):
    model = store_model()
    token_id = getattr(model.config, f"{token}_token_id")
    assert_refused(model, lambda: model.inject(torch.full((8,), token_id)), match="special")
    mixed = torch.tensor([model.config.pad_token_id, model.config.eos_token_id] * 4)
    assert_refused(model, lambda: model.inject({"input_ids": mixed[None]}), match="special")


def test_generate_on_an_empty_prompt_says_what_to_pass():
    model = store_model()
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(empty, max_new_tokens=2)
    pool = tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        pool.generate(empty, max_new_tokens=2)


@pytest.mark.parametrize("device", ["banana", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_device_argument_that_is_not_here_says_what_to_pass(store_folder, device, capsys):
    with pytest.raises(ValueError, match="device"):
        load(store_folder, device=device)
    code, _, err = run_cli(capsys, "ask", store_folder, "Where does Bob live?", "--device", device)
    assert code == 1 and f"device={device!r}" in err


def test_the_store_is_hashed_once_per_save_and_once_per_load(tmp_path, monkeypatch):
    """The head record costs no extra pass over the store (a 1 GiB store takes about a second to hash)."""
    from memoryllm_hf.modeling import memory_files

    model = store_model()
    calls = []
    counted = memory_files.store_content_hash
    monkeypatch.setattr(memory_files, "store_content_hash", lambda store: calls.append(1) or counted(store))
    model.save_pretrained(tmp_path / "saved")
    assert len(calls) == 1
    calls.clear()
    MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved")
    assert len(calls) == 1
    calls.clear()
    model.memory_state().save(tmp_path / "state.safetensors")
    MemoryState.load(tmp_path / "state.safetensors")
    assert len(calls) == 2
