"""Hostile input: every bad input gets a clear error and leaves the memory exactly as it was."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny_folder import tiny_tokenizer

from memoryllm_hf.modeling.memory_state import MemoryState, MemoryStateError
from memoryllm_hf.tiny import tiny_model

TOKENIZER = tiny_tokenizer()
SENTENCE = "Alice lives in Paris and works as a baker."


@pytest.fixture
def model():
    model = tiny_model()
    model.inject(TOKENIZER(SENTENCE, add_special_tokens=False)["input_ids"])
    return model


def assert_refused(model, action, error=ValueError, match: str | None = None) -> None:
    """`action()` raises `error` (message matching `match`) and the memory is unchanged, down to the drop RNG."""
    before = model.memory_state().content_hash()
    with pytest.raises(error, match=match):
        action()
    assert model.memory_state().content_hash() == before


# ---------------------------------------------------------------- texts
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "0 tokens|empty"),
        ("   \n\t  ", "whitespace"),
        ("Alice", "at least min_inject_tokens"),
        ([SENTENCE, ""], "0 tokens|empty"),
    ],
)
def test_blank_and_short_texts(model, text, match):
    assert_refused(model, lambda: model.inject(text, tokenizer=TOKENIZER), match=match)


def test_text_without_tokenizer(model):
    assert_refused(model, lambda: model.inject(SENTENCE), match="needs tokenizer")


def test_enormous_text_is_chunked_with_a_progress_bar(model, capsys):
    text = " ".join([SENTENCE] * 20)
    tokens = len(TOKENIZER(text, add_special_tokens=False)["input_ids"])
    before = model.num_injections
    updates = model.inject(text, tokenizer=TOKENIZER)
    assert updates == -(-tokens // model.config.inject_chunk_size) and updates > 20
    assert f"{updates}/{updates}" in capsys.readouterr().err
    assert model.num_injections == before + updates


def _peak_rss_growth_mb(action) -> float:
    """Peak resident memory reached during `action()` above the resident memory before it (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the peak (VmHWM) to the current resident size

    def status_kb(key: str) -> int:
        return next(
            int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key)
        )

    before = status_kb("VmRSS:")
    action()
    return (status_kb("VmHWM:") - before) / 1024


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-memory reset")
def test_long_injections_use_constant_memory():
    """4x the text must not raise peak memory: each 2 MB pool is freed as the next one is written (keeping them
    would add 48 MB)."""
    model = tiny_model(num_memory_tokens=8192)
    ids = torch.randint(3, 128, (16 * 32,), generator=torch.Generator().manual_seed(0))
    model.inject(ids[:32])
    short = _peak_rss_growth_mb(lambda: model.inject(ids[: 16 * 8], progress=False))
    long = _peak_rss_growth_mb(lambda: model.inject(ids, progress=False))
    assert long < short + 12, f"peak memory grew by {long:.1f} MB for 32 chunks vs {short:.1f} MB for 8"


# ---------------------------------------------------------------- token ids
@pytest.mark.parametrize(
    "ids",
    [[5, 128, 7], [-1, 5, 6], torch.tensor([[5, 6, 2**40]])],
    ids=["past-vocab", "negative", "huge"],
)
def test_out_of_vocabulary_ids(model, ids):
    assert_refused(model, lambda: model.inject(ids), match=r"must be in \[0, 128\)")


def test_tokenizer_of_a_bigger_vocabulary(model):
    small = tiny_model(vocab_size=16)
    assert_refused(small, lambda: small.inject(SENTENCE, tokenizer=TOKENIZER), match=r"must be in \[0, 16\)")


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([5.0, 6.0, 7.0]), "integers"),
        (torch.tensor([5, 6, 7], dtype=torch.float16), "integers"),
        (torch.tensor([True, False, True]), "integers"),
        (torch.tensor([5, 6, 7], dtype=torch.complex64), "integers"),
        (torch.tensor([5, 6, 7], device="meta"), "meta"),
        (torch.tensor([5, 6, 7]).to_sparse(), "sparse"),
        (torch.tensor([[5, 6, 7], [8, 9, 10]]), "one sequence at a time"),
        (torch.zeros(1, 1, 3, dtype=torch.long), "1-D"),
        ([5, None, 7], "token ids"),
    ],
    ids=["float32", "float16", "bool", "complex", "meta-device", "sparse", "batch", "3-D", "None"],
)
def test_wrong_dtype_device_and_shape(model, ids, match):
    assert_refused(model, lambda: model.inject(ids), (ValueError, TypeError), match=match)


_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float16, torch.bool]
_id_lists = st.recursive(
    st.lists(st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 140), st.none(), st.floats()), max_size=40),
    lambda children: st.lists(children, max_size=3),
    max_leaves=60,
)
_id_tensors = st.builds(
    lambda dtype, shape, seed: (
        torch.randint(-200, 200, shape, generator=torch.Generator().manual_seed(seed)) % 300
    ).to(dtype),
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 20), max_size=3).map(tuple),
    st.integers(0, 2**16),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=st.one_of(_id_lists, _id_tensors, st.text(max_size=80), st.lists(st.text(max_size=30), max_size=3)))
def test_fuzz_inject_inputs(model, inputs):
    """Any input: either a clean ValueError/TypeError with the memory untouched, or a normal injection."""
    before = model.memory_state()
    try:
        updates = model.inject(inputs, tokenizer=TOKENIZER, progress=False)
    except (ValueError, TypeError):
        assert model.memory_state().content_hash() == before.content_hash()
    else:
        assert updates >= 1 and model.num_injections == before.num_injections + updates
        assert bool(torch.isfinite(model.memory).all())


# ---------------------------------------------------------------- memory states and their files
def _saved_state(model, path: Path) -> bytes:
    model.memory_state().save(path)
    return path.read_bytes()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_states_are_refused(model, tmp_path, value):
    state = model.memory_state()
    state.memory[1, 3, 5] = value
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.as_buffers().items()}, path, metadata=state.metadata())
    with pytest.raises(MemoryStateError, match="NaN/inf"):
        MemoryState.load(path)
    assert_refused(model, lambda: model.load_memory_state(state), MemoryStateError, "NaN/inf")
    with pytest.raises(MemoryStateError, match="NaN/inf"):
        state.save(tmp_path / "never-written.safetensors")
    assert not (tmp_path / "never-written.safetensors").exists()

    def serve():
        with model.use_memory(state):
            pytest.fail("a broken state must not be served")

    assert_refused(model, serve, MemoryStateError, "NaN/inf")


def test_state_of_another_model_is_refused(model, tmp_path):
    path = tmp_path / "other.safetensors"
    tiny_model(seed=1).memory_state().save(path)
    other = MemoryState.load(path)
    assert_refused(model, lambda: model.load_memory_state(other), MemoryStateError, "another model")
    for config, match in [({"num_memory_tokens": 32}, "shape"), ({"num_update_tokens": 4}, "K=4")]:
        mismatched = tiny_model(**config).memory_state()
        assert_refused(model, lambda m=mismatched: model.load_memory_state(m), MemoryStateError, match)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("memory", torch.zeros(2, 24, 32, dtype=torch.long), "floating-point"),
        ("memory", torch.zeros(2, 24, 32, device="meta"), "meta"),
        ("filled", torch.tensor(25), "outside"),
        ("injections", torch.tensor(-1), "negative"),
        ("rng_state", torch.zeros(7, dtype=torch.uint8), "generator state"),
    ],
)
def test_malformed_states_are_refused(model, field, value, match):
    state = model.memory_state()
    setattr(state, field, value)
    assert_refused(model, lambda: model.load_memory_state(state), MemoryStateError, match)


def test_truncated_files_are_refused(model, tmp_path):
    path = tmp_path / "state.safetensors"
    raw = _saved_state(model, path)
    model.inject(TOKENIZER("Bob keeps three cats; the oldest one is called Pepper!")["input_ids"])
    for length in (0, 7, 8, 100, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:length])
        assert_refused(model, lambda: model.load_memory_state(MemoryState.load(path)), MemoryStateError, "truncated")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_never_load_silently(model, tmp_path, data):
    """Flip one byte anywhere: the file is refused, or (a cosmetic header byte) it loads the very same memory."""
    path = tmp_path / "state.safetensors"
    raw = bytearray(_saved_state(model, path))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    original = model.memory_state()
    try:
        loaded = MemoryState.load(path)
    except MemoryStateError:
        return
    assert loaded.content_hash() == original.content_hash()


def test_corrupted_data_region_names_the_problem(model, tmp_path):
    path = tmp_path / "state.safetensors"
    raw = bytearray(_saved_state(model, path))
    raw[-10] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(MemoryStateError, match="corrupted: its content differs from the hash"):
        MemoryState.load(path)


def test_missing_or_foreign_files(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no memory state file"):
        MemoryState.load(tmp_path / "absent.safetensors")
    foreign = tmp_path / "weights.safetensors"
    save_file({"lm_head.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(MemoryStateError, match="not a memory state"):
        MemoryState.load(foreign)
