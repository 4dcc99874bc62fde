"""The memory update rule: tiling, growing pools, random drops that keep order, seeded reproducibility."""

import pytest
import torch

from memoryllm_hf.modeling.memory_pool import drop_and_append, kept_slot_indices, tile_pool
from memoryllm_hf.tiny import tiny_model


def tag_pool(model):
    """Give every slot a unique value (layer * 1000 + slot) in channel 0 so survivors can be traced."""
    state = model.memory_state()
    L, N, _ = state.memory.shape
    state.memory[..., 0] = torch.arange(L)[:, None] * 1000.0 + torch.arange(N)[None]
    state.filled.fill_(N)
    model.load_memory_state(state)


@pytest.mark.parametrize("per_layer", [True, False])
def test_drop_keeps_order_and_appends_newest(per_layer):
    model = tiny_model(drop_memory_per_layer=per_layer)
    tag_pool(model)
    N, K = model.config.num_memory_tokens, model.config.num_update_tokens
    context = torch.randint(3, 128, (1, 9))
    new = model.new_memory_slots(context).detach()
    model.inject(context)
    tags = model.memory[:, : N - K, 0]
    assert torch.equal(model.memory[:, N - K :], new)  # newest K at the end, unchanged
    for layer_tags in tags:
        assert torch.all(layer_tags[1:] > layer_tags[:-1])  # survivors keep their relative order, no duplicates
    survivors = tags % 1000
    assert (survivors[0] == survivors[1]).all() == (not per_layer)


def test_seeded_generators_reproduce_drops():
    a, b = tiny_model(), tiny_model()
    contexts = [torch.randint(3, 128, (1, 8)) for _ in range(5)]
    for model in (a, b):
        for context in contexts:
            model.inject(context, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.memory, b.memory)
    c = tiny_model()  # default: the pool's own generator, seeded by config.memory_seed, advances with the memory
    d = tiny_model(memory_seed=1)
    for context in contexts:
        c.inject(context)
        d.inject(context)
    assert not torch.equal(c.memory, d.memory)
    e = tiny_model()
    for context in contexts:
        e.inject(context)
    assert torch.equal(c.memory, e.memory)


def test_official_rng_calls():
    """One randperm(N) per layer (or one shared), first N - k entries kept, sorted: the official draw."""
    torch.manual_seed(1234)
    expected = [torch.randperm(32)[:24].sort().values for _ in range(2)]
    kept = kept_slot_indices(32, 32, 8, 2, True, torch.Generator().manual_seed(1234))
    assert torch.equal(kept, torch.stack(expected))
    shared = kept_slot_indices(32, 32, 8, 2, False, torch.Generator().manual_seed(1234))
    assert torch.equal(shared[0], expected[0]) and torch.equal(shared[1], expected[0])


def test_tile_pool_rule():
    new = torch.arange(5.0)[None, :, None].expand(2, 5, 3)
    pool = tile_pool(new, 32)
    assert pool.shape == (2, 32, 3)
    assert pool[0, :, 0].tolist() == [0, 1, 2, 3, 4] * 6 + [3, 4]
    assert tile_pool(new[:, :4], 8)[0, :, 0].tolist() == [0, 1, 2, 3] * 2  # exact multiple: no extra copy
    assert tile_pool(new, 3)[0, :, 0].tolist() == [2, 3, 4]


def test_drop_and_append_writes_one_pool():
    memory = torch.randn(2, 6, 4)
    new = torch.randn(2, 2, 4)
    keep = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    pool = drop_and_append(memory, new, keep)
    assert torch.equal(pool[0, :4], memory[0, [0, 2, 3, 5]]) and torch.equal(pool[1, :4], memory[1, [1, 2, 4, 5]])
    assert torch.equal(pool[:, 4:], new) and pool.data_ptr() != memory.data_ptr()


def test_grow_pool_fills_before_dropping():
    model = tiny_model(memory_update="input", fresh_pool="grow")
    N = model.config.num_memory_tokens
    assert not model.memory_is_initialized
    written = []
    for length in (4, 6, 6, 6):  # 22 slots: the pool of 24 is not full yet, nothing dropped
        context = torch.randint(3, 128, (1, length))
        written.append(model.new_memory_slots(context))
        model.inject(context)
    assert model.num_filled_slots == 22 and model.memory_prefix_length == 23
    assert torch.equal(model.memory[:, N - 22 :], torch.cat(written, dim=1))
    model.inject(torch.randint(3, 128, (1, 6)))  # 2 empty slots go first, then 4 random old ones
    assert model.num_filled_slots == N
    assert model.num_injections == 5


def test_first_injection_tiles_an_official_pool():
    model = tiny_model()
    context = torch.randint(3, 128, (1, 4))
    new = model.new_memory_slots(context)
    model.inject(context)
    assert model.num_filled_slots == model.config.num_memory_tokens
    assert torch.equal(model.memory, tile_pool(new, model.config.num_memory_tokens))


def test_reset_memory():
    model = tiny_model()
    model.inject(torch.randint(3, 128, (1, 8)))
    prompt = torch.randint(3, 128, (1, 4))
    model.reset_memory()
    assert not model.memory_is_initialized and model.num_injections == 0
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, model(prompt, use_memory=False).logits)


def test_chunking_splits_long_text_evenly():
    model = tiny_model()
    assert model.inject(torch.randint(3, 128, (40,)), chunk_size=16) == 3  # 14 + 13 + 13 tokens
    assert model.num_injections == 3
    with pytest.raises(ValueError, match="min_inject_tokens"):
        model.inject(torch.randint(3, 128, (40,)), chunk_size=1)


@pytest.mark.parametrize("overrides", [{}, {"memory_update": "input", "fresh_pool": "grow"}])
def test_slots_remember_which_injection_wrote_them(overrides):
    model = tiny_model(**overrides)
    for number in range(1, 9):
        model.inject(torch.randint(3, 128, (1, 6)))
        written = model.memory_written_at[:, model.config.num_memory_tokens - model.num_filled_slots :]
        assert (written[:, -6:] == number).all()  # the newest slots carry this injection's number
        assert (written[:, 1:] >= written[:, :-1]).all()  # older survivors stay in front, in order
    survivors = model.memory_written_at.unique()
    assert 1 < len(survivors) < 9  # some old slots survive, some were dropped
