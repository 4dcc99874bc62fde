"""Bad input gets a clear error that says what to do, and the memory is never changed by a failed injection."""

import pytest
import torch

from memoryllm_hf.tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def model():
    model = tiny_model(min_inject_tokens=4)
    model.inject(torch.randint(3, 128, (12,)))
    return model


def assert_unchanged(model, before):
    for name, tensor in before.as_buffers().items():
        assert torch.equal(getattr(model, name), tensor), name


@pytest.mark.parametrize(("text", "message"), [("", "empty"), ("   ", "whitespace"), ("ab", "min_inject_tokens=4")])
def test_empty_or_too_short_text(model, text, message):
    before = model.memory_state()
    with pytest.raises(ValueError, match=message):
        model.inject(text, tokenizer=tiny_tokenizer())
    assert_unchanged(model, before)


def test_text_needs_a_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        model.inject("some text")


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.randint(3, 128, (2, 10)), "one sequence at a time"),
        (torch.rand(10), "integers"),
        (torch.tensor([5, 6, 7, 500, 8]), r"in \[0, 128\)"),
        (torch.tensor([5, 6, -1, 8, 9]), r"in \[0, 128\)"),
        (torch.randint(3, 128, (1, 1, 10)), "1-D"),
    ],
)
def test_bad_token_ids(model, ids, message):
    before = model.memory_state()
    with pytest.raises(ValueError, match=message):
        model.inject(ids)
    assert_unchanged(model, before)


def test_one_bad_text_in_a_list_injects_nothing(model):
    before = model.memory_state()
    with pytest.raises(ValueError, match="min_inject_tokens"):
        model.inject(["a long enough first text", "no"], tokenizer=tiny_tokenizer())
    assert_unchanged(model, before)


def test_failure_midway_restores_the_memory(model, monkeypatch):
    before = model.memory_state()
    original, calls = model.new_memory_slots, []

    def fail_on_third_chunk(ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure (e.g. out of memory)")
        return original(ids)

    monkeypatch.setattr(model, "new_memory_slots", fail_on_third_chunk)
    with pytest.raises(RuntimeError, match="simulated"):
        model.inject(torch.randint(3, 128, (60,)), chunk_size=16)
    assert len(calls) == 3
    assert_unchanged(model, before)


def test_attention_mask_of_wrong_length(model):
    with pytest.raises(ValueError, match="attention_mask has 3 columns"):
        model(torch.randint(3, 128, (1, 5)), attention_mask=torch.ones(1, 3, dtype=torch.long))
