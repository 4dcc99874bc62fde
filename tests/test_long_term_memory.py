"""Long-term store and retrieval reads: what leaves the pool stays stored, retrieval reads like the text in context,
batches equal rows, round trips keep the store, bad input is refused without touching the memory."""

import pytest
import torch

from memoryllm_hf import MemoryLlamaForCausalLM
from memoryllm_hf.modeling import MemoryLlamaConfig, MemoryStateError
from memoryllm_hf.modeling.memory_files import LONG_TERM_FILE
from memoryllm_hf.modeling.memory_reader import select_injections
from memoryllm_hf.modeling.memory_store import MemoryBlock, store_append
from memoryllm_hf.tiny import tiny_config, tiny_model, tiny_tokenizer


def retrieval_model(**overrides):
    """A tiny training-free model that retrieves. Like `from_base` models, it adds no position embedding to the
    slots it writes (the tiny model's random one would hide the layer-0 token match the scorer uses)."""
    settings = dict(memory_update="input", fresh_pool="grow", long_term_memory_tokens=60, read_mode="retrieve")
    model = tiny_model(**{**settings, **overrides})
    with torch.no_grad():
        model.memory_embeddings.new_memory_positional_emb.zero_()
    return model


def texts(count, length=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=generator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------- the store
@pytest.mark.parametrize("update", ["input", "output"])
def test_every_slot_that_leaves_the_pool_is_stored_exactly_once_until_the_bound(update):
    fresh = "grow" if update == "input" else "tile"
    model = tiny_model(memory_update=update, fresh_pool=fresh, long_term_memory_tokens=10_000)
    K = model.config.num_update_tokens
    for ids in texts(30):
        before = model.memory_state()
        model.inject(ids)
        after = model.memory_state()
        block = model.long_term_memory[-1]
        assert block.injection == after.num_injections and block.num_slots == K
        for layer in [model.config.num_hidden_layers - 1]:  # "input" rule layer 0 = embeddings (repeat for equal tokens)
            old = before.memory[layer, model.config.num_memory_tokens - before.num_filled_slots :]
            kept = after.memory[layer]
            left = [slot for slot in old if not (kept == slot).all(-1).any()]
            stamps = before.written_at[layer, model.config.num_memory_tokens - before.num_filled_slots :]
            for slot in left:  # the slot, with its injection number, is in exactly one block of the store
                homes = [
                    b for b in model.long_term_memory for s in b.slots[layer] if torch.equal(s, slot.to(s.dtype))
                ]
                assert len(homes) == 1
                stamp = stamps[[torch.equal(o, slot) for o in old].index(True)]
                assert homes[0].injection == int(stamp)
    injections = [b.injection for b in model.long_term_memory]
    assert injections == list(range(1, 31))


def test_the_bound_removes_the_oldest_whole_injections():
    model = tiny_model(memory_update="input", fresh_pool="grow", long_term_memory_tokens=20)  # K = 6
    for ids in texts(7):
        model.inject(ids)
    assert [b.injection for b in model.long_term_memory] == [5, 6, 7]  # 3 x 6 slots <= 20 < 4 x 6
    block = MemoryBlock(8, 8, torch.zeros(2, 30, 32))
    with pytest.raises(ValueError, match="long_term_memory_tokens"):
        store_append(model.long_term_memory, block, 20)


def test_store_off_is_the_official_behaviour():
    model = tiny_model()
    for ids in texts(5):
        model.inject(ids)
    assert model.long_term_memory == () and model.memory_state().long_term == ()


def test_the_updates_of_one_text_share_its_number():
    model = retrieval_model()
    model.inject(texts(1, length=40)[0], chunk_size=16)  # 3 updates
    model.inject(texts(1, length=8)[0])
    model.inject(["a text of twenty chars", "eight ch"], tokenizer=tiny_tokenizer(), chunk_size=16)  # 3 updates
    pairs = [(b.injection, b.call) for b in model.long_term_memory]
    assert pairs == [(1, 1), (2, 1), (3, 1), (4, 4), (5, 5), (6, 5), (7, 7)]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"read_mode": "retreive", "long_term_memory_tokens": 60}, "read_mode"),
        ({"read_mode": "retrieve"}, "long_term_memory_tokens > 0"),
        ({"read_mode": "retrieve", "long_term_memory_tokens": 60, "read_tokens": 0}, "read_tokens"),
        ({"long_term_memory_tokens": 3}, "num_update_tokens"),
        ({"long_term_memory_tokens": -1}, "long_term_memory_tokens"),
        ({"long_term_memory_tokens": 60, "long_term_memory_dtype": "float8"}, "long_term_memory_dtype"),
        ({"retrieval_neighbors": -1}, "retrieval_neighbors"),
        ({"retrieval_threshold": "high"}, "retrieval_threshold"),
        ({"retrieval_margin": -1.0}, "retrieval_margin"),
    ],
)
def test_config_refuses_unknown_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_a_misspelt_read_mode_set_later_is_refused_not_read_as_pool():
    model = retrieval_model()
    model.inject(texts(1)[0])
    model.config.read_mode = "retreive"
    with pytest.raises(ValueError, match="read_mode"):
        model(torch.randint(3, 128, (1, 4)))


# ---------------------------------------------------------------------------------------------- selection
def test_selection_takes_best_first_within_budget_in_written_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8])
    assert select_injections(scores, [6, 6, 6, 6], [1, 2, 3, 4], budget=12) == [1, 3]
    assert select_injections(scores, [6, 6, 6, 6], [1, 2, 3, 4], budget=12, threshold=0.85) == [1]
    assert select_injections(scores, [6, 6, 6, 6], [1, 2, 3, 4], budget=12, threshold=0.95) == []
    # a block that does not fit is skipped, the next one that fits is taken
    assert select_injections(scores, [6, 20, 6, 6], [1, 2, 3, 4], budget=12) == [2, 3]
    # neighbours of the same call come along, budget permitting
    assert select_injections(scores, [6, 6, 6, 6], [1, 1, 1, 4], budget=18, neighbors=1) == [0, 1, 2]
    assert select_injections(scores, [6, 6, 6, 6], [1, 1, 3, 4], budget=18, neighbors=1) == [0, 1, 3]
    # a margin keeps only the blocks close to the best one (their neighbours still come along)
    assert select_injections(scores, [6, 6, 6, 6], [1, 2, 3, 4], budget=24, margin=0.2) == [1, 3]
    assert select_injections(scores, [6, 6, 6, 6], [1, 2, 3, 4], budget=24, margin=0.05) == [1]
    assert select_injections(scores, [6, 6, 6, 6], [1, 1, 3, 4], budget=24, margin=0.05, neighbors=1) == [0, 1]
    assert select_injections(scores, [6, 6, 6, 6], [1, 2, 3, 4], budget=24, margin=0.2, threshold=0.85) == [1]


# ---------------------------------------------------------------------------------------------- reads
@torch.no_grad()
def test_retrieving_one_injection_reads_like_the_text_in_context(llama_folder):
    folder, llama = llama_folder
    model = MemoryLlamaForCausalLM.from_base(
        folder, num_memory_tokens=64, num_update_tokens=32, long_term_memory_tokens=256, read_mode="retrieve",
        long_term_memory_dtype="float32",
    ).eval()
    text = torch.randint(3, 128, (20,))
    model.inject(text)
    question = torch.randint(3, 128, (1, 5))
    assert model.retrieve(question) == [[1]]
    in_context = torch.cat([torch.tensor([model.config.bos_token_id]), text, question[0]])[None]
    expected = llama(in_context).logits[:, -5:]
    assert (model(question).logits - expected).abs().max() < 1e-5
    out = model.generate(question, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, 5:], llama.generate(in_context, max_new_tokens=5, do_sample=False)[:, -5:])


@torch.no_grad()
def test_nothing_above_the_threshold_reads_bos_only(llama_folder):
    folder, llama = llama_folder
    model = MemoryLlamaForCausalLM.from_base(
        folder, num_memory_tokens=64, num_update_tokens=32, long_term_memory_tokens=256, read_mode="retrieve",
        long_term_memory_dtype="float32",
        retrieval_threshold=1e9,
    ).eval()
    model.inject(torch.randint(3, 128, (20,)))
    question = torch.randint(3, 128, (1, 5))
    assert model.retrieve(question) == [[]]
    expected = llama(torch.cat([torch.tensor([[model.config.bos_token_id]]), question], 1)).logits[:, -5:]
    assert (model(question).logits - expected).abs().max() < 1e-5


@torch.no_grad()
def test_a_batch_reads_like_its_rows_with_different_retrievals():
    model = retrieval_model(read_tokens=7)
    generator = torch.Generator().manual_seed(2)
    stored = []
    for length in (2, 6, 3, 5, 4, 6, 2, 3):  # injections of different sizes: rows' prefixes differ in length
        stored.append(torch.randint(3, 128, (length,), generator=generator))
        model.inject(stored[-1])
    rows = [torch.cat([stored[1], stored[0]]), stored[2], torch.cat([stored[4], stored[3][:2]])]
    picks = [model.retrieve(row[None])[0] for row in rows]
    sizes = {i + 1: b.num_slots for i, b in enumerate(model.long_term_memory)}
    assert len({sum(sizes[i] for i in p) for p in picks}) > 1  # the rows' prefixes really differ in length
    width = max(len(row) for row in rows)
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):  # left padding
        batch[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    assert model.retrieve(batch, attention_mask=mask) == picks
    logits = model(batch, attention_mask=mask).logits
    out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i, row in enumerate(rows):
        alone = model(row[None]).logits
        assert (logits[i, width - len(row) :] - alone[0]).abs().max() < 1e-5
        assert torch.equal(out[i, width:], model.generate(row[None], max_new_tokens=4, do_sample=False)[0, len(row) :])


@torch.no_grad()
def test_beams_and_seeded_sampling_read_the_retrieved_prefix():
    model = retrieval_model(read_tokens=12)
    for ids in texts(5):
        model.inject(ids)
    prompt = torch.randint(3, 128, (2, 5))
    beams = model.generate(prompt, num_beams=3, max_new_tokens=4, do_sample=False)
    for i in range(2):
        assert torch.equal(beams[i], model.generate(prompt[i : i + 1], num_beams=3, max_new_tokens=4, do_sample=False)[0])
    torch.manual_seed(3)
    sampled = model.generate(prompt, do_sample=True, max_new_tokens=4, num_return_sequences=2)
    assert sampled.shape == (4, 9)


@torch.no_grad()
def test_retrieval_finds_an_injection_from_its_own_tokens():
    model = retrieval_model(long_term_memory_tokens=600, read_tokens=6)
    stored = texts(40, length=6, seed=5)
    for ids in stored:
        model.inject(ids)
    hits = sum(model.retrieve(ids[None])[0] == [i + 1] for i, ids in enumerate(stored))
    assert hits >= 36


# ---------------------------------------------------------------------------------------------- persistence
def _store_equal(a, b):
    return [(x.injection, x.call) for x in a] == [(y.injection, y.call) for y in b] and all(
        torch.equal(x.slots, y.slots) for x, y in zip(a, b, strict=True)
    )


def test_save_pretrained_round_trip_keeps_the_store_bit_exact(tmp_path):
    model = retrieval_model()
    for ids in texts(12):
        model.inject(ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / LONG_TERM_FILE).exists()
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert _store_equal(loaded.long_term_memory, model.long_term_memory)
    prompt = torch.randint(3, 128, (1, 5))
    # (the stored data is bit-exact; logits agree to float rounding: the loaded weights may sit at other addresses)
    assert (loaded(prompt).logits - model(prompt).logits).abs().max() < 1e-6
    model.reset_memory()
    model.save_pretrained(tmp_path)  # an emptied store must not come back from an older file
    assert MemoryLlamaForCausalLM.from_pretrained(tmp_path).long_term_memory == ()


def test_states_and_snapshots_carry_the_store(tmp_path):
    model = retrieval_model()
    for ids in texts(6):
        model.inject(ids)
    state = model.memory_state()
    state.save(tmp_path / "state.safetensors")
    model.snapshot("six")
    for ids in texts(3, seed=9):
        model.inject(ids)
    model.restore("six")
    assert _store_equal(model.long_term_memory, state.long_term)
    fresh = retrieval_model()
    fresh.load_memory_state(type(state).load(tmp_path / "state.safetensors"))
    assert _store_equal(fresh.long_term_memory, state.long_term)
    assert fresh.memory_state().content_hash() == state.content_hash()


def test_a_corrupted_or_foreign_store_is_refused_and_memory_kept(tmp_path):
    model = retrieval_model()
    for ids in texts(6):
        model.inject(ids)
    model.save_pretrained(tmp_path)
    path = tmp_path / LONG_TERM_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path)
    other = tiny_model(hidden_size=16, intermediate_size=32, memory_update="input", fresh_pool="grow",
                       long_term_memory_tokens=60, read_mode="retrieve")
    before = other.memory_state()
    with pytest.raises(MemoryStateError):
        other.load_memory_state(model.memory_state())
    assert other.memory_state().content_hash() == before.content_hash()
    bad = model.memory_state()
    bad.long_term[0].slots[0, 0, 0] = float("nan")  # a copy of a state shares blocks: use a fresh model
    target = retrieval_model(seed=1)
    with pytest.raises(MemoryStateError, match="NaN"):
        target.load_memory_state(bad)
    assert target.long_term_memory == ()


def test_config_round_trip_keeps_the_new_fields(tmp_path):
    config = tiny_config(long_term_memory_tokens=60, read_mode="retrieve", read_tokens=12, retrieval_threshold=0.5,
                         long_term_memory_dtype="bfloat16", retrieval_neighbors=1)
    config.save_pretrained(tmp_path)
    loaded = MemoryLlamaConfig.from_pretrained(tmp_path)
    fields = ("long_term_memory_tokens", "read_mode", "read_tokens", "retrieval_threshold", "long_term_memory_dtype",
              "retrieval_neighbors")
    assert all(getattr(loaded, f) == getattr(config, f) for f in fields)


def test_store_dtype_is_configurable():
    model = retrieval_model(long_term_memory_dtype="bfloat16")
    model.inject(texts(1)[0])
    assert model.long_term_memory[0].slots.dtype == torch.bfloat16
    assert model.long_term_memory[0].slots.device.type == "cpu"
    assert model(torch.randint(3, 128, (1, 4))).logits.dtype == torch.float32


def test_from_pretrained_overrides_are_checked_too(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="long_term_memory_tokens > 0"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path, read_mode="retrieve")
    with pytest.raises(ValueError, match="read_mode"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path, read_mode="retreive")
    model = MemoryLlamaForCausalLM.from_pretrained(tmp_path, read_mode="retrieve", long_term_memory_tokens=60)
    assert model.config.read_mode == "retrieve"


@torch.no_grad()
def test_cached_block_key_values_equal_a_fresh_computation_and_follow_weight_changes():
    model = retrieval_model(read_tokens=18)
    for ids in texts(6):
        model.inject(ids)
    prompt = torch.randint(3, 128, (1, 5))
    first = model(prompt).logits
    model.retrieval_kv_cache_slots = 0  # nothing kept: every read computes afresh
    assert (model(prompt).logits - first).abs().max() < 1e-6
    model.retrieval_kv_cache_slots = 10_000
    model(prompt)
    model.model.layers[0].self_attn.v_proj.weight.mul_(3.0)  # in-place weight edit: cached values are stale
    changed = model(prompt).logits
    model.reads["retrieve"].key_values.clear()
    assert (changed - first).abs().max() > 1e-5
    assert (model(prompt).logits - changed).abs().max() < 1e-6


@torch.no_grad()
def test_retrieval_reads_continue_from_a_returned_cache():
    """Rows whose retrieved prefixes differ in length (left-padded) continue from the cache generate returned: each
    step equals a from-scratch read of the whole sequence (which retrieves the same injections here)."""
    model = retrieval_model(read_tokens=7)
    generator = torch.Generator().manual_seed(2)
    stored = [torch.randint(3, 128, (n,), generator=generator) for n in (2, 6, 3, 5)]
    for ids in stored:
        model.inject(ids)
    prompt = torch.stack([stored[1], torch.cat([stored[0], stored[2], stored[0][:1]])])
    picks = model.retrieve(prompt)
    first = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert first.cache.memory_prefix_mask is not None  # the rows' prefixes really differ in length
    turn = torch.cat([first.sequences, torch.randint(3, 128, (2, 3), generator=generator)], dim=1)
    second = model.generate(
        turn, cache=first.cache, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    sequence = turn
    for step, logits in enumerate(second.logits):
        reference = model(sequence).logits[:, -1]
        assert model.last_retrieval == picks  # the reference reads what the cache holds
        assert (reference - logits).abs().max() < 1e-5, f"step {step}"
        sequence = torch.cat([sequence, second.sequences[:, turn.shape[1] + step][:, None]], dim=1)


@torch.no_grad()
def test_reads_between_injections_see_the_newest_store():
    """The scorer's packed features are kept per store: a read after an injection scores the new block too."""
    model = retrieval_model(long_term_memory_tokens=600, read_tokens=6)
    stored = texts(12, length=6, seed=8)
    for ids in stored[:-1]:
        model.inject(ids)
    first = model.retrieve(stored[0][None])
    model.inject(stored[-1])
    assert model.retrieve(stored[-1][None]) == [[12]]
    assert model.retrieve(stored[0][None]) == first
    model.undo()  # back to the earlier store: the newest block is not scored any more
    assert 12 not in model.retrieve(stored[-1][None])[0]


def fresh_retrieval_scores(model, prompt):
    """Scores computed from nothing kept: the model's own weights on the store's slots and the prompt."""
    from memoryllm_hf.modeling import memory_retrieval as retrieval

    layers, key_layers = model.model.layers, retrieval.retrieval_key_layers(model.config.num_hidden_layers)
    hidden = model.model(input_ids=prompt, output_hidden_states=True, use_cache=False).hidden_states
    question = retrieval.question_features(layers, hidden, None, key_layers)
    store = model.long_term_memory
    blocks = [retrieval.block_features(layers, b.slots.to(model.memory.dtype), key_layers) for b in store]
    return retrieval.score_blocks(question, blocks)


@torch.no_grad()
def test_retrieval_features_follow_the_weights_that_read_them():
    """Features computed from memory belong to the weights that computed them: after another model's memory is
    loaded (`allow_other_model=True`) or a weight changes in place, scores equal a computation from scratch."""
    writer = retrieval_model(read_tokens=18)
    for ids in texts(6):
        writer.inject(ids)
    prompt = texts(1, length=5, seed=9)[0][None]
    assert torch.allclose(writer.retrieval_scores(prompt), fresh_retrieval_scores(writer, prompt), atol=1e-4)
    reader = retrieval_model(seed=3, read_tokens=18)
    reader.load_memory_state(writer.memory_state(), allow_other_model=True)
    assert torch.allclose(reader.retrieval_scores(prompt), fresh_retrieval_scores(reader, prompt), atol=1e-4)
    assert torch.allclose(writer.retrieval_scores(prompt), fresh_retrieval_scores(writer, prompt), atol=1e-4)
    writer.model.layers[1].self_attn.k_proj.weight.mul_(-2.0)  # in place: features computed before are stale
    assert torch.allclose(writer.retrieval_scores(prompt), fresh_retrieval_scores(writer, prompt), atol=1e-4)


@torch.no_grad()
def test_scorer_calibration_comes_from_the_config():
    """`retrieval_weights` / `retrieval_key_layers` are read at every read (no edit of remote code); unknown scorers
    and layers the model does not have are refused with what to use."""
    from memoryllm_hf.modeling import memory_retrieval as retrieval

    model = retrieval_model(read_tokens=18)
    for ids in texts(6):
        model.inject(ids)
    prompt = texts(1, length=5, seed=9)[0][None]
    layers = model.model.layers
    hidden = model.model(input_ids=prompt, output_hidden_states=True, use_cache=False).hidden_states
    settings = (({"lexical": 1.0}, None), ({"keys": 1.0}, [0]), ({"lexical": 0.3, "keys": 2.0}, [0, 1]))
    for weights, key_layers in settings:
        model.config.retrieval_weights, model.config.retrieval_key_layers = weights, key_layers
        used = retrieval.retrieval_key_layers(model.config.num_hidden_layers, key_layers)
        store = model.long_term_memory
        blocks = [retrieval.block_features(layers, b.slots.to(model.memory.dtype), used) for b in store]
        expected = retrieval.score_blocks(retrieval.question_features(layers, hidden, None, used), blocks, weights)
        assert torch.allclose(model.retrieval_scores(prompt), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown score weights.*'lexical' and 'keys'"):
        tiny_config(retrieval_weights={"bm25": 1.0})
    with pytest.raises(ValueError, match="retrieval_key_layers"):
        tiny_config(retrieval_key_layers=[2])


def test_store_hash_streams_the_blocks_and_equals_the_file_tensors_hash(monkeypatch):
    """The store's content hash is the hash of its file tensors (`store_to_tensors`), computed without concatenating
    the slots (a disk-backed store may be larger than RAM)."""
    from memoryllm_hf.modeling.atomic_io import tensors_digest
    from memoryllm_hf.modeling import memory_store

    torch.manual_seed(0)
    store = tuple(
        MemoryBlock(injection=i, call=max(1, i - 1), slots=torch.randn(3, k, 8).to(torch.bfloat16),
                    token_ids=None if i == 2 else torch.arange(i, i + 5, dtype=torch.int32))
        for i, k in zip(range(1, 5), (2, 5, 1, 3), strict=True)
    )
    expected = tensors_digest(memory_store.store_to_tensors(store))
    real = memory_store.store_to_tensors

    def without_slots(store, with_slots=True):
        assert not with_slots, "the slots were concatenated"
        return real(store, with_slots)

    monkeypatch.setattr(memory_store, "store_to_tensors", without_slots)
    assert memory_store.store_content_hash(store) == expected
    changed = (*store[:2], MemoryBlock(3, 2, store[2].slots.clone(), store[2].token_ids), store[3])
    changed[2].slots[1, 0, 3] += 1
    assert memory_store.store_content_hash(changed) != expected
