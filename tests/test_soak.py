"""Soak: many injections on a tiny model with a memory-state save at regular intervals.

Norms stay stable, nothing turns NaN, every saved state reloads bit for bit, and a reloaded state replays the
following injections exactly (the drop RNG is part of the state). The 100,000-injection run is `slow`:
    pytest -m slow tests/test_soak.py
"""

import pytest
import torch

from memoryllm_hf.modeling.memory_state import MemoryState
from memoryllm_hf.tiny import tiny_model

TEXT_TOKENS = 8  # one memory update per injection (the tiny model's chunk is 16 tokens)


@pytest.mark.parametrize(
    ("injections", "save_every"),
    [(1_000, 100), pytest.param(100_000, 1_000, marks=pytest.mark.slow)],
    ids=["1k", "100k"],
)
def test_soak(tmp_path, injections, save_every):
    model = tiny_model()
    texts = torch.randint(3, 128, (injections, TEXT_TOKENS), generator=torch.Generator().manual_seed(0))
    saved: list[tuple[int, str]] = []
    mean_norms, max_norms = [], []
    for step, ids in enumerate(texts, start=1):
        model.inject(ids)
        if step % save_every == 0:
            state = model.memory_state()
            assert bool(torch.isfinite(state.memory).all()), f"non-finite memory after {step} injections"
            norms = state.memory.norm(dim=-1)
            mean_norms.append(float(norms.mean()))
            max_norms.append(float(norms.max()))
            state.save(tmp_path / f"state-{step:07d}.safetensors")
            saved.append((step, state.content_hash()))

    assert model.num_injections == injections
    assert max(mean_norms) < 2 * min(mean_norms), f"mean slot norm drifted: {min(mean_norms)} .. {max(mean_norms)}"
    assert max(max_norms) < 2 * max_norms[0], f"largest slot norm grew from {max_norms[0]} to {max(max_norms)}"

    reloaded = tiny_model()
    for step, digest in saved:
        reloaded.load_memory_state(MemoryState.load(tmp_path / f"state-{step:07d}.safetensors"))
        assert reloaded.memory_state().content_hash() == digest and reloaded.num_injections == step

    (second_last, _), (last, last_digest) = saved[-2:]
    reloaded.load_memory_state(MemoryState.load(tmp_path / f"state-{second_last:07d}.safetensors"))
    for ids in texts[second_last:last]:
        reloaded.inject(ids)
    assert reloaded.memory_state().content_hash() == last_digest
