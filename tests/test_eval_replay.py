"""The retention protocol's fast replay against the plain path (`model.inject` text by text)."""

import pytest
import torch

from memoryllm_hf.evaluation.replay import LazyPool, QuestionChain, ReferenceChain, chunk_writes
from memoryllm_hf.tiny import tiny_model

RULES = [
    {},
    {"memory_update": "input", "fresh_pool": "grow"},
    {"memory_update": "input", "fresh_pool": "grow", "long_term_memory_tokens": 60, "read_mode": "retrieve"},
    {"long_term_memory_tokens": 36},
]


def _texts(count: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator)
    return [torch.randint(4, 100, (int(n),), generator=generator).tolist() for n in lengths]


def _writes(model, key: str, ids: list[int]):
    return chunk_writes(key, ids, model.config.inject_chunk_size, model.config.min_inject_tokens)


def _assert_same_state(state, model):
    reference = model.live_memory_state()
    assert torch.equal(state.memory, reference.memory)
    assert int(state.filled) == int(reference.filled)
    assert int(state.injections) == int(reference.injections)
    assert torch.equal(state.rng_state, reference.rng_state)
    assert torch.equal(state.written_at, reference.written_at)
    assert [(b.injection, b.call) for b in state.long_term] == [(b.injection, b.call) for b in reference.long_term]
    assert all(torch.equal(a.slots, b.slots) for a, b in zip(state.long_term, reference.long_term, strict=True))
    # the token ids lexical retrieval reads
    assert [b.token_ids.tolist() for b in state.long_term] == [b.token_ids.tolist() for b in reference.long_term]


@pytest.mark.parametrize("rule", RULES)
@torch.no_grad()
def test_lazy_pool_matches_inject_with_many_commits_between_reads(rule):
    naive, twin = tiny_model(**rule), tiny_model(**rule)
    texts = _texts(10, seed=1)
    for ids in texts:
        naive.inject(ids)
    # The twin computes each chunk's slots; the lazy pool commits them all without materializing in between.
    pool = LazyPool(twin.live_memory_state(), twin.config)
    for i, ids in enumerate(texts):
        call = twin.num_injections + 1
        for write in _writes(twin, f"t{i}", ids):
            slots = twin.new_memory_slots(write.ids)
            twin.swap_memory_state(twin.state_after(slots, None, call=call, token_ids=write.ids))
            pool.commit(slots, call, token_ids=write.ids)
    _assert_same_state(pool.materialize(), naive)


@pytest.mark.parametrize("rule", RULES)
def test_exact_chain_equals_inject(rule):
    """shared_depth=None: every question's memory is exactly what injecting its texts in order gives."""
    model, naive = tiny_model(**rule), tiny_model(**rule)
    unrelated = _texts(6, seed=2, low=20, high=40)
    start = model.memory_state()
    reference = ReferenceChain(
        model, [w for i, ids in enumerate(unrelated) for w in _writes(model, f"u{i}", ids)], start, depth=None
    )
    for question, related in enumerate(_texts(2, seed=3)):
        chain = QuestionChain(model, start, reference)
        naive.load_memory_state(start)
        chain.write(_writes(model, f"u{0}", unrelated[0]))
        chain.write(_writes(model, f"q{question}", related))
        chain.write([w for i in range(1, 6) for w in _writes(model, f"u{i}", unrelated[i])])
        for ids in [unrelated[0], related, *unrelated[1:]]:
            naive.inject(ids)
        _assert_same_state(chain.pool.materialize(), naive)
        assert chain.counts["shared"] == 0


def test_shared_chunks_follow_the_reference_and_its_history():
    model = tiny_model(memory_update="input", fresh_pool="grow")
    unrelated = _texts(8, seed=4, low=30, high=40)
    writes = [w for i, ids in enumerate(unrelated) for w in _writes(model, f"u{i}", ids)]
    start = model.memory_state()
    reference = ReferenceChain(model, writes, start, depth=2)
    chain = QuestionChain(model, start, reference)
    chain.write(writes[:3])  # same history as the reference: shared, and exactly the reference's slots
    assert chain.counts == {"shared": 3, "computed": 0}
    chain.write(_writes(model, "q", _texts(1, seed=5)[0]))
    related_writes = chain.counts["computed"]
    chain.write(writes[3:])
    # The depth=2 writes after the question's own text are computed; later ones are shared again.
    assert chain.counts["computed"] == related_writes + 2
    assert chain.counts["shared"] == len(writes) - 2


@torch.no_grad()
def test_unrelated_slots_depend_on_the_question_text():
    """Why sharing needs a depth: the first unrelated chunk after a question's text sees that text's slots in its
    window, so its slots differ between questions (sharing them unconditionally would not be exact)."""
    model = tiny_model(memory_update="input", fresh_pool="grow")
    start = model.memory_state()
    chunk = _writes(model, "u", _texts(1, seed=6, low=16, high=17)[0])[0]
    slots = []
    for question, ids in enumerate(_texts(2, seed=7, low=16, high=17)):
        chain = QuestionChain(model, start, None)
        chain.write(_writes(model, f"q{question}", ids))
        chain.load()
        slots.append(model.new_memory_slots(chunk.ids))
    assert torch.equal(slots[0][0], slots[1][0])  # layer-0 inputs are only embeddings
    assert not torch.allclose(slots[0][1:], slots[1][1:])


def test_chunk_writes_match_inject_and_reject_short_texts():
    model = tiny_model()
    ids = list(range(4, 4 + 37))
    assert model.inject(ids) == len(_writes(model, "t", ids)) == 3
    assert [w.ids.shape[1] for w in _writes(model, "t", ids)] == [13, 12, 12]
    with pytest.raises(ValueError, match="min_inject_tokens"):
        _writes(model, "t", [5])


@pytest.mark.slow
@torch.no_grad()
def test_question_influence_on_later_chunks_fades_on_smollm2(smollm2):
    """The measurement behind the default shared_depth=6: two different question texts, then the same chunks; the
    slots the chunks write differ less and less, below 1e-3 (relative) six chunks later."""
    model, tokenizer = smollm2
    K = model.config.num_update_tokens
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randint(100, 40000, (1, K), generator=generator) for _ in range(7)]
    questions = [
        "The Normans gave their name to Normandy, a region in France.",
        "Woodward Park was founded by Ralph Woodward, a long-time Fresno resident.",
    ]
    slots = []
    for text in questions:
        model.reset_memory()
        chain = QuestionChain(model, model.memory_state(), None)
        chain.write(_writes(model, "q", tokenizer(text, add_special_tokens=False)["input_ids"]))
        written = []
        for i, chunk in enumerate(chunks):
            chain.write(_writes(model, f"u{i}", chunk[0].tolist()))
            written.append(chain.pool.pieces[-1])
        slots.append(written)
    difference = [float((a - b).norm() / a.norm()) for a, b in zip(*slots, strict=True)]
    assert difference[6] < 1e-3 < difference[0]
    assert difference[6] < difference[3] < difference[0]


@torch.no_grad()
def test_prefill_sharing_stays_exact_with_per_question_drop_seeds():
    """A question whose chain is the reference's own writes but with its own drop seed: short writes (fewer than K
    slots) leave drop survivors in the next write's window, so only the writes that see the reference's window may
    take its slots; the result equals plain injection with the question's seed, bit for bit."""
    from memoryllm_hf.evaluation.runner import with_drop_seed

    rule = {"memory_update": "input", "fresh_pool": "grow"}
    model, naive = tiny_model(**rule), tiny_model(**rule)
    texts = _texts(24, seed=8, low=3, high=6)  # 3-5 slots per write, K = 6
    writes = [w for i, ids in enumerate(texts) for w in _writes(model, f"u{i}", ids)]
    start = model.memory_state()
    reference = ReferenceChain(model, writes, start, depth=2)
    mine = with_drop_seed(start, 1234)
    chain = QuestionChain(model, mine, reference)
    chain.write(writes)
    naive.load_memory_state(mine)
    for ids in texts:
        naive.inject(ids)
    _assert_same_state(chain.pool.materialize(), naive)
    assert chain.counts["shared"] > 0 and chain.counts["computed"] > 0  # both cases occurred
