"""Memory states: exact restore, files with metadata, atomic saves, per-user memories, snapshots, undo, threads."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from memoryllm_hf.modeling import atomic_io as memory_storage_module
from memoryllm_hf.modeling import memory_state as memory_state_module
from memoryllm_hf.modeling.memory_state import MemoryState, MemoryStateError
from memoryllm_hf.tiny import tiny_model

MODELING = Path(memory_state_module.__file__).parent
QUERY = torch.tensor([[5, 6, 7, 8]])


def ids(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed))


def states_equal(a: MemoryState, b: MemoryState) -> bool:
    return a.content_hash() == b.content_hash()


@torch.no_grad()
def logits_with(state: MemoryState) -> torch.Tensor:
    """Logits of QUERY read by a fresh model holding `state` (no shared caches)."""
    model = tiny_model(num_memory_tokens=state.num_slots)
    model.load_memory_state(state)
    return model(QUERY).logits


def test_state_restores_exactly_including_next_drop(output_model):
    for seed in range(3):
        output_model.inject(ids(seed))
    state = output_model.memory_state()
    output_model.inject(ids(10))
    after_first_try = output_model.memory_state()
    output_model.inject(ids(11))
    output_model.load_memory_state(state)
    output_model.inject(ids(10))
    assert states_equal(output_model.memory_state(), after_first_try)
    assert not states_equal(state, after_first_try)


def test_state_carries_metadata_and_is_a_copy(input_model):
    input_model.inject(ids(0))
    state = input_model.memory_state()
    digest = state.content_hash()
    input_model.inject(ids(1))
    assert state.content_hash() == digest
    assert state.fingerprint == input_model.memory_fingerprint()
    assert state.num_update_tokens == input_model.config.num_update_tokens
    assert (state.num_slots, state.num_filled_slots, state.num_injections) == (24, 6, 1)
    assert state.memory.dtype == torch.float32
    assert repr(state) == f"MemoryState(2x24x32 float32, filled=6, injections=1, K=6, fingerprint={state.fingerprint})"
    assert state.content_hash() != input_model.memory_state().content_hash()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_roundtrip_with_metadata(tmp_path, dtype):
    model = tiny_model().to(dtype)
    model.inject(ids(0))
    state = model.memory_state()
    path = tmp_path / "alice.safetensors"
    state.save(path)
    loaded = MemoryState.load(path)
    assert states_equal(loaded, state)
    assert (loaded.fingerprint, loaded.num_update_tokens) == (state.fingerprint, 6)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["content_hash"] == state.content_hash()
    assert metadata["injections"] == "1" and metadata["filled_slots"] == "24" and metadata["num_memory_tokens"] == "24"
    assert metadata["dtype"] == str(dtype).removeprefix("torch.")
    assert metadata["fingerprint"] == model.memory_fingerprint()
    model.reset_memory()
    model.load_memory_state(loaded)
    assert states_equal(model.memory_state(), state)


def test_checkpoint_memory_file_is_a_state(tmp_path, output_model):
    output_model.inject(ids(0))
    output_model.save_pretrained(tmp_path)
    loaded = MemoryState.load(tmp_path / "memory.safetensors")
    assert states_equal(loaded, output_model.memory_state())
    assert (loaded.fingerprint, loaded.num_update_tokens) == (output_model.memory_fingerprint(), 6)  # one format


def test_failed_save_keeps_previous_file(tmp_path, output_model, monkeypatch):
    path = tmp_path / "state.safetensors"
    output_model.inject(ids(0))
    first = output_model.memory_state()
    first.save(path)
    output_model.inject(ids(1))

    def half_written(tensors, tmp, metadata):
        Path(tmp).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(memory_storage_module, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        output_model.memory_state().save(path)
    assert states_equal(MemoryState.load(path), first)
    assert os.listdir(tmp_path) == ["state.safetensors"]


# The writer imports only the state module (no transformers, so it starts in seconds) and blocks in the fsync of
# its 3rd save: the kill lands after the new bytes are written and before the rename.
WRITER = r"""
import os, sys, time, types
package = types.ModuleType("memory_files")
package.__path__ = [sys.argv[1]]
sys.modules["memory_files"] = package
import torch
from memory_files.memory_state import MemoryState, seeded_rng_state

def stall(fd):
    print("inside save", flush=True)
    time.sleep(600)

for i in range(1, 4):
    if i == 3:
        os.fsync = stall
    state = MemoryState(torch.full((4, 512, 64), float(i)), torch.tensor(512), torch.tensor(i), seeded_rng_state(0))
    state.save(sys.argv[2])
    print("saved", i, flush=True)
"""


def test_killed_writer_leaves_previous_file_loadable(tmp_path):
    path = tmp_path / "state.safetensors"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(MODELING), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        lines = [writer.stdout.readline().strip() for _ in range(3)]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert lines == ["saved 1", "saved 2", "inside save"]
    assert writer.returncode == -signal.SIGKILL
    state = MemoryState.load(path)
    assert state.num_injections == 2 and bool((state.memory == 2.0).all())
    leftovers = [name for name in os.listdir(tmp_path) if name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # the interrupted save's file, never renamed


def test_use_memory_swaps_and_restores(output_model):
    output_model.inject(ids(0))
    own = output_model.memory_state()
    alice = tiny_model()
    alice.inject(ids(1))
    alice_state = alice.memory_state()
    expected_own, expected_alice = logits_with(own), logits_with(alice_state)
    with torch.no_grad():
        assert torch.allclose(output_model(QUERY).logits, expected_own)
        with output_model.use_memory(alice_state) as served:
            assert served is alice_state
            assert torch.allclose(output_model(QUERY).logits, expected_alice)
        assert torch.allclose(output_model(QUERY).logits, expected_own)
        with pytest.raises(RuntimeError, match="boom"):
            with output_model.use_memory(alice_state):
                raise RuntimeError("boom")
        assert states_equal(output_model.memory_state(), own)
        assert torch.allclose(output_model(QUERY).logits, expected_own)


def test_use_memory_writes_injections_back(output_model):
    output_model.inject(ids(0))
    own = output_model.memory_state()
    user = own.clone()
    with output_model.use_memory(user):
        output_model.inject(ids(1))
        inside = output_model.memory_state()
    assert states_equal(user, inside) and user.num_injections == 2
    assert states_equal(output_model.memory_state(), own)
    replay = tiny_model()
    replay.load_memory_state(own)
    replay.inject(ids(1))
    assert states_equal(replay.memory_state(), user)


def test_use_memory_refuses_other_model(output_model):
    other = tiny_model(seed=1).memory_state()
    before = output_model.memory_state()
    with pytest.raises(MemoryStateError, match="another model"):
        with output_model.use_memory(other):
            pytest.fail("the block must not run")
    assert states_equal(output_model.memory_state(), before)


def test_many_users_never_read_a_stale_cache():
    """Memory keys/values are cached; swapping users (whose pools may reuse freed addresses) must invalidate them."""
    model = tiny_model(num_memory_tokens=2048)
    users = {}
    for name in range(3):
        model.reset_memory()
        model.inject(ids(name))
        users[name] = model.memory_state()
    expected = {name: logits_with(state) for name, state in users.items()}
    order = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        for step, name in enumerate(order):
            with model.use_memory(users[name].clone()):
                if step % 3:  # some swaps are never read: their pools are freed without a cache entry
                    assert torch.allclose(model(QUERY).logits, expected[name]), f"user {name} read a stale memory"


def test_reads_follow_every_injection():
    model = tiny_model(num_memory_tokens=2048)
    model.inject(ids(0))
    with torch.no_grad():
        for step in range(20):
            model(QUERY)
            model.inject(ids(2 * step + 1))
            model.inject(ids(2 * step + 2))
            assert torch.allclose(model(QUERY).logits, logits_with(model.memory_state()))


def test_snapshots(output_model):
    output_model.inject(ids(0))
    saved = output_model.snapshot("monday")
    output_model.inject(ids(1))
    output_model.snapshot("tuesday")
    output_model.restore("monday")
    assert states_equal(output_model.memory_state(), saved)
    output_model.inject(ids(2))
    assert states_equal(output_model.snapshots["monday"], saved)
    assert sorted(output_model.snapshots) == ["monday", "tuesday"]
    with pytest.raises(KeyError, match="monday, tuesday"):
        output_model.restore("friday")
    with pytest.raises(ValueError, match="non-empty"):
        output_model.snapshot(" ")


def test_undo_takes_back_the_last_injection(output_model):
    output_model.inject(ids(0))
    after_first = output_model.memory_state()
    output_model.inject(ids(1))
    output_model.undo()
    assert states_equal(output_model.memory_state(), after_first)
    with pytest.raises(ValueError, match="nothing to undo"):
        output_model.undo()


def test_undo_depth_and_refusal_after_replacement(output_model):
    output_model.undo_depth = 2
    start = output_model.memory_state()
    output_model.inject(ids(0))
    output_model.inject(ids(1))
    output_model.undo()
    output_model.undo()
    assert states_equal(output_model.memory_state(), start)
    output_model.inject(ids(2))
    output_model.load_memory_state(start)
    with pytest.raises(ValueError, match="replaced since the last inject"):
        output_model.undo()
    assert states_equal(output_model.memory_state(), start)


def test_undo_history_is_per_memory(output_model):
    output_model.inject(ids(0))
    after_first = output_model.memory_state()
    output_model.inject(ids(1))
    user = after_first.clone()
    with output_model.use_memory(user):
        output_model.inject(ids(2))
        output_model.undo()
    assert states_equal(user, after_first)
    output_model.undo()
    assert states_equal(output_model.memory_state(), after_first)


# ------------------------------------------------------------------ recycled pools
@pytest.mark.parametrize("rule", ["output", "input"])
def test_recycled_pools_give_the_same_memory(rule):
    """Updates written into a recycled buffer equal updates into fresh pools, bit for bit (single and chunked)."""
    models = [tiny_model(memory_update=rule, fresh_pool="grow" if rule == "input" else "tile") for _ in range(2)]
    models[1].recycle_pools = False
    for seed in range(6):
        for model in models:
            model.inject(ids(seed, 40), chunk_size=10 if seed % 2 else None)
        assert states_equal(models[0].memory_state(), models[1].memory_state())
    assert models[0].spare_pool.pool is not None and models[1].spare_pool.pool is None  # nothing kept when turned off
    models[0].undo()
    models[1].undo()
    assert states_equal(models[0].memory_state(), models[1].memory_state())


def test_pool_that_left_the_undo_history_is_reused(output_model):
    output_model.inject(ids(0))
    first = output_model.memory.data_ptr()  # a plain int: holds no reference to the pool
    output_model.inject(ids(1))  # the undo history (depth 1) holds the first pool
    output_model.inject(ids(2))  # ... and lets it go: nothing else references it, it becomes the spare
    output_model.inject(ids(3))
    assert output_model.memory.data_ptr() == first  # the fourth pool was written into the first one's buffer


@pytest.mark.parametrize("hold", ["name", "view", "autograd"])
def test_pool_still_referenced_is_never_overwritten(output_model, hold):
    output_model.inject(ids(0))
    old = output_model.memory
    expected = old.clone()
    if hold == "view":
        old = old[0]
        expected = expected[0]
    elif hold == "autograd":
        weight = torch.ones(old.shape[-1], requires_grad=True)
        graph = (old * weight).sum()  # the product saves `old` for backward
        old = None
    for seed in range(1, 6):
        output_model.inject(ids(seed, 30), chunk_size=10)
    if hold == "autograd":
        graph.backward()  # fails if the saved pool was written in place
        assert torch.equal(weight.grad, expected.sum(dim=(0, 1)))
    else:
        assert torch.equal(old, expected)


def test_concurrent_generate_and_inject_follow_a_serial_order():
    model = tiny_model()
    model.inject(ids(100))
    start = model.memory_state()
    texts = [ids(seed, length=30) for seed in range(4)]  # 2 chunks each: interleaved chunks would show
    barrier = threading.Barrier(len(texts) + 2)
    outputs, errors = [], []

    def run(job):
        try:
            barrier.wait()
            job()
        except BaseException as err:  # reported below
            errors.append(err)

    def reader():
        for _ in range(6):
            outputs.append(model.generate(QUERY, max_new_tokens=3, do_sample=False)[0, 4:].tolist())

    threads = [threading.Thread(target=run, args=(lambda t=t: model.inject(t),)) for t in texts]
    threads += [threading.Thread(target=run, args=(reader,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = model.memory_state()

    replay = tiny_model()

    def find_order(state: MemoryState, remaining: tuple[int, ...], seen: list[MemoryState]):
        if not remaining:
            return seen if states_equal(state, final) else None
        for index in remaining:
            replay.load_memory_state(state)
            replay.inject(texts[index])
            found = find_order(replay.memory_state(), tuple(i for i in remaining if i != index), seen + [state])
            if found:
                return found
        return None

    path = find_order(start, tuple(range(len(texts))), [])
    assert path is not None, "the final memory matches no serial order of the injections"
    readable = set()
    for state in path + [final]:
        replay.load_memory_state(state)
        readable.add(tuple(replay.generate(QUERY, max_new_tokens=3, do_sample=False)[0, 4:].tolist()))
    assert len(outputs) == 12 and all(tuple(out) in readable for out in outputs)


def test_set_memory_state_hands_over_a_state_and_checks_it(input_model):
    """The public swap used by tooling: the state becomes the memory as it is; a broken or foreign one is refused."""
    input_model.inject(torch.randint(3, 128, (10,)))
    state = input_model.memory_state()
    input_model.reset_memory()
    input_model.set_memory_state(state)
    assert input_model.memory is state.memory  # handed over, not copied
    bad = state.clone()
    bad.memory[0, -1, 0] = float("nan")
    with pytest.raises(MemoryStateError, match="NaN"):
        input_model.set_memory_state(bad)
    wrong = state.clone()
    wrong.memory = wrong.memory[:, :-1]
    with pytest.raises(MemoryStateError, match="shape"):
        input_model.set_memory_state(wrong, validate=False)
    assert input_model.memory is state.memory
