"""A long-term store larger than RAM (`long_term_memory_storage="disk"`): segment files memory-mapped, reads equal to
an in-RAM store's, folders and the Hub carry the segments (a memory-only push uploads only new ones), a never-saved
model's segments live in a temporary directory removed with the model, broken segments are refused, and resident
memory stays bounded on a store larger than a RAM budget."""

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors import safe_open
from safetensors.torch import save_file

from memoryllm_hf import cli
from memoryllm_hf.hub import hub_endpoint
from memoryllm_hf.modeling import MemoryLlamaForCausalLM, MemoryState, MemoryStateError, read_folder_memory
from memoryllm_hf.modeling.memory_files import JOURNAL_DIR, LONG_TERM_FILE, SEGMENTS_DIR
from memoryllm_hf.modeling.memory_store import store_chain_hash
from memoryllm_hf.testing import LocalHub
from memoryllm_hf.tiny import tiny_model

STORE = {
    "memory_update": "input",
    "fresh_pool": "grow",
    "long_term_memory_tokens": 60,
    "read_mode": "retrieve",
    "read_tokens": 12,
}
DISK = {**STORE, "long_term_memory_storage": "disk"}


def texts(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (1, 6 + i % 5), generator=generator) for i in range(count)]


def same_store(a, b) -> bool:
    return len(a) == len(b) and all(
        x.injection == y.injection and x.call == y.call and torch.equal(x.slots, y.slots)
        for x, y in zip(a, b, strict=False)
    )


def segments(folder: Path) -> list[str]:
    return sorted(os.listdir(folder / SEGMENTS_DIR)) if (folder / SEGMENTS_DIR).is_dir() else []


def test_disk_backed_reads_equal_in_ram_reads():
    ram, disk = tiny_model(**STORE), tiny_model(**DISK)
    for ids in texts(8):
        ram.inject(ids)
        disk.inject(ids)
    assert all(block.source for block in disk.long_term_memory)  # mapped from segment files
    assert not any(block.source for block in ram.long_term_memory)
    assert same_store(ram.long_term_memory, disk.long_term_memory)
    prompt = torch.cat(texts(1, seed=1)[:1] + [torch.randint(4, 100, (1, 4))], dim=1)
    assert disk.retrieve(prompt) == ram.retrieve(prompt)
    assert torch.equal(disk(prompt).logits, ram(prompt).logits)
    assert torch.equal(disk.generate(prompt, max_new_tokens=4, do_sample=False),
                       ram.generate(prompt, max_new_tokens=4, do_sample=False))


def test_folder_round_trip_carries_segments_by_hard_link(tmp_path):
    model = tiny_model(**DISK)
    for ids in texts(4):
        model.inject(ids)
    model.save_pretrained(tmp_path / "m")
    assert segments(tmp_path / "m") == [f"{1:010d}-{4:010d}.safetensors"]
    assert not (tmp_path / "m" / LONG_TERM_FILE).exists()
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert same_store(loaded.long_term_memory, model.long_term_memory)
    assert all(str(tmp_path / "m" / SEGMENTS_DIR) in block.source for block in loaded.long_term_memory)
    inode = (tmp_path / "m" / SEGMENTS_DIR / segments(tmp_path / "m")[0]).stat().st_ino
    loaded.inject(texts(1, seed=5)[0])
    loaded.save_memory(tmp_path / "m")  # a journal record: the segments are untouched
    assert len(os.listdir(tmp_path / "m" / JOURNAL_DIR)) == 1 and len(segments(tmp_path / "m")) == 1
    loaded.save_memory(tmp_path / "m", compact=True)  # the new block gets a segment; the old one is carried over
    assert segments(tmp_path / "m") == [f"{1:010d}-{4:010d}.safetensors", f"{5:010d}-{5:010d}.safetensors"]
    assert (tmp_path / "m" / SEGMENTS_DIR / segments(tmp_path / "m")[0]).stat().st_ino == inode
    again = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert same_store(again.long_term_memory, loaded.long_term_memory)
    assert same_store(read_folder_memory(tmp_path / "m", MemoryState).long_term, loaded.long_term_memory)
    # past the bound the oldest blocks leave; a segment with no stored block is dropped, a partly kept one rewritten
    for ids in texts(8, seed=6):
        again.inject(ids)
    again.save_memory(tmp_path / "m", compact=True)
    stored = [block.injection for block in again.long_term_memory]
    assert stored[0] > 1
    assert same_store(MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m").long_term_memory, again.long_term_memory)
    assert segments(tmp_path / "m")[0].startswith(f"{stored[0]:010d}")


def test_a_memory_mode_model_reads_a_disk_folder_into_ram(tmp_path):
    model = tiny_model(**DISK)
    for ids in texts(3):
        model.inject(ids)
    model.save_pretrained(tmp_path / "m")
    ram = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m", long_term_memory_storage="memory")
    assert not any(block.source for block in ram.long_term_memory)
    assert same_store(ram.long_term_memory, model.long_term_memory)
    ram.save_memory(tmp_path / "m", compact=True)  # an in-RAM store is saved as one store file
    assert (tmp_path / "m" / LONG_TERM_FILE).is_file() and segments(tmp_path / "m") == []


def test_a_never_saved_model_keeps_its_segments_in_a_temporary_directory_removed_with_it():
    model = tiny_model(**DISK)
    model.inject(texts(1)[0])
    spill = model.store_spill.path
    assert spill is not None and os.listdir(spill)
    assert Path(spill).name.startswith("memoryllm-store-")
    copy = model.store_spill.__deepcopy__({})
    assert copy.path is None  # a copy of the model gets its own
    del model
    gc.collect()
    assert not os.path.exists(spill)


def test_the_temporary_directory_is_removed_at_exit():
    code = (
        "import torch; from memoryllm_hf.tiny import tiny_model; "
        f"m = tiny_model(**{DISK!r}); m.inject(torch.arange(4, 14)); print(m.store_spill.path, flush=True)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    spill = result.stdout.split()[-1]
    assert spill.startswith("/") and not os.path.exists(spill)


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("truncate", "truncated or corrupted"),
        ("flip", "corrupted"),
        ("missing", "missing"),
        ("foreign", "another model"),
        ("stray", "not a store segment"),
        ("nan", "NaN"),  # a segment whose recorded hash matches, holding NaN
    ],
)
def test_broken_segments_are_refused_naming_the_file(tmp_path, breakage, match):
    model = tiny_model(**DISK)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    for ids in texts(6):  # three segments of two blocks
        model.inject(ids[:, :6])
        if model.num_injections % 2 == 0:
            model.save_memory(folder, compact=True)
    paths = [folder / SEGMENTS_DIR / name for name in segments(folder)]
    assert len(paths) == 3
    if breakage == "truncate":
        paths[1].write_bytes(paths[1].read_bytes()[:-40])
    elif breakage == "flip":
        raw = bytearray(paths[1].read_bytes())
        raw[-4] ^= 0xFF
        paths[1].write_bytes(bytes(raw))
    elif breakage == "missing":
        paths[1].unlink()
    elif breakage == "foreign":
        other = tiny_model(seed=4, **DISK)
        other.save_pretrained(tmp_path / "other")
        for ids in texts(6):
            other.inject(ids[:, :6])
            if other.num_injections % 2 == 0:
                other.save_memory(tmp_path / "other", compact=True)
        paths[1].write_bytes((tmp_path / "other" / SEGMENTS_DIR / paths[1].name).read_bytes())
    elif breakage == "nan":
        from safetensors import safe_open
        from safetensors.torch import save_file

        from memoryllm_hf.modeling.atomic_io import tensors_digest
        from memoryllm_hf.modeling.memory_store import STORE_TENSORS, TOKEN_TENSORS

        with safe_open(str(paths[1]), "pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
        tensors["long_term_slots"][1, 0, 2] = float("nan")
        metadata["content_hash"] = tensors_digest(
            {name: tensors[name] for name in (*STORE_TENSORS, *TOKEN_TENSORS) if name in tensors})
        save_file(tensors, str(paths[1]), metadata)
    else:
        (folder / SEGMENTS_DIR / "notes.txt").write_text("hello")
    name = "notes.txt" if breakage == "stray" else paths[{"missing": 2}.get(breakage, 1)].name
    loads = (lambda: MemoryLlamaForCausalLM.from_pretrained(folder), lambda: read_folder_memory(folder, MemoryState))
    for load in loads:
        with pytest.raises(ValueError, match=match) as err:
            load()
        assert name in str(err.value)


def test_a_read_only_store_folder_gets_a_clear_error_and_the_memory_stays(tmp_path, monkeypatch):
    import errno

    from memoryllm_hf.modeling import atomic_io

    model = tiny_model(**DISK)
    model.save_pretrained(tmp_path / "m")
    model.inject(texts(1)[0])
    before = model.memory_state()
    on_disk = read_folder_memory(tmp_path / "m", MemoryState)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(atomic_io.tempfile, "mkdtemp", read_only)
    for compact in (False, True):
        with pytest.raises(OSError, match="Read-only file system.*keeps its memory"):
            model.save_memory(tmp_path / "m", compact=compact)
    monkeypatch.undo()
    assert model.memory_state().content_hash() == before.content_hash()
    assert same_store(model.long_term_memory, before.long_term)
    assert read_folder_memory(tmp_path / "m", MemoryState).content_hash() == on_disk.content_hash()
    model.save_memory(tmp_path / "m")  # writable again: the save goes through
    assert same_store(read_folder_memory(tmp_path / "m", MemoryState).long_term, before.long_term)


def _rss_anon() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon"))


def _fixed_malloc_threshold() -> None:
    """glibc raises its mmap threshold after large frees, and freed heap chunks then stay resident (fragmentation
    that grows with the number of allocations, whatever holds them): fix it so the test measures what is held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pytest.skip("needs glibc")


def test_resident_memory_stays_bounded_on_a_store_larger_than_a_ram_budget(tmp_path):
    """96 MiB of stored slots against a 40 MiB budget for everything the store adds to the process's own (anonymous)
    memory, a read included: the slots stay in files (the kernel may drop their pages); retrieval features (about
    a fifth of the slots' bytes at this shape) stay in RAM."""
    _fixed_malloc_threshold()
    config = {**DISK, "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
              "num_memory_tokens": 128, "num_update_tokens": 128, "long_term_memory_tokens": 1 << 20,
              "read_tokens": 256}
    model = tiny_model(**config)
    model.undo_depth = 0
    block = 12 * 128 * 256 * 4  # bytes of one block's slots (float32)
    count = (96 << 20) // block
    generator = torch.Generator().manual_seed(0)
    gc.collect()
    start = _rss_anon()
    for _ in range(count):
        model.commit_memory_slots(torch.randn(12, 128, 256, generator=generator))
    stored = sum(b.slots.numel() * b.slots.element_size() for b in model.long_term_memory)
    assert stored >= 96 << 20
    model.retrieve(torch.randint(4, 100, (1, 12)))  # features of every block, then one read
    model(torch.randint(4, 100, (1, 12)))
    gc.collect()
    assert _rss_anon() - start < 40 << 20, f"{(_rss_anon() - start) >> 20} MiB resident for a {stored >> 20} MiB store"


def test_a_save_of_a_disk_backed_store_copies_and_checks_only_its_new_blocks(tmp_path, monkeypatch):
    """A save hashes the store streamed from its files and checks the finiteness of a mapped block once: no copy of
    the whole store in RAM (a store of a million tokens is larger than RAM), no second read of every block."""
    from memoryllm_hf.modeling import memory_store

    model = tiny_model(**{**DISK, "long_term_memory_tokens": 1000})
    for ids in texts(12):
        model.inject(ids)
    model.save_pretrained(tmp_path / "m")
    real_tensors, real_finite, concatenated, checked = memory_store.store_to_tensors, memory_store.all_finite, [], []

    def store_to_tensors(store, with_slots=True):
        if with_slots:
            concatenated.append(len(store))
        return real_tensors(store) if with_slots else real_tensors(store, with_slots=False)

    def all_finite(tensor):
        checked.append(tensor)
        return real_finite(tensor)

    old = model.long_term_memory
    assert all(block.source for block in old)
    monkeypatch.setattr(memory_store, "store_to_tensors", store_to_tensors)
    monkeypatch.setattr(memory_store, "all_finite", all_finite)
    monkeypatch.setattr("memoryllm_hf.modeling.memory_files.store_to_tensors", store_to_tensors)
    for ids in texts(2, seed=5):
        model.inject(ids)
    model.save_memory(tmp_path / "m", compact=True)  # a full save (no journal record)
    assert len(model.long_term_memory) == 14
    assert concatenated and max(concatenated) <= 2, concatenated  # only the new blocks' segment
    mapped = {block.slots.data_ptr() for block in old}
    assert checked and not any(tensor.data_ptr() in mapped for tensor in checked)  # only the 2 new blocks
    checked.clear()
    reloaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m")  # (a load checks each block once)
    assert same_store(reloaded.long_term_memory, model.long_term_memory)
    assert len(checked) == 14 and len({tensor.data_ptr() for tensor in checked}) == 14


class _HashedBytes:
    """Records where the bytes every sha256 is fed (numpy views, as `atomic_io.tensor_bytes` gives them) live, to
    count how often a block's slots are hashed: `within(block)` is the number of its bytes fed."""

    def __init__(self, monkeypatch):
        import hashlib

        import numpy as np

        real, fed = hashlib.sha256, []

        class Counting:
            def __init__(self, data=b"", **kwargs):
                self.inner = real(**kwargs)
                self.update(data)

            def update(self, data):
                if isinstance(data, np.ndarray):
                    fed.append((data.ctypes.data, data.nbytes))
                self.inner.update(data)

            def hexdigest(self):
                return self.inner.hexdigest()

            def digest(self):
                return self.inner.digest()

        self.fed = fed
        monkeypatch.setattr(hashlib, "sha256", Counting)

    def within(self, block, fed: list | None = None) -> int:
        rows = [(row.data_ptr(), row.numel() * row.element_size()) for row in block.slots]
        fed = self.fed if fed is None else fed
        return sum(max(0, min(p + n, a + m) - max(p, a)) for p, n in fed for a, m in rows)


def test_a_second_save_of_a_disk_backed_store_hashes_only_its_new_blocks(tmp_path, monkeypatch):
    """The pool file of a disk-backed store records a chain over the blocks' digests, each computed once: a save
    after 2 injections into a store of 12 mapped blocks reads none of their bytes to hash them (a full-store hash
    takes ~30 s at 16 GB)."""
    from memoryllm_hf.modeling import memory_store

    model = tiny_model(**{**DISK, "long_term_memory_tokens": 1000})
    for ids in texts(12):
        model.inject(ids)
    model.save_pretrained(tmp_path / "m")
    old = model.long_term_memory
    assert all(block.source and block.digest for block in old)
    for ids in texts(2, seed=5):
        model.inject(ids)
    new = model.long_term_memory[12:]
    assert all(block.digest for block in new)  # each new block digested when it was written to its spill file
    real, digested = memory_store.hash_blocks, []

    def hash_blocks(store, flat=None, digest_blocks=True):
        digested.extend(block.injection for block in store if digest_blocks and block.digest is None)
        return real(store, flat, digest_blocks)

    monkeypatch.setattr(memory_store, "hash_blocks", hash_blocks)
    hashed = _HashedBytes(monkeypatch)
    model.save_memory(tmp_path / "m", compact=True)  # a full save (no journal record)
    assert len(model.long_term_memory) == 14 and model.long_term_memory[12:] == new
    assert sum(hashed.within(block) for block in old) == 0  # no byte of the 12 stored blocks hashed again
    assert digested == []  # the head: a chain over digests already known
    monkeypatch.undo()
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert same_store(loaded.long_term_memory, model.long_term_memory)


def test_a_load_hashes_each_block_once_for_its_segment_and_once_for_its_digest(tmp_path, monkeypatch):
    """Loading a disk-backed folder checks each segment's hash and digests its blocks in the same pass: the
    store's head (the chain over the digests) costs no further read of the store."""
    from memoryllm_hf.modeling import memory_files

    model = tiny_model(**{**DISK, "long_term_memory_tokens": 1000})
    model.save_pretrained(tmp_path / "m")
    for index, ids in enumerate(texts(14)):
        model.inject(ids)
        if index % 5 == 4:
            model.save_memory(tmp_path / "m", compact=True)
    model.save_memory(tmp_path / "m", compact=True)
    assert len(segments(tmp_path / "m")) == 3
    with safe_open(str(tmp_path / "m" / "memory.safetensors"), "pt") as handle:
        head = json.loads(handle.metadata()["long_term_head"])
    assert "content_hash" not in head and head["chain_hash"] == store_chain_hash(model.long_term_memory)
    real_check, checks = memory_files.check_store_head, []

    def check_store_head(head, store, *args, **kwargs):  # what the head check hashes
        start = len(hashed.fed)
        real_check(head, store, *args, **kwargs)
        checks.append((bool(head) and "chain_hash" in head, hashed.fed[start:]))

    monkeypatch.setattr(memory_files, "check_store_head", check_store_head)
    for load in (lambda: MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m").long_term_memory,
                 lambda: read_folder_memory(tmp_path / "m", MemoryState).long_term):
        hashed = _HashedBytes(monkeypatch)
        checks.clear()
        store = load()
        assert same_store(store, model.long_term_memory) and len(store) == 14
        assert checks and all(chained for chained, _ in checks)  # the chained head was checked, reading nothing:
        assert sum(hashed.within(block, fed) for _, fed in checks for block in store) == 0
        for block in store:  # each block's bytes hashed twice (its segment's hash, its digest) while checking it
            assert hashed.within(block) == 2 * block.slots.numel() * block.slots.element_size(), block.injection


def test_the_chain_hash_changes_with_any_block_and_with_their_order():
    """`store_chain_hash`: a block's digest is the hash of its own tensors (cached; a replaced block has none);
    changing one block's slots, token ids, injection or call number, or moving, dropping or adding a block, changes
    the chain hash."""
    from memoryllm_hf.modeling.atomic_io import tensors_digest
    from memoryllm_hf.modeling.memory_store import MemoryBlock, block_digest, store_to_tensors

    generator = torch.Generator().manual_seed(0)
    store = tuple(
        MemoryBlock(i, i - i % 2 if i > 1 else 1, torch.randn(2, 3, 4, generator=generator),
                    token_ids=torch.randint(4, 100, (5,), generator=generator, dtype=torch.int32))
        for i in range(1, 6)
    )
    for block in store:
        assert block.digest is None and block_digest(block) == tensors_digest(store_to_tensors((block,)))
    base = store_chain_hash(store)
    assert store_chain_hash(store) == base and dataclasses.replace(store[0]).digest is None

    def changed(index, **fields):
        return (*store[:index], dataclasses.replace(store[index], **fields), *store[index + 1:])

    slots = store[2].slots.clone()
    slots[1, 2, 3] += 1e-3
    ids = store[2].token_ids.clone()
    ids[0] += 1
    variants = {
        "slots": changed(2, slots=slots),
        "token ids": changed(2, token_ids=ids),
        "no token ids": changed(2, token_ids=None),
        "injection": changed(4, injection=7),
        "call": changed(3, call=3),
        "moved": (store[1], store[0], *store[2:]),
        "dropped first": store[1:],
        "dropped middle": (*store[:2], *store[3:]),
        "dropped last": store[:-1],
        "added": (*store, MemoryBlock(6, 6, torch.randn(2, 1, 4, generator=generator))),
    }
    hashes = {name: store_chain_hash(variant) for name, variant in variants.items()}
    assert base not in hashes.values() and len(set(hashes.values())) == len(hashes), hashes


def test_a_folder_saved_with_the_flat_store_head_still_loads_and_is_still_checked(tmp_path, monkeypatch):
    """Folders saved before chain hashes record the store's content hash: they load (checked in that scheme), a
    segment of another memory in them is refused, and their next save records the chain. A memory file of a
    disk-backed store (one file) keeps the content hash; a head of an unknown chain format is refused."""
    from memoryllm_hf.modeling import memory_files

    with monkeypatch.context() as old_way:
        old_way.setattr(memory_files, "folder_store_head", lambda store: memory_files.store_head(store))
        older, newer = _two_saves(tmp_path)
        other = _two_saves(tmp_path / "other", seed=7)[1]
    for folder in (older, newer):
        with safe_open(str(folder / "memory.safetensors"), "pt") as handle:
            head = json.loads(handle.metadata()["long_term_head"])
        assert "chain_hash" not in head and head["content_hash"]
    loaded = MemoryLlamaForCausalLM.from_pretrained(newer)
    assert len(loaded.long_term_memory) == 4
    assert same_store(read_folder_memory(newer, MemoryState).long_term, loaded.long_term_memory)
    name = f"{4:010d}-{4:010d}.safetensors"
    shutil.copy(newer / SEGMENTS_DIR / name, tmp_path / "kept")
    shutil.copy(other / SEGMENTS_DIR / name, newer / SEGMENTS_DIR / name)
    _refused_on_every_load_path(newer, "another store than the one")
    shutil.copy(tmp_path / "kept", newer / SEGMENTS_DIR / name)
    loaded.inject(texts(1, seed=8)[0])
    loaded.save_memory(newer, compact=True)
    with safe_open(str(newer / "memory.safetensors"), "pt") as handle:
        head = json.loads(handle.metadata()["long_term_head"])
    assert "content_hash" not in head and head["chain_hash"] == store_chain_hash(loaded.long_term_memory)
    assert same_store(MemoryLlamaForCausalLM.from_pretrained(newer).long_term_memory, loaded.long_term_memory)
    # one file holding a disk-backed store records its content hash, as every store file does
    loaded.memory_state().save(tmp_path / "state.safetensors")
    with safe_open(str(tmp_path / "state.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["long_term_head"])["content_hash"] == metadata["long_term_hash"]
    assert same_store(MemoryState.load(tmp_path / "state.safetensors").long_term, loaded.long_term_memory)
    # a head of a chain format this version does not know
    pool = newer / "memory.safetensors"
    with safe_open(str(pool), "pt") as handle:
        metadata, tensors = dict(handle.metadata()), {key: handle.get_tensor(key) for key in handle.keys()}
    metadata["long_term_head"] = json.dumps({**head, "chain_format": "memoryllm-hf/store-chain/99"})
    pool.unlink()
    save_file(tensors, str(pool), metadata=metadata)
    _refused_on_every_load_path(newer, "does not know")


def test_a_text_scorer_keeps_no_model_features_and_little_ram_per_stored_token(tmp_path):
    """The same 96 MiB disk-backed store scored with BM25 over its token ids: no model features are built (they
    would be ~19 MiB here), and the index and token ids add a few bytes per stored token (budget: 8 MiB)."""
    from memoryllm_hf.tiny import tiny_tokenizer

    _fixed_malloc_threshold()
    config = {**DISK, "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
              "num_memory_tokens": 128, "num_update_tokens": 128, "long_term_memory_tokens": 1 << 20,
              "read_tokens": 256, "retrieval_scorer": "bm25"}
    model = tiny_model(**config)
    model.undo_depth = 0
    model.retrieval_tokenizer = tiny_tokenizer()
    count = (96 << 20) // (12 * 128 * 256 * 4)
    generator = torch.Generator().manual_seed(0)
    gc.collect()
    start = _rss_anon()
    for _ in range(count):
        ids = torch.randint(4, 120, (128,), generator=generator)
        model.commit_memory_slots(torch.randn(12, 128, 256, generator=generator), input_ids=ids)
    model.retrieve(torch.randint(4, 120, (1, 12)))  # the BM25 index of every block, then one read
    model(torch.randint(4, 120, (1, 12)))
    gc.collect()
    assert "model" not in model.reads["retrieve"].scoring.parts
    assert _rss_anon() - start < 8 << 20, f"{(_rss_anon() - start) >> 20} MiB resident"


# ------------------------------------------------------------------ the Hub
@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path / "hf-cache", token="local-test-token"):
        yield server


def test_hub_carries_segments_and_a_memory_only_push_uploads_only_new_ones(hub, tmp_path, monkeypatch):
    repo = "tester/disk-store"
    model = tiny_model(**DISK)
    for ids in texts(3):
        model.inject(ids)
    model.save_pretrained(tmp_path / "m")
    model = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m")
    model.push_to_hub(repo)
    loaded = MemoryLlamaForCausalLM.from_pretrained(repo)
    assert same_store(loaded.long_term_memory, model.long_term_memory)
    sent = []
    real = HfApi.create_commit

    def recording(self, repo_id, operations, *args, **kwargs):
        sent.extend((type(op).__name__, op.path_in_repo) for op in operations)
        return real(self, repo_id, operations, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", recording)
    model.inject(texts(1, seed=9)[0])
    model.push_memory_to_hub(repo)
    uploaded = sorted(path for kind, path in sent if kind == "CommitOperationAdd")
    assert uploaded == [f"{SEGMENTS_DIR}/{4:010d}-{4:010d}.safetensors", "memory.safetensors", "memory_state.json"]
    for reload in (
        lambda: MemoryLlamaForCausalLM.from_pretrained(repo),
        lambda: (loaded.load_memory_from_hub(repo), loaded)[1],
    ):
        assert same_store(reload().long_term_memory, model.long_term_memory)
    # a broken segment on the Hub is refused
    HfApi().upload_file(path_or_fileobj=b"broken", path_in_repo=f"{SEGMENTS_DIR}/{4:010d}-{4:010d}.safetensors",
                        repo_id=repo)
    with pytest.raises(MemoryStateError, match="does not match"):
        loaded.load_memory_from_hub(repo)


# ------------------------------------------------------------------ one memory: the pool file records the segments' head
def _two_saves(tmp_path: Path, seed: int = 1) -> tuple[Path, Path]:
    """A folder saved after 3 injections (copied to `older`) and again, compacted, after a 4th (`newer`)."""
    model = tiny_model(**DISK)
    for ids in texts(3, seed=seed):
        model.inject(ids)
    model.save_pretrained(tmp_path / "newer")
    shutil.copytree(tmp_path / "newer", tmp_path / "older")
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "newer")
    loaded.inject(texts(1, seed=5)[0])
    loaded.save_memory(tmp_path / "newer", compact=True)
    assert segments(tmp_path / "newer") == [f"{1:010d}-{3:010d}.safetensors", f"{4:010d}-{4:010d}.safetensors"]
    return tmp_path / "older", tmp_path / "newer"


def _refused_on_every_load_path(folder: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryLlamaForCausalLM.from_pretrained(folder)
    with pytest.raises(MemoryStateError, match=match):
        read_folder_memory(folder, MemoryState)
    code = cli.main(["stats", str(folder)])
    assert code == 1


@pytest.mark.parametrize("case", ["missing", "older", "newer", "replaced"])
def test_a_segment_set_that_is_not_the_one_the_pool_file_records_is_refused(tmp_path, case):
    older, newer = _two_saves(tmp_path)
    if case == "missing":
        shutil.rmtree(newer / SEGMENTS_DIR)
        folder, match = newer, "records a long-term store of 4 injections"
    elif case == "older":
        shutil.rmtree(newer / SEGMENTS_DIR)
        shutil.copytree(older / SEGMENTS_DIR, newer / SEGMENTS_DIR)
        folder, match = newer, "an older store"
    elif case == "newer":
        shutil.rmtree(older / SEGMENTS_DIR)
        shutil.copytree(newer / SEGMENTS_DIR, older / SEGMENTS_DIR)
        folder, match = older, "a newer store"
    else:  # the newest segment replaced by another memory's segment of the same injection (same model)
        other = _two_saves(tmp_path / "other", seed=7)[1]
        name = f"{4:010d}-{4:010d}.safetensors"
        shutil.copy(other / SEGMENTS_DIR / name, newer / SEGMENTS_DIR / name)
        folder, match = newer, "another store than the one"
    _refused_on_every_load_path(folder, match)


def test_a_journal_append_keeps_pool_head_and_segments_consistent_and_drop_store_works(tmp_path, capsys):
    older, newer = _two_saves(tmp_path)
    loaded = MemoryLlamaForCausalLM.from_pretrained(newer)
    loaded.inject(texts(1, seed=8)[0])
    loaded.save_memory(newer)  # a journal record: pool file and segments untouched, still one memory
    assert (newer / JOURNAL_DIR).is_dir()
    again = MemoryLlamaForCausalLM.from_pretrained(newer)
    assert same_store(again.long_term_memory, loaded.long_term_memory)
    assert again.memory_state().content_hash() == loaded.memory_state().content_hash()
    # losing the segments is refused even with the journal there; drop-store keeps the pool (journal replayed)
    shutil.rmtree(newer / SEGMENTS_DIR)
    _refused_on_every_load_path(newer, "records a long-term store of 4 injections")
    assert cli.main(["drop-store", str(newer)]) == 0
    assert not (newer / JOURNAL_DIR).exists() and not (newer / SEGMENTS_DIR).exists()
    dropped = MemoryLlamaForCausalLM.from_pretrained(newer)
    assert dropped.long_term_memory == ()
    assert torch.equal(dropped.memory, loaded.memory) and dropped.num_injections == loaded.num_injections
